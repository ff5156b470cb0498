"""Llama 4 feed-forward blocks: the dense MLP, the routed experts and the MoE layer.

The routed experts run as three grouped matmuls (:mod:`grouped_matmul`:
``jax.lax.ragged_dot`` semantics, a Mosaic GPU kernel on Hopper) over the token
copies sorted by expert, so each expert multiplies only the tokens routed to it;
nothing loops over experts or multiplies a token by every expert (transformers'
reference does the latter, with zero-scaled inputs). At a decode step on Hopper (FP8,
top-1, few rows) the kernel takes the rows in token order instead, each through its own
expert's weights, and nothing is sorted (:meth:`MoE._by_row`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxattn.kernels import fp8 as fp8_lib
from jaxattn.kernels import fp8_rows
from jaxattn.kernels.grouped_matmul import (SHARED_EXPERT_ROWS, SWAP_AB_MAX_ROWS, grouped_matmul,
                                             grouped_matmul_fp8, grouped_matmul_fp8_by_row,
                                             resolve_fp8)
from jaxattn.models.llama4.config import Llama4Config
from jaxattn.models.llama4.layers import NO_AXES, Axes, Linear, normal_init, project
from jaxattn.models.llama4.quantization import Fp8Scheme


def counting_sort(keys, num_keys: int):
    """A stable sort of ``keys`` (int [M], values in ``[0, num_keys)``) by counting: ``order``
    (int32 [M]: ``argsort(keys, stable=True)``), ``position`` (int32 [M]: where each element
    lands, the inverse of ``order``) and ``counts`` (int32 [num_keys]: elements per key).

    Expert ids have few values, so a one-hot cumulative count does in a few fused XLA
    kernels what a sort kernel, an inverse scatter and a bincount did: at every MoE layer
    of a decode step those sorts cost more than their few elements.
    """
    onehot = keys[:, None] == jnp.arange(num_keys, dtype=keys.dtype)  # [M, num_keys]
    seen = jnp.cumsum(onehot, axis=0, dtype=jnp.int32)  # [M, num_keys]: count up to row i
    counts = seen[-1]
    starts = jnp.cumsum(counts) - counts  # [num_keys]: first row of each key
    position = (starts[keys] + jnp.take_along_axis(seen, keys[:, None], axis=1)[:, 0] - 1
                ).astype(jnp.int32)
    order = jnp.zeros_like(position).at[position].set(
        jnp.arange(keys.shape[0], dtype=jnp.int32), unique_indices=True)
    return order, position, counts


# The FP8 decode MoE's SwiGLU formed in the gate/up launch's epilogue (gate's and up's rows
# of the same columns in one tile), its rows left in f16 for a W8A16 down launch (the FP8
# weights widened to f16 in registers): one launch a layer fewer than the SwiGLU-and-quantise
# kernel between them (benchmarks/NOTES-fp8.md, sessions 42 and 48: -1.2% a step on 12 of
# Scout's layers on an H100; the launches alone -4 us a layer). Read when the step is traced.
SWIGLU_IN_GATE_UP = True


class MLP(nnx.Module):
    """SwiGLU MLP: the dense layers (``intermediate_size_mlp``) and the shared expert."""

    def __init__(self, config: Llama4Config, intermediate_size: int, *, dtype, rngs: nnx.Rngs,
                 fp8: Fp8Scheme | None = None):
        kw = dict(dtype=dtype, std=config.initializer_range, rngs=rngs,
                  fp8=fp8 is not None and fp8.mlp,
                  activation_scale_ub=fp8.activation_scale_ub if fp8 else None)
        self.gate_proj = Linear(config.hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(config.hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, config.hidden_size, **kw)

    def __call__(self, x, axes: Axes = NO_AXES, defer: bool = False):
        """Under a mesh: this device's columns of gate/up, so the result is a partial sum
        over ``axes.model`` that the caller reduces (fused with the routed experts').
        FP8: ``x`` may be quantised already; the SwiGLU and the down projection's input
        quantisation are one kernel at decode (:func:`fp8_rows.swiglu_quantize`).
        ``defer``: FP8 returns the down projection's :class:`fp8_lib.Unscaled` product."""
        if not self.fp8:
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        ub = self.gate_proj.activation_scale_ub
        if not isinstance(x, fp8_lib.Quantized):
            x = fp8_rows.quantize(x, scale_ub=ub)
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(fp8_rows.swiglu_quantize(gate, up, scale_ub=ub), defer=defer)

    @property
    def fp8(self) -> bool:
        """Whether the projections are FP8 (and so take :class:`fp8_lib.Quantized` rows)."""
        return self.gate_proj.weight_scale is not None


class Experts(nnx.Module):
    """Routed experts. HF stores gate and up fused as ``gate_up_proj [E, H, 2I]``; the loader
    splits it (first half gate, second half up, as ``chunk(2, dim=-1)`` does) so tensor
    parallelism can later shard I without separating the halves.

    ``fp8``: float8_e4m3fn weights laid out K-major (``gate_proj``/``up_proj [E, I, H]``,
    ``down_proj [E, H, I]``: the FP8 kernel's layout, and a per-expert Linear's ``[out,
    in]``) with per-output-channel scales ``*_scale [E, out]`` f32.
    """

    def __init__(self, config: Llama4Config, *, dtype, rngs: nnx.Rngs, fp8: bool = False,
                 activation_scale_ub: float | None = None):
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        std = config.initializer_range
        self.fp8 = fp8
        self.activation_scale_ub = activation_scale_ub
        shapes = dict(gate_proj=(e, h, i), up_proj=(e, h, i), down_proj=(e, i, h))  # [E, K, N]
        for name, shape in shapes.items():
            w = normal_init(rngs, shape, std, dtype)
            if fp8:
                q, s = fp8_lib.quantize(jnp.swapaxes(w, 1, 2), -1)  # [E, N, K], scales [E, N]
                setattr(self, name, nnx.Param(q))
                setattr(self, name + "_scale", nnx.Param(s))
            else:
                setattr(self, name, nnx.Param(w))

    @property
    def num_experts(self) -> int:
        return self.gate_proj.shape[0]

    def _matmul(self, names, x, groups, impl, scale_rows=True, by_row=False, shared=None,
                swiglu=False, groups_settled=False, held=None):
        """The products of ``x`` with the weights ``names`` (one launch), side by side;
        ``groups``: the group sizes, or each row's expert (``by_row``: the Unscaled product
        where the kernel runs, see :meth:`__call__`; ``shared``: a shared expert's Linears
        of the same names, in the same launch; ``swiglu``: gate's and up's SwiGLU instead,
        f16 rows, ``held`` their routed rows' scales; ``groups_settled``: the experts were
        chosen two launches back or more; see :func:`grouped_matmul_fp8_by_row`)."""
        weights = tuple(getattr(self, n)[...] for n in names)
        if self.fp8:
            scales = tuple(getattr(self, n + "_scale")[...] for n in names)
            if by_row:
                if shared is not None:
                    linears = [getattr(shared, n) for n in names]
                    shared = (tuple(lin.weight[...] for lin in linears),
                              tuple(lin.weight_scale[...] for lin in linears))
                return grouped_matmul_fp8_by_row(x, weights, scales, groups, impl=impl,
                                                 scale_rows=scale_rows, defer=scale_rows,
                                                 shared=shared, swiglu=swiglu,
                                                 groups_settled=groups_settled, held=held)
            return grouped_matmul_fp8(x, weights, scales, groups, impl=impl,
                                      scale_rows=scale_rows)
        return grouped_matmul(x, weights, groups, impl=impl)

    def __call__(self, x, group_sizes, impl: str = "auto", row_experts=None,
                 shared: MLP | None = None, held=None):
        """x [M, H] (or FP8 experts' :class:`fp8_lib.Quantized` rows): sorted by expert,
        ``group_sizes[e]`` rows for expert e (entries past the last expert: rows of none).
        Returns [M, H]. FP8: or rows in any order with ``row_experts`` (int32 [M], each
        row's expert; the number of experts or more: none) in place of the group sizes;
        where the by-row kernel runs, its :class:`fp8_lib.Unscaled` product by the rows'
        scales (rows of no expert unwritten: the caller zeroes their scales).
        ``impl``: the grouped matmul implementation (``grouped_matmul.IMPLS``). Gate and up
        run as one launch: at decode each has too few N tiles to fill the SMs alone. FP8:
        their product leaves the rows' scales to the SwiGLU, which quantises the down
        projection's input in the same kernel at decode (:func:`fp8_rows.swiglu_quantize`).

        ``shared`` (by row): a shared expert (an FP8 :class:`MLP` of the experts' shapes)
        in the same launches, the SwiGLU over both's rows. ``x``'s values are then [M, H]
        (both take them) or [2M, H] (the routed rows, then the shared rows), its scales
        [2M] (the routed rows', 0 for a row of no expert, then the shared rows'); returns
        their products as one stacked :class:`fp8_lib.Unscaled` [2, M, H] (routed, shared).
        ``held`` (f32 [M], optional): 1 for a row of some expert, 0 for one of none, which
        the SwiGLU in gate/up would otherwise work out from ``row_experts`` in a kernel of
        its own (:func:`grouped_matmul_fp8_by_row`)."""
        names = ("gate_proj", "up_proj")
        if not self.fp8:
            if row_experts is not None:
                raise ValueError("row_experts: FP8 experts only")
            gate, up = jnp.split(self._matmul(names, x, group_sizes, impl), 2, axis=-1)
            return self._matmul(("down_proj",), up * jax.nn.silu(gate), group_sizes, impl)
        if not isinstance(x, fp8_lib.Quantized):
            x = fp8_rows.quantize(x, scale_ub=self.activation_scale_ub)
        by_row = row_experts is not None
        groups = row_experts if by_row else group_sizes
        if by_row and shared is not None and SWIGLU_IN_GATE_UP:
            # f16 rows [2M, I] of the SwiGLU from the gate/up launch itself
            h = self._matmul(names, x, groups, impl, by_row=True, shared=shared, swiglu=True,
                             held=held)
        else:
            gate_up = self._matmul(names, x, groups, impl, scale_rows=False, by_row=by_row,
                                   shared=shared)  # [M, 2I] ([2, M, 2I] with shared)
            h = fp8_rows.swiglu_quantize(gate_up.reshape(-1, gate_up.shape[-1]), None,
                                         x.scale, scale_ub=self.activation_scale_ub)
        # the routing came before gate/up: with programmatic dependent launch the down
        # launch may read it, and copy its first routed tile's weights, before its wait
        return self._matmul(("down_proj",), h, groups, impl, by_row=by_row, shared=shared,
                            groups_settled=True)


def _held(valid):
    """f32 [N]: 1 for a token's row, 0 for padding (which top-1 routing sends to no
    expert), from a step's ``valid`` rows; the same array for every layer, so XLA makes it
    once a step. None without ``valid``."""
    return None if valid is None else valid.reshape(-1).astype(jnp.float32)


class MoE(nnx.Module):
    """Sigmoid top-k router, routed experts, shared expert (transformers' ``Llama4TextMoe``)."""

    def __init__(self, config: Llama4Config, *, dtype, rngs: nnx.Rngs,
                 fp8: Fp8Scheme | None = None):
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.router = Linear(config.hidden_size, config.num_local_experts, dtype=dtype,
                             std=config.initializer_range, rngs=rngs)
        self.experts = Experts(config, dtype=dtype, rngs=rngs,
                               fp8=fp8 is not None and fp8.experts,
                               activation_scale_ub=fp8.activation_scale_ub if fp8 else None)
        self.shared_expert = MLP(config, config.intermediate_size, dtype=dtype, rngs=rngs,
                                 fp8=fp8)

    def __call__(self, x, axes: Axes = NO_AXES, valid=None, gmm_impl: str = "auto", xq=None,
                 defer: bool = False, routing=None):
        """Shared expert + routed experts. Under a mesh the result is a partial sum over
        ``axes.model`` (the caller's one all-reduce also combines the experts' outputs).
        ``xq``: ``x`` quantised already (FP8 experts; the norm before can do both at once).
        ``defer``: the two outputs unsummed, (shared, routed), each an array or an FP8
        :class:`fp8_lib.Unscaled` product: the residual add's kernel scales and sums them.
        ``routing``: where :meth:`routes_in_norm`, x's rows routed already as
        :func:`fp8_rows.route_scales` routes them, (expert [N], row scales [2N]): the norm's
        kernel before can (:func:`fp8_rows.add_rms_norm_quantize` with the router's weight).

        ``valid`` (bool, x's leading shape): rows that are tokens. The others (a step's
        bucket padding) go to no expert, so the grouped matmuls skip them: a batch-1
        decode padded to 16 rows reads one expert's weights, not two. Their routed output
        is zero. ``gmm_impl``: the experts' grouped matmul implementation."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        n, k = x.shape[0], self.top_k
        if routing is not None and not self.routes_in_norm(n, gmm_impl):
            raise ValueError(f"routing given for {n} rows that the decode step's by-row "
                             f"experts do not take (top-{k})")
        if self.experts.fp8 and xq is None:
            xq = fp8_rows.quantize(x, scale_ub=self.experts.activation_scale_ub)
        if xq is not None:  # rows as x's: [N, H] values, [N] scales
            xq = fp8_lib.Quantized(xq.values.reshape(x.shape), xq.scale.reshape(-1), xq.dtype)
        if self.routes_in_norm(n, gmm_impl):
            # A decode step's MoE: the routing and the rows' scales in one kernel (or the
            # norm's before), then the experts' two launches (the shared expert's rows among
            # the routed ones).
            expert, scales = routing if routing is not None else fp8_rows.route_scales(
                x, self.router.weight[...], xq.scale,
                None if valid is None else valid.reshape(-1))
            rows = fp8_lib.Quantized(xq.values, scales, xq.dtype)
            terms = (self.experts(rows, None, gmm_impl, row_experts=expert,
                                  shared=self.shared_expert, held=_held(valid)).reshape(shape),)
            return terms if defer else fp8_lib.sum_terms(terms)
        masked = k == 1  # padding rows routed to no expert already
        if masked:  # Scout: a max and an argmax fuse with the router
            top_logit, top_expert = (a.reshape(n, 1) for a in fp8_rows.reference_route(
                x, self.router.weight[...], None if valid is None else valid.reshape(-1)))
        else:  # top_k is a sort kernel
            logits = self.router(x)
            top_logit, top_expert = lax.top_k(logits, k)  # [N, k]
        # HF scales the expert *input* by the sigmoid score (computed in f32, then cast),
        # not the output; unselected experts see a zero input and so contribute zero.
        scores = jax.nn.sigmoid(top_logit.astype(jnp.float32)).astype(x.dtype).reshape(-1)
        expert = top_expert.reshape(-1)  # [N*k], token-major
        if valid is not None and not masked:  # padding: past the last expert (sorted last,
            # counted nowhere)
            expert = jnp.where(jnp.repeat(valid.reshape(-1), k), expert, self.num_experts)
        shared_in = xq if xq is not None and self.shared_expert.fp8 else x
        local_experts = self.experts.num_experts
        if self._by_row(n, gmm_impl) and self._with_shared(n):
            terms = (self._experts_with_shared(x, xq, scores, expert, gmm_impl, _held(valid))
                     .reshape(shape),)
            return terms if defer else fp8_lib.sum_terms(terms)
        if self._by_row(n, gmm_impl):
            routed = self.experts(self._scaled_rows(x, xq, scores), None, gmm_impl,
                                  row_experts=expert)
        else:
            # position [N*k]: each copy's row in expert order; the padding id counts last.
            # counts [E + 1]: the last entry counts the padding rows, which the grouped
            # matmuls leave to no group (passing all of it spares a slice kernel per layer).
            order, position, group_sizes = counting_sort(expert, self.num_experts + 1)
            rows = self._scaled_rows(x, xq, scores, order // k, order)  # [N*k, H] by expert
            if local_experts == self.num_experts:
                routed = self.experts(rows, group_sizes, gmm_impl)
            else:
                routed = self._local_experts(rows, group_sizes, local_experts, axes, gmm_impl)
            routed = routed[position].reshape(n, k, -1)  # back to token-major
            routed = routed[:, 0] if k == 1 else routed.sum(1, dtype=routed.dtype)
        if valid is not None:  # the kernels leave rows past the groups unwritten
            routed = fp8_lib.mask_rows(routed, valid.reshape(-1))
        terms = tuple(t.reshape(shape) for t in
                      (self.shared_expert(shared_in, axes, defer=defer), routed))
        return terms if defer else fp8_lib.sum_terms(terms)

    def _by_row(self, n: int, gmm_impl: str) -> bool:
        """Whether the routed experts take the rows in token order, each through its own
        expert's weights (:func:`grouped_matmul_fp8_by_row`): a decode step (top-1, at most
        ``SWAP_AB_MAX_ROWS`` rows) with FP8 experts, all on this device, in the Mosaic kernel.
        Nothing is then sorted by expert or scattered back (several small kernels a layer);
        XLA's ragged dot needs the sorted rows anyway."""
        e = self.experts
        if not (e.fp8 and self.top_k == 1 and n <= SWAP_AB_MAX_ROWS
                and e.num_experts == self.num_experts):
            return False
        i, h = e.gate_proj.shape[1:]  # [E, I, H]
        return resolve_fp8(gmm_impl, h, i) == resolve_fp8(gmm_impl, i, h) == "mosaic"

    def routes_in_norm(self, n: int, gmm_impl: str) -> bool:
        """Whether a call on ``n`` rows takes its routing as :func:`fp8_rows.route_scales`
        gives it (the ``routing`` argument): a decode step's by-row experts with the shared
        expert in their launches, uncapped activations."""
        return (self._by_row(n, gmm_impl) and self._with_shared(n)
                and self.experts.activation_scale_ub is None)

    def _with_shared(self, n: int) -> bool:
        """Whether the by-row experts take the shared expert into their launches
        (:class:`Experts`' ``shared``): FP8 with the experts' shapes, and a decode step of
        the kernel's token tiles (``SHARED_EXPERT_ROWS``)."""
        s, e = self.shared_expert, self.experts
        return (s.fp8 and n in SHARED_EXPERT_ROWS
                and s.gate_proj.weight.shape == e.gate_proj.shape[1:]
                and s.down_proj.weight.shape == e.down_proj.shape[1:])

    def _experts_with_shared(self, x, xq, scores, expert, gmm_impl, held):
        """The experts with the shared expert in their launches (:class:`Experts`'
        ``shared``) on this layer's rows, under an activation cap (uncapped, the rows'
        scales come from :func:`fp8_rows.route_scales` in ``__call__``): the routed rows
        scaled by their scores and quantised apart (padding rows, of expert E, with scale
        0), then the shared expert's, the token's quantised rows."""
        routed = fp8_rows.quantize(self._scaled_rows(x, xq, scores),
                                   scale_ub=self.experts.activation_scale_ub)
        routed_scale = jnp.where(expert < self.num_experts, routed.scale, 0.0)  # padding: 0
        rows = fp8_lib.Quantized(jnp.concatenate([routed.values, xq.values]),
                                 jnp.concatenate([routed_scale, xq.scale]), xq.dtype)
        return self.experts(rows, None, gmm_impl, row_experts=expert, shared=self.shared_expert,
                            held=held)

    def _scaled_rows(self, x, xq, scores, tokens=None, copies=None):
        """The routed experts' input: each copy's token row times its router score (rows
        ``tokens`` of x, scores ``copies``; None: every row in order). FP8 without a cap:
        the token's quantised row once for the routed and the shared experts, the scale
        times the score (a sigmoid: positive). Under a cap the cap applies to the scaled
        rows, which the experts quantise apart."""
        if copies is not None:
            scores = scores[copies]
        if self.experts.fp8 and self.experts.activation_scale_ub is None:
            if tokens is None:
                return fp8_lib.Quantized(xq.values, xq.scale * scores.astype(jnp.float32),
                                         xq.dtype)
            return xq.take(tokens, scores)
        return (x if tokens is None else x[tokens]) * scores[:, None]

    def _local_experts(self, rows, group_sizes, local_experts, axes: Axes, gmm_impl: str):
        """Expert parallelism: this device holds experts ``[first, first + local_experts)``.

        Every device of the group has every token (activations are replicated for the
        tensor-parallel attention), so dispatch needs no communication: each device
        rotates the expert-sorted rows so that its experts' rows come first, runs its
        grouped matmuls on them (static shapes: all M rows are passed, the kernels
        touch only the rows of the groups), zeroes the rest and rotates back. The
        caller's all-reduce over the group is the combine. Returns [M, H] in sorted order.
        """
        quantized = isinstance(rows, fp8_lib.Quantized)
        m = (rows.values if quantized else rows).shape[0]
        first = lax.axis_index(axes.expert) * local_experts
        local_sizes = lax.dynamic_slice_in_dim(group_sizes, first, local_experts)
        offset = jnp.cumsum(group_sizes)[first] - group_sizes[first]  # rows of earlier experts
        idx = (offset + jnp.arange(m, dtype=jnp.int32)) % m
        rows = rows.take(idx) if quantized else rows[idx]
        out = self.experts(rows, local_sizes, gmm_impl)  # [M, H]: rows [0, count) are ours
        # Rows past the groups are not written by the Mosaic kernel (undefined): select, not scale.
        mine = jnp.arange(m) < local_sizes.sum()
        out = jnp.where(mine[:, None], out, jnp.zeros((), out.dtype))
        return jnp.zeros_like(out).at[idx].set(out)
