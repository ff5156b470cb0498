"""Llama 4 feed-forward blocks: the dense MLP, the routed experts and the MoE layer.

The routed experts run as three grouped matmuls (:mod:`grouped_matmul`:
``jax.lax.ragged_dot`` semantics, a Mosaic GPU kernel on Hopper) over the token
copies sorted by expert, so each expert multiplies only the tokens routed to it;
nothing loops over experts or multiplies a token by every expert (transformers'
reference does the latter, with zero-scaled inputs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxattn.models.llama4.config import Llama4Config
from jaxattn.kernels.grouped_matmul import grouped_matmul


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


def _normal(rngs: nnx.Rngs, shape, std: float, dtype):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ W.T (+ b)`` with HF's weight layout ``[out, in]``, so checkpoints load as they are."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype,
                 std: float, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), std, dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x, preferred_element_type=None, reduce=None):
        """``reduce``: the all-reduce of a row-parallel layer, applied before the bias (once)."""
        w = self.weight[...]
        y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=preferred_element_type)
        y = y if reduce is None else reduce(y)
        return y if self.bias is None else y + self.bias[...]


class MLP(nnx.Module):
    """SwiGLU MLP: the dense layers (``intermediate_size_mlp``) and the shared expert."""

    def __init__(self, config: Llama4Config, intermediate_size: int, *, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, std=config.initializer_range, rngs=rngs)
        self.gate_proj = Linear(config.hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(config.hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, config.hidden_size, **kw)

    def __call__(self, x, axes: Axes = NO_AXES):
        """Under a mesh: this device's columns of gate/up, so the result is a partial sum
        over ``axes.model`` that the caller reduces (fused with the routed experts')."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nnx.Module):
    """Routed experts. HF stores gate and up fused as ``gate_up_proj [E, H, 2I]``; the loader
    splits it (first half gate, second half up, as ``chunk(2, dim=-1)`` does) so tensor
    parallelism can later shard I without separating the halves."""

    def __init__(self, config: Llama4Config, *, dtype, rngs: nnx.Rngs):
        self.impl = "auto"  # grouped matmul implementation (see grouped_matmul.IMPLS)
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        std = config.initializer_range
        self.gate_proj = nnx.Param(_normal(rngs, (e, h, i), std, dtype))  # [E, H, I]
        self.up_proj = nnx.Param(_normal(rngs, (e, h, i), std, dtype))  # [E, H, I]
        self.down_proj = nnx.Param(_normal(rngs, (e, i, h), std, dtype))  # [E, I, H]

    def __call__(self, x, group_sizes):
        """x [M, H]: rows sorted by expert, ``group_sizes[e]`` rows for expert e. Returns [M, H]."""
        gate = grouped_matmul(x, self.gate_proj[...], group_sizes, impl=self.impl)
        up = grouped_matmul(x, self.up_proj[...], group_sizes, impl=self.impl)
        return grouped_matmul(up * jax.nn.silu(gate), self.down_proj[...], group_sizes,
                              impl=self.impl)


class MoE(nnx.Module):
    """Sigmoid top-k router, routed experts, shared expert (transformers' ``Llama4TextMoe``)."""

    def __init__(self, config: Llama4Config, *, dtype, rngs: nnx.Rngs):
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.router = Linear(config.hidden_size, config.num_local_experts, dtype=dtype,
                             std=config.initializer_range, rngs=rngs)
        self.experts = Experts(config, dtype=dtype, rngs=rngs)
        self.shared_expert = MLP(config, config.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, axes: Axes = NO_AXES, valid=None):
        """Shared expert + routed experts. Under a mesh the result is a partial sum over
        ``axes.model`` (the caller's one all-reduce also combines the experts' outputs).

        ``valid`` (bool, x's leading shape): rows that are tokens. The others (a step's
        bucket padding) go to no expert, so the grouped matmuls skip them: a batch-1
        decode padded to 16 rows reads one expert's weights, not two. Their routed output
        is zero."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        n, k = x.shape[0], self.top_k
        logits = self.router(x)  # [N, E]
        top_logit, top_expert = lax.top_k(logits, k)  # [N, k]
        # HF scales the expert *input* by the sigmoid score (computed in f32, then cast),
        # not the output; unselected experts see a zero input and so contribute zero.
        scores = jax.nn.sigmoid(top_logit.astype(jnp.float32)).astype(x.dtype)
        expert = top_expert.reshape(-1)  # [N*k], token-major
        if valid is not None:  # padding: past the last expert (sorted last, counted nowhere)
            expert = jnp.where(jnp.repeat(valid.reshape(-1), k), expert, self.num_experts)
        order = jnp.argsort(expert, stable=True)
        rows = x[order // k] * scores.reshape(-1)[order][:, None]  # [N*k, H] sorted by expert
        group_sizes = jnp.bincount(expert, length=self.num_experts).astype(jnp.int32)
        local_experts = self.experts.gate_proj.shape[0]
        if local_experts == self.num_experts:
            routed = self.experts(rows, group_sizes)
        else:
            routed = self._local_experts(rows, group_sizes, local_experts, axes)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
        routed = routed[inverse].reshape(n, k, -1)  # back to token-major
        routed = routed[:, 0] if k == 1 else routed.sum(1, dtype=x.dtype)
        if valid is not None:  # the kernels leave rows past the groups unwritten
            routed = jnp.where(valid.reshape(-1, 1), routed, jnp.zeros((), routed.dtype))
        return (self.shared_expert(x, axes) + routed).reshape(shape)

    def _local_experts(self, rows, group_sizes, local_experts, axes: Axes):
        """Expert parallelism: this device holds experts ``[first, first + local_experts)``.

        Every device of the group has every token (activations are replicated for the
        tensor-parallel attention), so dispatch needs no communication: each device
        rotates the expert-sorted rows so that its experts' rows come first, runs its
        grouped matmuls on them (static shapes: all M rows are passed, the kernels
        touch only the rows of the groups), zeroes the rest and rotates back. The
        caller's all-reduce over the group is the combine. Returns [M, H] in sorted order.
        """
        m = rows.shape[0]
        first = lax.axis_index(axes.expert) * local_experts
        local_sizes = lax.dynamic_slice_in_dim(group_sizes, first, local_experts)
        offset = jnp.cumsum(group_sizes)[first] - group_sizes[first]  # rows of earlier experts
        idx = (offset + jnp.arange(m, dtype=jnp.int32)) % m
        out = self.experts(rows[idx], local_sizes)  # [M, H]: rows [0, count) are ours
        # Rows past the groups are not written by the Mosaic kernel (undefined): select, not scale.
        mine = jnp.arange(m) < local_sizes.sum()
        out = jnp.where(mine[:, None], out, jnp.zeros((), out.dtype))
        return jnp.zeros_like(out).at[idx].set(out)
