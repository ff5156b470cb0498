"""The Llama 4 text decoder in Flax NNX.

The layers run the same code under two drivers that differ only in how attention
reads its keys and values (the ``attend`` callback):

* ``model(input_ids[B, L])``: the full-sequence forward (research use and the
  parity tests), attention through :func:`jaxattn.attention`.
* the serving step (:mod:`jaxattn.serve.model_runner`): a packed ragged batch over
  the paged KV cache, attention through :func:`jaxattn.ragged_paged_attention`.

The computation follows transformers 5.17's ``modeling_llama4.py`` step by step
(the comments name the HF quirks it reproduces).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

import jaxattn
from jaxattn import kv_quant
from jaxattn.kernels import fp8 as fp8_lib
from jaxattn.kernels import fp8_rows, qk_rows
from jaxattn.models.llama4.config import Llama4Config
from jaxattn.models.llama4.layers import (NO_AXES, Axes, Embedding, Linear, RMSNorm, project,
                                          rope_tables)
from jaxattn.models.llama4.moe import MLP, MoE
from jaxattn.models.llama4.quantization import Fp8Scheme

# Whether a decode step's FP8 MoE layer routes its rows in the post-attention norm's kernel
# (fp8_rows.add_rms_norm_quantize(router=): the router's logits, top-1 and the rows' scales,
# where otherwise an XLA reduction and fp8_rows.route_scales' kernel follow the norm: two
# launches a layer fewer). Session 13's top-1-only form measured slower (its loads waited
# behind each expert's reduction); this form takes 7.7 us a layer where the three launches
# took 7.2 (full-size Scout, batch 1 on the H200, session 40).
ROUTE_IN_NORM = True

# Whether FP8 attention projections take the attention output under one static scale per
# layer (its V scale: an output row is a convex mix of V rows, so V's bound is its bound;
# Llama4ForCausalLM.fix_kv_scales), which the decode kernels apply as they write the rows,
# instead of a per-token scale, whose absmax spans every KV head's CTA and so took a
# quantising launch after the attention (fp8_rows.quantize: 48 launches a decode step).
# e4m3 is floating point, so a scale above a row's own max costs its values no precision
# until they fall below 2^-6 of it.
# With ROUTE_IN_NORM, 143 launches a batch-1 step fewer (96 of them Mosaic): the host's time
# per step fell by 1.5 ms and the step by 0.11-0.27 ms (7.27 -> 7.16 and 7.50 -> 7.23 ms in two
# same-run pairs, full-size Scout on the H200, session 40; benchmarks/NOTES-fp8.md).
STATIC_O_SCALE = True


class Attention(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, *, dtype, rngs: nnx.Rngs,
                 fp8: Fp8Scheme | None = None):
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, d)
        kw = dict(bias=config.attention_bias, dtype=dtype, std=config.initializer_range, rngs=rngs,
                  fp8=fp8 is not None and fp8.attention,
                  activation_scale_ub=fp8.activation_scale_ub if fp8 else None)
        self.q_proj = Linear(h, self.num_heads * d, **kw)
        self.k_proj = Linear(h, self.num_kv_heads * d, **kw)
        self.v_proj = Linear(h, self.num_kv_heads * d, **kw)
        self.o_proj = Linear(self.num_heads * d, h, **kw)
        self.use_rope = config.use_rope(layer)
        self.qk_norm_eps = config.rms_norm_eps if (config.use_qk_norm and self.use_rope) else None
        # An FP8 cache stores the normed keys with one scale (jaxattn.kv_quant), which the
        # kernels then need not apply per key; the other layers' keys, and every layer's
        # values, get theirs from the weights (Llama4ForCausalLM.fix_kv_scales).
        self.fixed_k_scale = None if self.qk_norm_eps is None else kv_quant.normed_k_scale(d)
        self.fixed_v_scale = None
        self.o_scale = None  # the output's one FP8 scale (STATIC_O_SCALE), else per token
        self.dtype = jnp.dtype(dtype)  # the activations' (of an FP8 output too)
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        self.chunk_size = config.layer_chunk_size(layer)  # None: global attention
        self.scale = d ** -0.5

    def qkv(self, x, positions, rope, cache: qk_rows.KVTarget | None = None):
        """x [..., P, hidden] -> q [..., P, Hq, D], k, v [..., P, Hkv, D]; positions [P], rope
        :func:`qk_rows.rope_tables` at them. ``cache``: k and v also go into that paged cache
        -> (q, k, v, its updated pools) (:func:`qk_rows.rope_norm`: k and v None where its
        kernel wrote them)."""
        # Under tensor parallelism the projections hold this device's heads only.
        hq, hkv = (p.weight.shape[0] // self.head_dim for p in (self.q_proj, self.k_proj))
        qkv = project(x, self.q_proj, self.k_proj, self.v_proj, joint=True)
        temperature = None
        if self.temperature_tuning:
            # NoPE layers scale queries by log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1.
            pos = positions.astype(jnp.float32)
            temperature = (jnp.log1p(jnp.floor((pos + 1.0) / self.floor_scale)) * self.attn_scale
                           + 1.0)
        # RoPE, then the L2 norm (RoPE layers only, HF's order), then the temperature: one
        # kernel at decode on Hopper (qk_rows, on the FP8 projection's joint output), XLA's
        # ops elsewhere.
        return qk_rows.rope_norm(qkv, hq, hkv, rope if self.use_rope else None,
                                 eps=self.qk_norm_eps, temperature=temperature, cache=cache,
                                 fixed_k_scale=self.fixed_k_scale,
                                 fixed_v_scale=self.fixed_v_scale)

    def out(self, o, axes: Axes):
        """Row-parallel output projection: each device's heads give a partial sum, reduced
        here. ``o`` FP8: quantised under :attr:`o_scale` already (by the attention kernels)."""
        o = o.reshape(*o.shape[:-2], -1)
        if self.fp8 and self.o_scale is not None:
            o = fp8_lib.Quantized.fixed(o, self.o_scale, dtype=self.dtype)
        elif self.fp8:  # one kernel at decode instead of XLA's two
            o = fp8_rows.quantize(o, scale_ub=self.o_proj.activation_scale_ub)
        # FP8 on one device: the Unscaled product (the residual add scales it).
        return self.o_proj(o, reduce=axes.psum if axes.model else None, defer=True)

    @property
    def fp8(self) -> bool:
        """Whether the projections are FP8 (and so take :class:`Quantized` rows)."""
        return self.q_proj.weight_scale is not None


class DecoderLayer(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, *, dtype, rngs: nnx.Rngs,
                 fp8: Fp8Scheme | None = None):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.self_attn = Attention(config, layer, dtype=dtype, rngs=rngs, fp8=fp8)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype)
        self.feed_forward = (MoE(config, dtype=dtype, rngs=rngs, fp8=fp8) if config.is_moe(layer)
                             else MLP(config, config.intermediate_size_mlp, dtype=dtype, rngs=rngs,
                                      fp8=fp8))

    def kv_rows(self, which: str):
        """|w * W_j| f32 [Hkv D, all devices' rows]: each row ``W_j`` of the key (``which``
        "k") or value ("v") projection times the input norm's weight ``w``, its norm. Such a
        value is ``sum_i u_i w_i W_ji`` with ``u = x / rms(x)`` (the norm's input, ``|u| <=
        sqrt(hidden)``), so this is the size of value ``j`` on a typical input and
        1/sqrt(hidden) of its largest."""
        proj = self._kv_proj(which)
        norm_w = self.input_layernorm.weight[...].astype(jnp.float32)  # [hidden]
        w = proj.weight[...].astype(jnp.float32)  # [Hkv D, hidden]
        if proj.weight_scale is not None:  # FP8: one scale per output row
            w = w * proj.weight_scale[...].astype(jnp.float32).reshape(-1, 1)
        return jnp.sqrt(jnp.sum(jnp.square(w * norm_w), axis=1))

    def kv_bound(self, which: str, rows=None) -> float:
        """The largest magnitude any key (``which`` "k", before the qk norm where there is
        one) or value ("v") of this layer can take, whatever the input: by Cauchy-Schwarz
        ``sqrt(hidden)`` times the largest of :meth:`kv_rows` (``rows``, where the caller has
        them), and a RoPE rotation mixes two keys into at most sqrt(2) times the larger.
        Times 1.08 for the roundings on the way (FP8 activations: 2^-4; bf16 casts:
        3 x 2^-8)."""
        proj = self._kv_proj(which)
        hidden = self.input_layernorm.weight.shape[0]
        rows = self.kv_rows(which) if rows is None else rows
        bound = float(jnp.max(rows)) * math.sqrt(hidden) * 1.08
        if which == "k" and self.self_attn.use_rope:
            bound *= math.sqrt(2)
        if proj.bias is not None:
            bound += float(jnp.max(jnp.abs(proj.bias[...].astype(jnp.float32))))
        return bound

    def bounded_scale(self, which: str, rows=None) -> float | None:
        """One FP8 scale under which none of this layer's keys (``which`` "k") or values ("v")
        saturates: :func:`kv_quant.power_of_two_scale` of :meth:`kv_bound` (``rows``: its
        :meth:`kv_rows`, where the caller has them); None where that is past the scales'
        range or heads are narrower than :data:`kv_quant.BOUNDED_MIN_HEAD_DIM`."""
        if self.self_attn.head_dim < kv_quant.BOUNDED_MIN_HEAD_DIM:
            return None
        return kv_quant.power_of_two_scale(self.kv_bound(which, rows))

    def _kv_proj(self, which: str):
        if which not in ("k", "v"):
            raise ValueError(f"which={which!r} is not 'k' or 'v'")
        return self.self_attn.k_proj if which == "k" else self.self_attn.v_proj

    def __call__(self, x, delta, positions, rope, attend, axes: Axes, valid=None,
                 gmm_impl="auto", kv_target: qk_rows.KVTarget | None = None):
        """The residual stream ``x`` and its pending update ``delta`` (the previous layer's
        feed-forward output; None before the first layer) -> this layer's (x, delta): the
        caller adds the last delta (:func:`fp8_lib.sum_terms`). Each residual add happens
        in the norm after it, so with FP8 matmuls at decode the add, the norm and the
        quantisation are one kernel (:func:`fp8_rows.add_rms_norm_quantize`; vLLM's
        fused_add_rms_norm does the same). An update is a tuple of terms: on one device
        the FP8 products come unscaled and unsummed (the shared and the routed experts'),
        and that kernel applies their epilogues too.

        ``attend(attn_module, q, k, v) -> o`` is the one part the two forwards do
        differently. ``kv_target`` (serving, a bf16 paged cache): where this layer's k and v
        go, written with q's RoPE where one kernel does both; ``attend`` then gets the
        written pools as a fifth argument (and k, v None). ``valid`` (bool [T], serving):
        which rows are tokens, not bucket padding. ``gmm_impl``: the routed experts' grouped
        matmul implementation.

        Under a mesh ``x`` is replicated over the model-parallel group: each device
        computes its heads / columns / experts and one all-reduce per block
        (``axes.psum``) restores the full activation.
        """
        attn, ff = self.self_attn, self.feed_forward
        x, h, hq = _add_norm(self.input_layernorm, x, delta, attn.fp8,
                             attn.q_proj.activation_scale_ub)
        q, k, v, *written = attn.qkv(h if hq is None else hq, positions, rope, kv_target)
        o = attn.out(attend(attn, q, k, v, *written), axes)
        if isinstance(ff, MoE):
            fp8 = ff.experts.fp8 or ff.shared_expert.fp8
            route = ROUTE_IN_NORM and x.ndim == 2 and ff.routes_in_norm(x.shape[0], gmm_impl)
            x, h, hq, *routing = _add_norm(
                self.post_attention_layernorm, x, (o,), fp8, ff.experts.activation_scale_ub,
                *((ff.router.weight[...], valid) if route else ()))
            return x, _reduce(ff(h, axes, valid, gmm_impl, xq=hq, defer=True,
                                 routing=routing[0] if routing else None), axes)
        x, h, hq = _add_norm(self.post_attention_layernorm, x, (o,), ff.fp8,
                             ff.gate_proj.activation_scale_ub)
        return x, _reduce((ff(h if hq is None else hq, axes, defer=True),), axes)


def _reduce(terms: tuple, axes: Axes) -> tuple:
    """A feed-forward's output terms; under a mesh, summed and all-reduced (one partial sum
    per device)."""
    return (axes.psum(fp8_lib.sum_terms(terms)),) if axes.model else terms


def _add_norm(norm: RMSNorm, x, delta, fp8: bool, scale_ub, router=None, valid=None):
    """(``x + delta``, or x when delta is None; ``norm`` of it; its per-token FP8
    quantisation for the FP8 matmuls after it, or None without them): one kernel for all
    three at decode (:mod:`fp8_rows`). ``delta``: a tuple of terms (:func:`fp8_lib.sum_terms`).
    ``router`` (FP8, with a delta): a top-1 router's weight; the rows' routing comes fourth
    (:meth:`MoE.__call__`'s ``routing``; ``valid``: which rows are tokens)."""
    if not fp8:
        x = x if delta is None else x + fp8_lib.sum_terms(delta)
        return x, norm(x), None
    if delta is None:
        return x, *fp8_rows.rms_norm_quantize(x, norm.weight[...], norm.eps, scale_ub=scale_ub)
    return fp8_rows.add_rms_norm_quantize(x, delta, norm.weight[...], norm.eps,
                                          scale_ub=scale_ub, router=router,
                                          valid=None if valid is None else valid.reshape(-1))


class Llama4TextModel(nnx.Module):
    def __init__(self, config: Llama4Config, *, dtype, rngs: nnx.Rngs,
                 fp8: Fp8Scheme | None = None):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size,
                                      std=config.initializer_range, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype, rngs=rngs, fp8=fp8)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)


class Llama4ForCausalLM(nnx.Module):
    """Attribute paths mirror HF's parameter names (``model.layers.3.self_attn.q_proj.weight``).

    ``fp8``: which linear layers hold FP8 weights (:class:`Fp8Scheme`; None: none). ``dtype``
    is then the dtype of everything else (embeddings, router, norms, LM head, activations).
    """

    def __init__(self, config: Llama4Config, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 fp8: Fp8Scheme | None = None):
        self.config = config
        self.fp8 = fp8
        self.mesh = None  # a jax.sharding.Mesh once the weights are placed on one
        self.model = Llama4TextModel(config, dtype=dtype, rngs=rngs, fp8=fp8)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, dtype=dtype, std=config.initializer_range,
            rngs=rngs)

    @property
    def dtype(self):
        return self.model.embed_tokens.weight[...].dtype

    def embed(self, ids, axes: Axes = NO_AXES):
        """Token embeddings [..., hidden]. Vocab-parallel under a mesh: each device holds a
        contiguous block of rows, looks up the ids that fall in it (zeros elsewhere) and
        the group sums (one id hits exactly one block, so the sum is exact)."""
        w = self.model.embed_tokens.weight[...]
        if not axes.vocab:
            return w[ids]
        rows = w.shape[0]
        local = ids - jax.lax.axis_index(axes.vocab) * rows
        mine = (local >= 0) & (local < rows)
        x = jnp.where(mine[..., None], w[jnp.clip(local, 0, rows - 1)], jnp.zeros((), w.dtype))
        return jax.lax.psum(x, axes.vocab)

    def logits(self, x, axes: Axes = NO_AXES):
        """Final norm and LM head; f32 logits (the head accumulates in f32). Vocab-parallel
        under a mesh: each device's block of logits, gathered (only the rows asked for)."""
        x = self.model.norm(x)
        w = self.model.embed_tokens.weight[...] if self.lm_head is None else self.lm_head.weight[...]
        logits = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        if axes.vocab:
            logits = jax.lax.all_gather(logits, axes.vocab, axis=logits.ndim - 1, tiled=True)
        return logits

    def fix_kv_scales(self) -> None:
        """Give every layer one FP8 V scale, and every layer without the qk norm (Scout's
        global NoPE layers) one K scale, that the weights bound
        (:meth:`DecoderLayer.bounded_scale`). e4m3 is a floating-point format, so a scale
        too large for most rows costs them nothing until their values fall below its
        subnormals (2^-6 of the scale): the bound sits ~sqrt(hidden) (71 in Scout) above a
        typical value, while e4m3's normal range spans 2^15. Values past the bound (only
        the roundings' worst case could reach them) would saturate at 448 times the scale,
        not overflow. With every K (V) scale one power of two, the kernels skip their
        per-row scaling (:func:`jaxattn.ragged_paged_attention`'s ``fixed_k_scale``,
        ``fixed_v_scale``).

        The layers of one attention kind share the largest of their scales (larger is as
        safe), so they still share one trace of the kernels (the scale is static). A layer
        keeps per-row scales (None) where its own bound gives none, or where a row of its
        weights is so small that the row's typical value would sit under a quarter of the
        shared scale (4 binades above the subnormals): with random weights every row is near
        the largest, with a checkpoint's it need not be. Set from the weights as they are
        now: the serving step calls it when it is built.

        With :data:`STATIC_O_SCALE`, an FP8 attention's output takes its layer's V scale
        too (``Attention.o_scale``): attention weights are positive and sum to one, so no
        output value exceeds the largest V value."""
        for which in ("k", "v"):
            kinds = {}  # chunk size -> [(layer, its kv_rows, its own bounded scale)]
            for layer in self.model.layers:
                attn = layer.self_attn
                if which == "k" and attn.qk_norm_eps is not None:
                    continue  # normed keys: kv_quant.normed_k_scale
                rows = layer.kv_rows(which)
                kinds.setdefault(attn.chunk_size, []).append(
                    (layer, rows, layer.bounded_scale(which, rows)))
            for members in kinds.values():
                shared = max((s for *_, s in members if s is not None), default=None)
                for layer, rows, own in members:
                    ok = own is not None and float(jnp.min(rows)) >= shared / 4
                    setattr(layer.self_attn, f"fixed_{which}_scale", shared if ok else None)
        for layer in self.model.layers:  # an output row is a convex mix of V rows
            attn = layer.self_attn
            attn.o_scale = attn.fixed_v_scale if STATIC_O_SCALE and attn.fp8 else None

    def run_layers(self, x, positions, attend, axes: Axes = NO_AXES, valid=None,
                   gmm_impl: str = "auto", kv_target=None):
        """The decoder layers over hidden states ``x [..., P, hidden]`` at ``positions [P]``.

        ``attend(layer_index, attn_module, q, k, v[, written pools]) -> o`` is each layer's
        attention; ``kv_target(layer_index, attn_module)`` (serving): where that layer's k
        and v go, a :class:`qk_rows.KVTarget` or None (see :meth:`DecoderLayer.__call__`).
        """
        rope = rope_tables(self.config.inv_freq(), positions)  # once for all layers
        delta = None
        for i, layer in enumerate(self.model.layers):
            target = None if kv_target is None else kv_target(i, layer.self_attn)
            x, delta = layer(x, delta, positions, rope, functools.partial(attend, i), axes,
                             valid, gmm_impl, target)
        return x if delta is None else x + fp8_lib.sum_terms(delta)

    def forward(self, input_ids, *, impl: str = "auto", gmm_impl: str = "auto",
                axes: Axes = NO_AXES):
        """input_ids [B, L] int32 -> logits [B, L, vocab] f32 (causal, positions 0..L-1).

        ``impl`` / ``gmm_impl``: the attention and grouped matmul implementations.
        ``axes``: the mesh axes when called on a device's shards inside ``shard_map``.
        """
        x = self.embed(input_ids, axes)  # [B, L, hidden]
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)

        def attend(i, attn: Attention, q, k, v):
            return jaxattn.attention(q, k, v, causal=True, chunk_size=attn.chunk_size,
                                     scale=attn.scale, impl=impl)

        return self.logits(self.run_layers(x, positions, attend, axes, gmm_impl=gmm_impl), axes)

    def __call__(self, input_ids, *, impl: str = "auto", gmm_impl: str = "auto"):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if self.mesh is not None:  # weights placed on a mesh (``load(mesh=)``, ``sharding.shard``)
            from jaxattn.models.llama4 import sharding

            return sharding.forward(self, input_ids, impl, gmm_impl)
        return _forward_jit(self, input_ids, impl, gmm_impl)


@functools.partial(nnx.jit, static_argnums=(2, 3))
def _forward_jit(model, input_ids, impl, gmm_impl):
    return model.forward(input_ids, impl=impl, gmm_impl=gmm_impl)


def init_random(config: Llama4Config, *, seed: int = 0, dtype=jnp.float32,
                fp8: Fp8Scheme | None = None) -> Llama4ForCausalLM:
    """Seeded random weights (HF's init: normal(0, initializer_range), norms at 1). With
    ``fp8`` the same draws as without, the FP8 layers' weights quantised."""
    return Llama4ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed), fp8=fp8)


def local_heads(config: Llama4Config, model_parallel: int = 1) -> tuple[int, int]:
    """(query heads, KV heads) of one device when heads are split ``model_parallel`` ways.

    Query heads split evenly. KV heads split too while there are at least as many as
    devices; past that each device holds the one KV head its query heads read, and each
    KV head is replicated on ``model_parallel / KV heads`` devices (:func:`kv_replicas`),
    as vLLM does. Its query heads then lie in one KV group, since the group size
    ``Hq / Hkv`` is a multiple of the ``Hq / model_parallel`` heads a device holds.
    """
    hq, hkv, n = config.num_attention_heads, config.num_key_value_heads, model_parallel
    if hq % n or (hkv % n and n % hkv):
        raise ValueError(f"tensor x expert parallel size {n} must divide the {hq} query heads, "
                         f"and divide the {hkv} KV heads or be a multiple of them (a KV head "
                         f"is then replicated on {n} / {hkv} devices)")
    return hq // n, max(1, hkv // n)


def kv_replicas(config: Llama4Config, model_parallel: int = 1) -> int:
    """Devices holding each KV head: 1 while the KV heads split over the model-parallel
    group, else ``model_parallel / num_key_value_heads`` (see :func:`local_heads`)."""
    local_heads(config, model_parallel)
    return max(1, model_parallel // config.num_key_value_heads)


def stored_kv_heads(config: Llama4Config, model_parallel: int = 1) -> int:
    """KV heads over the whole group, replicas counted: the K/V projections' rows and the
    KV pools' head axis have this many heads, one device's share ``local_heads(...)[1]``."""
    return config.num_key_value_heads * kv_replicas(config, model_parallel)
