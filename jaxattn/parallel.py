"""The device mesh: data-parallel replicas x expert parallel x tensor parallel.

Axes, outermost first: ``("data", "expert", "tensor")``.

* ``tensor`` (innermost): attention heads, the dense MLP's and the experts'
  intermediate columns. Its all-reduces run twice per layer, so its devices
  are the closest ones (``jax.make_mesh`` lays the innermost axis on adjacent
  devices: one NVLink domain on a multi-node mesh).
* ``expert``: the routed experts are split over it. Attention, the dense MLP,
  the shared expert and the vocabulary are split over ``expert`` *and*
  ``tensor`` together (the *model-parallel group*, ``MODEL``): with activations
  replicated across the group, every device does 1/(ep*tp) of every layer and
  no device repeats another's query heads. A group larger than the KV heads (Scout's
  8) replicates each KV head on the devices whose query heads read it, as vLLM
  does (``models/llama4/sharding.py``); ``ep`` only changes how the experts are cut
  (whole experts per device instead of column slices of every expert).
* ``data`` (outermost): independent replicas of the model, each with its own
  KV pool and engine (``serve/data_parallel.py``); they exchange nothing.

(vLLM's ``--tensor-parallel-size 8 --enable-expert-parallel`` corresponds to
``tensor=1, expert=8`` here: attention over 8 devices, 2 whole experts each.)

Everything goes through JAX's own distribution: ``Mesh``/``NamedSharding`` for
placement, ``shard_map`` collectives inside a step, ``jax.distributed`` for
several hosts.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA, EXPERT, TENSOR = "data", "expert", "tensor"
AXES = (DATA, EXPERT, TENSOR)
MODEL = (EXPERT, TENSOR)  # the model-parallel group of one replica


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How many devices each axis spans (the ``--*-parallel-size`` flags)."""

    tensor: int = 1
    expert: int = 1
    data: int = 1

    def __post_init__(self):
        for name in ("tensor", "expert", "data"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"--{name}-parallel-size must be a positive int, got {value!r}")

    @property
    def model(self) -> int:
        """Devices of one replica (the model-parallel group)."""
        return self.tensor * self.expert

    @property
    def world(self) -> int:
        return self.data * self.model

    def describe(self) -> str:
        return f"TP={self.tensor} EP={self.expert} DP={self.data}"


def make_mesh(pc: ParallelConfig, devices=None) -> Mesh:
    """A ``(data, expert, tensor)`` mesh over the first ``pc.world`` devices (all processes')."""
    devices = list(jax.devices() if devices is None else devices)
    if pc.world > len(devices):
        raise ValueError(f"{pc.describe()} needs {pc.world} devices; {len(devices)} "
                         f"{'is' if len(devices) == 1 else 'are'} available")
    shape = (pc.data, pc.expert, pc.tensor)
    return jax.make_mesh(shape, AXES, devices=devices[:pc.world],
                         axis_types=(AxisType.Auto,) * len(AXES))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One ``(expert, tensor)`` mesh per data-parallel replica (a slice of ``mesh``)."""
    if DATA not in mesh.axis_names:
        return [mesh]
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index(DATA), 0)
    names = tuple(a for a in mesh.axis_names if a != DATA)
    return [Mesh(d, names, axis_types=(AxisType.Auto,) * len(names)) for d in devices]


def model_axes(mesh: Mesh | None) -> tuple[str, ...]:
    """The mesh axes of the model-parallel group (those of ``MODEL`` the mesh has)."""
    if mesh is None:
        return ()
    return tuple(a for a in MODEL if a in mesh.axis_names)


def axis_size(mesh: Mesh | None, axes) -> int:
    if mesh is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes if a in mesh.axis_names], dtype=np.int64))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for a multi-host mesh (call before any other JAX use).

    Without arguments JAX detects the cluster (SLURM, Open MPI, Kubernetes, TPU
    pods); otherwise all three name the coordinator ``host:port``, the number of
    processes and this process's rank. Afterwards ``jax.devices()`` lists every
    host's devices and :func:`make_mesh` spans them.
    """
    if jax.distributed.is_initialized():
        return
    kw = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                num_processes=num_processes, process_id=process_id).items()
          if v is not None}
    jax.distributed.initialize(**kw)


def agree(mask: np.ndarray) -> np.ndarray:
    """Process 0's value of a host array on every process (one process: unchanged).

    Multi-host programs must issue identical steps everywhere; host decisions that
    could differ between processes (e.g. which prompts a resumed run still has to do)
    take process 0's answer.
    """
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(mask))
