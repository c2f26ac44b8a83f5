"""The hardware a plan is for: TPU slices by name (compiled for with JAX's compile-only TPU client), or `local`.

A slice name is what Cloud TPU calls it: `v4-8` ... `v4-1024` and `v5p-8` ... `v5p-1024` count TensorCores
(two per chip, run as one "megacore" device), `v5e-4` ... `v5e-256` and `v6e-4` ... `v6e-256` count chips;
`2xv5e-256` is two slices joined over the data-center network. Each process of a run works on the chips of
its own host (parallel.local_mesh). The TPU compiler takes programs over a whole slice only ("device assignment
should include all slice devices" on v5e), so a plan lays the devices out as [hosts, chips per host]: the pool
split over both axes, weights replicated over hosts and split (shard_params) over a host's chips alone — per
chip, the program each process of a run compiles for its own chips.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
import numpy as np

from distprompt_jax import parallel

GiB = 1 << 30


class PlanError(ValueError):
    """A plan that cannot be made: unknown hardware, no libtpu, a model or config the plan cannot describe."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures (dense bfloat16 peak; bytes per second)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    topology_prefix: str  # the generation in JAX's topology names ("v5e:2x2", "v5:2x2x1" for v5p)
    megacore: bool  # the slice name counts TensorCores, two per chip (v4, v5p)


# Cloud TPU's system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): peak bf16 compute per
# chip, HBM capacity and bandwidth.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, "v4", megacore=True),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, "v5e", megacore=False),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, "v5", megacore=True),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, "v6e", megacore=False),
}
# Chips of a slice -> its shape in JAX's topology names: 2-D tori for v5e/v6e, 3-D for v4/v5p.
SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}
# Hosts hold 4 chips (2x2), except single-host 8-chip v5e/v6e machines (ct5lp-hightpu-8t, ct6e-standard-8t).
HOST_BOUNDS = (2, 2, 1)
SINGLE_HOST_8 = (2, 4, 1)


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where a plan runs."""

    name: str
    chips: int  # in the whole slice (all slices)
    hosts: int
    devices: np.ndarray  # [hosts, chips per host] (compile-only devices for TPU slices)
    hbm_bytes_per_chip: int
    chip: Chip | None  # None for `local`: no published peak to project from
    # The share of a chip's memory a plan fills with slots: the rest is left to the runtime and fragmentation
    # (TPU), or, on `local`, to the host's other work (as engine.auto_slots leaves half the free memory).
    fill: float


def known_topologies() -> list[str]:
    names = ["local"]
    for chip in CHIPS.values():
        shapes = SHAPES_3D if chip.megacore else SHAPES_2D
        names += [f"{chip.name}-{chips * (2 if chip.megacore else 1)}" for chips in shapes]
    return names


def topology(name: str) -> Topology:
    """The hardware a plan named `name` is for (see the module docstring); PlanError lists the known names."""
    if name == "local":
        devices = jax.local_devices()
        return Topology("local", chips=len(devices), hosts=1, devices=np.asarray(devices).reshape(1, -1),
                        hbm_bytes_per_chip=parallel.available_bytes(devices[0]), chip=None, fill=0.5)
    match = re.fullmatch(r"(?:(\d+)x)?(v4|v5e|v5p|v6e)-(\d+)", name)
    chip = CHIPS.get(match.group(2)) if match else None
    shapes = None if chip is None else (SHAPES_3D if chip.megacore else SHAPES_2D)
    count = int(match.group(3)) if match else 0
    chips = count // 2 if chip is not None and chip.megacore else count
    if chip is None or chips not in shapes or (chip.megacore and count % 2):
        raise PlanError(f"unknown topology {name!r}; known: {', '.join(known_topologies())} (and 'Nx<slice>' for N "
                        "slices, e.g. 2xv5e-256)")
    slices = int(match.group(1) or 1)
    host_bounds = SINGLE_HOST_8 if chips == 8 and not chip.megacore else HOST_BOUNDS
    devices = compile_only_devices(f"{chip.topology_prefix}:{shapes[chips]}", chip, host_bounds, slices)
    hosts = sorted({d.process_index for d in devices})
    by_host = np.asarray([[d for d in devices if d.process_index == host] for host in hosts])
    return Topology(name, chips=len(devices), hosts=len(hosts), devices=by_host, hbm_bytes_per_chip=chip.hbm_bytes,
                    chip=chip, fill=0.9)


def compile_only_devices(topology_name: str, chip: Chip, host_bounds: tuple, slices: int) -> list:
    """The devices of a TPU topology from JAX's compile-only TPU client (libtpu; no TPU needed).

    libtpu reads the accelerator type and worker hosts from the environment and complains where they are
    unset (as on any machine without a TPU); placeholders are set in this process only, and only here. It also
    holds a lockfile that lets one process at a time load it, which two plans (or a plan and a test) would
    contend for: compile-only clients touch no chip, so the planner allows several (ALLOW_MULTIPLE_LIBTPU_LOAD)."""
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("a plan for a TPU slice compiles with libtpu, which is not installed: pip install libtpu "
                        "(or pip install 'distprompt_jax[tpu]'); --plan=local needs neither")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.name}-{1 if not chip.megacore else 2}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    options = dict(chips_per_host_bounds=host_bounds, num_slices=slices)
    if chip.megacore:
        options["chip_config_name"] = "megacore"
    return list(topologies.get_topology_desc(topology_name, "tpu", **options).devices)
