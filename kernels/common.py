"""What the Mosaic GPU kernels share: the shapes they take, math constants, the device.

The attention kernels (prefill, decode) run one wgmma tile per KV head with
bf16/f16 operands, so they take the head dims and dtypes below; the grouped
matmul takes the same dtypes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxattn.planner import cdiv  # noqa: F401  (one ceiling division for the whole package)

HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Softmax runs in base 2 (exp2 is one MUFU instruction): scores are scaled by
# log2(e), and the log-sum-exp is turned back into natural log with ln(2).
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# Hopper's dynamic shared memory per block (what Mosaic GPU checks against).
MAX_SMEM = 227 * 1024
# Mosaic GPU starts every scratch buffer on a 1 KiB boundary; an mbarrier is 8 bytes.
SMEM_ALIGNMENT = 1024
MBARRIER_BYTES = 8
# SM count assumed where no GPU is attached (lowering for CUDA on a CPU host):
# an H100 / H200 SXM.
_DEFAULT_SMS = 132


def supports(head_dim: int, dtype) -> bool:
    return head_dim in HEAD_DIMS and jnp.dtype(dtype) in DTYPES


def check_supported(kernel: str, head_dim: int, dtype) -> None:
    """ValueError naming ``kernel`` unless it takes this head_dim and dtype."""
    if jnp.dtype(dtype) not in DTYPES:
        raise ValueError(f"{kernel} kernel supports bfloat16/float16, got {jnp.dtype(dtype)}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{kernel} kernel supports head_dim {HEAD_DIMS}, got {head_dim}")


def smem_bytes(scratch) -> int:
    """Dynamic shared memory Mosaic GPU allocates for a kernel's ``scratch_types``.

    Every buffer is rounded up to :data:`SMEM_ALIGNMENT`, then the mbarriers
    follow (``None`` entries allocate nothing). Buffers a kernel body scopes
    itself (``pl.run_scoped``) are not in the list and not counted.
    """
    buffers, barriers = 0, 0
    for s in scratch:
        if s is None:
            continue
        if isinstance(s, plgpu.Barrier):
            barriers += math.prod(s.num_barriers)  # a shape; () is one barrier
        else:
            nbytes = math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
            buffers += cdiv(nbytes, SMEM_ALIGNMENT) * SMEM_ALIGNMENT
    return buffers + MBARRIER_BYTES * barriers


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (sm_90), where the kernels run natively."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def num_sms() -> int:
    """SMs of the default device: one persistent CTA each."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or _DEFAULT_SMS)
