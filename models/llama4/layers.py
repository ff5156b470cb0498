"""The building blocks every Llama 4 block uses: linear layers, norms, RoPE, embeddings, and
the mesh axes the layer code reduces over.

Weights keep Hugging Face's layouts (``Linear.weight [out, in]``), so checkpoints load as
they are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxattn.kernels import fp8 as fp8_lib
from jaxattn.kernels import grouped_matmul
from jaxattn.kernels.qk_rows import apply_rope, l2norm, rope_tables  # noqa: F401  (model ops)


@dataclasses.dataclass(frozen=True)
class Axes:
    """The mesh axes the layer code reduces over inside ``shard_map`` (static).

    Empty (the default): one device, no collectives, the unsharded model.
    ``model``: the model-parallel group; attention heads, MLP / shared-expert
    columns and the routed experts' partial outputs are summed over it.
    ``expert``: the axis the routed experts are split over (each device runs
    its own experts' tokens). ``vocab``: the axes the embedding and LM head
    rows are split over (empty when the vocabulary does not divide).
    """

    model: tuple[str, ...] = ()
    expert: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ()

    def psum(self, x):
        return lax.psum(x, self.model) if self.model else x


NO_AXES = Axes()


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype):
    """HF's initialiser: normal(0, std), drawn in f32."""
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ W.T (+ b)`` with HF's weight layout ``[out, in]``.

    ``fp8``: the weight is float8_e4m3fn with one f32 scale per output channel
    (``weight_scale [out]``, compressed-tensors' name) and ``x`` is quantised per token
    at run time (:func:`jaxattn.kernels.fp8.scaled_matmul`; a decode step's few rows on
    Hopper: :func:`grouped_matmul.dense_fp8`'s kernel); ``activation_scale_ub`` caps
    a row's absmax. Random init draws the bf16 weight and quantises it.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype,
                 std: float, rngs: nnx.Rngs, fp8: bool = False,
                 activation_scale_ub: float | None = None):
        w = normal_init(rngs, (out_features, in_features), std, dtype)
        if fp8:
            q, s = fp8_lib.quantize(w, -1)
            self.weight, self.weight_scale = nnx.Param(q), nnx.Param(s)
        else:
            self.weight, self.weight_scale = nnx.Param(w), None
        self.activation_scale_ub = activation_scale_ub
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x, preferred_element_type=None, reduce=None, defer=False):
        """``reduce``: the all-reduce of a row-parallel layer, applied before the bias (once).
        ``defer``: an FP8 layer without either returns its :class:`fp8_lib.Unscaled` product,
        for the residual add after it to scale."""
        w = self.weight[...]
        if self.weight_scale is not None:  # at decode on Hopper the Mosaic kernel
            (y,) = grouped_matmul.dense_fp8(x, (w,), (self.weight_scale[...],),
                                            out_dtype=preferred_element_type or x.dtype,
                                            scale_ub=self.activation_scale_ub,
                                            defer=defer and reduce is None and self.bias is None)
            if isinstance(y, fp8_lib.Unscaled):
                return y
        else:
            y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=preferred_element_type)
        y = y if reduce is None else reduce(y)
        return y if self.bias is None else y + self.bias[...]


def project(x, *linears: Linear, joint: bool = False):
    """``x`` through each of ``linears``: several projections of one input (attention's q, k
    and v; an MLP's gate and up) -> a tuple of their outputs. FP8 weights take one launch for
    all of them at decode (:func:`grouped_matmul.dense_fp8`: three or two launches a layer
    fewer, and weights read faster than XLA's FP8 dot reads them there); other calls run
    each Linear. ``joint``: that launch's one output ``[..., N_1 + ... + N_P]`` instead of
    the tuple, where it ran (and no bias)."""
    if any(lin.weight_scale is None for lin in linears):
        return tuple(lin(x) for lin in linears)
    joint = joint and all(lin.bias is None for lin in linears)
    ys = grouped_matmul.dense_fp8(x, tuple(lin.weight[...] for lin in linears),
                                  tuple(lin.weight_scale[...] for lin in linears),
                                  scale_ub=linears[0].activation_scale_ub, joint=joint)
    if not isinstance(ys, tuple):
        return ys
    return tuple(y if lin.bias is None else y + lin.bias[...] for y, lin in zip(ys, linears))


class Embedding(nnx.Module):
    def __init__(self, vocab: int, size: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(normal_init(rngs, (vocab, size), std, dtype))  # [vocab, hidden]


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((size,), dtype))

    def __call__(self, x):
        # HF normalises in f32, casts back to the input dtype, *then* multiplies by the weight.
        return l2norm(x, self.eps) * self.weight[...]
