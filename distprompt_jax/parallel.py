"""Spreading independent targets over processes and devices.

Targets never interact. In a multi-host run (after `jax.distributed.initialize`) each process takes a
contiguous slice of the targets and works on its local devices only: no collective crosses hosts. Within
a process, a chunk's target axis is sharded over the local devices with `jit` + `NamedSharding`, and the
model parameters are replicated. Chunks have a fixed size (the last is padded) so one compiled step
serves them all.
"""

from __future__ import annotations

import jax
import numpy as np
import psutil
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TARGET_AXIS = "targets"


def local_mesh(devices=None) -> Mesh:
    """A 1-D mesh over this process's devices, its axis named `targets`."""
    return Mesh(np.asarray(devices if devices is not None else jax.local_devices()), (TARGET_AXIS,))


def target_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (target) axis split over the mesh, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(TARGET_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_slice(n_targets: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous share of `n_targets` (sizes differ by at most one)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    bounds = np.linspace(0, n_targets, count + 1).round().astype(int)
    return slice(int(bounds[index]), int(bounds[index + 1]))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def chunk_bounds(n_targets: int, chunk_size: int) -> list[tuple[int, int]]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [(start, min(start + chunk_size, n_targets)) for start in range(0, n_targets, chunk_size)]


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to `size` by repeating the first row (a valid input whose result is dropped)."""
    x = np.asarray(x)
    if len(x) > size:
        raise ValueError(f"{len(x)} rows do not fit a chunk of {size}")
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


def available_bytes(device) -> int:
    """Free memory of one device; CPU devices share the host's available RAM."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return psutil.virtual_memory().available // len(jax.local_devices(backend=device.platform))


def auto_chunk_size(
    lower, *, n_targets: int, n_devices: int, fixed_bytes: int, budget_fraction: float = 0.5,
    max_chunk: int = 4096,
) -> int:
    """The largest chunk whose compiled step fits `budget_fraction` of each device's free memory.

    `lower(size)` lowers the step for a chunk of `size` targets; XLA's memory analysis of a small probe
    gives the bytes per target (everything beyond `fixed_bytes`, the replicated parameters, counted
    against the targets — an overestimate, so the chunk errs small).
    """
    probe = 4 * n_devices
    memory = lower(probe).compile().memory_analysis()
    used = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    per_target = max(1, used - fixed_bytes) / (probe / n_devices)
    budget = budget_fraction * available_bytes(jax.local_devices()[0]) - fixed_bytes
    per_device = max(1, int(budget // per_target))
    chunk = per_device * n_devices
    return max(n_devices, min(chunk, max_chunk, round_up(n_targets, n_devices)))


def sharded_params(params, mesh: Mesh):
    """Parameters split over the mesh along each leaf's largest evenly divisible axis (others replicated).

    For models too large for one device: each device stores 1/n of the weights and XLA gathers them
    where the replicated-over-targets computation needs them (ZeRO-3 style), trading memory for traffic.
    """
    return jax.device_put(params, param_shardings(params, mesh, shard=True))


def param_shardings(params, mesh: Mesh, shard: bool):
    """The sharding of every parameter leaf (arrays or ShapeDtypeStructs): replicated, or with `shard` split as
    `sharded_params` splits it, over the mesh's `targets` axis (replicated over any other: a plan's hosts)."""
    parts = mesh.shape[TARGET_AXIS]

    def spec(leaf) -> NamedSharding:
        axes = sorted(range(len(leaf.shape)), key=lambda a: -leaf.shape[a])
        for axis in axes:
            if leaf.shape[axis] % parts == 0:
                return NamedSharding(mesh, PartitionSpec(*([None] * axis), TARGET_AXIS))
        return replicated(mesh)

    return jax.tree.map(spec if shard else lambda _: replicated(mesh), params)
