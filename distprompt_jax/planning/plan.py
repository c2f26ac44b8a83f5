"""A plan: every method of a config compiled for a topology on abstract weights, and what its pool needs.

For each method run (programs.method_programs) the driver's own programs are compiled for the topology's devices
(hardware.topology) with the run's shardings and dtype; the pool is the largest that fits (measure.Host) or the
config's own slot count. Where the weights do not fit a chip replicated, the plan shards them (`shard_params`)
and says so. The rate is a projection (`projected_rate`), never a measurement.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from distprompt_jax import parallel
from distprompt_jax.planning import hardware, programs
from distprompt_jax.planning.measure import Host, PoolMemory, StepCost

# The fraction of a chip's peak flops, HBM bandwidth and interconnect bandwidth a projection assumes a step
# reaches. One stated figure, not a measurement: the segment's layer scan and per-target vmaps are not tuned.
ASSUMED_UTILISATION = 0.5


@dataclasses.dataclass(frozen=True)
class MethodPlan:
    label: str
    fits: bool
    slots: int  # the slice's pool: slots per host times hosts (0 where nothing fits)
    slots_per_host: int  # what `slots` in the method's config section sets (each process's pool)
    memory: PoolMemory  # per chip, at the planned pool (the smallest pool where nothing fits)
    cost: StepCost  # per chip, one step of the planned pool
    projected_rate: float | None  # target·steps/s of the slice (None without published chip figures)
    limited_by: str  # which roofline term sets the projection
    compile_s: float
    shard_params: bool
    shard_chosen: bool  # the plan turned shard_params on because the weights do not fit replicated
    advice: str  # why it does not fit and what would make it fit ("" when it fits)


@dataclasses.dataclass(frozen=True)
class Plan:
    topology: str
    chips: int
    hosts: int
    hbm_bytes_per_chip: int
    model: str
    dtype: str
    utilisation: float
    methods: dict[str, MethodPlan]
    unplanned: tuple[str, ...] = ()  # methods of the config plans do not cover yet (programs.PLANNED_METHODS)

    @property
    def fits(self) -> bool:
        """Every method is planned and fits."""
        return not self.unplanned and all(m.fits for m in self.methods.values())

    def to_json(self) -> dict:
        return {
            "topology": self.topology, "chips": self.chips, "hbm_bytes_per_chip": self.hbm_bytes_per_chip,
            "model": self.model, "dtype": self.dtype,
            "methods": {
                label: {
                    "fits": m.fits, "slots": m.slots,
                    "per_chip_bytes": {"weights": m.memory.weights, "state": m.memory.state, "temp": m.memory.temp,
                                       "total": m.memory.total},
                    "flops_per_step": m.cost.flops, "projected_target_steps_per_s": m.projected_rate,
                    "compile_s": round(m.compile_s, 2), "shard_params": m.shard_params,
                }
                for label, m in self.methods.items()
            },
        }


def make_plan(config, topology_name: str, lm=None) -> Plan:
    """The plan of `config` on `topology_name` (hardware.known_topologies()); `lm`: the model as shapes (default:
    `loading.load_structure(config.model)`, which reads no weights)."""
    topology = hardware.topology(topology_name)
    if lm is None:
        from distprompt_jax.loading import load_structure

        lm = load_structure(config.model, dtype=config.dtype)
    per_host_targets = math.ceil(programs.target_count(config, lm.vocab_size) / topology.hosts)
    methods = {program.label: plan_method(program, lm, topology, per_host_targets)
               for program in programs.method_programs(config, lm)}
    return Plan(topology=topology.name, chips=topology.chips, hosts=topology.hosts,
                hbm_bytes_per_chip=topology.hbm_bytes_per_chip, model=lm.name, dtype=config.dtype,
                utilisation=ASSUMED_UTILISATION, methods=methods, unplanned=programs.unplanned_methods(config))


def plan_method(program: programs.MethodProgram, lm, topology: hardware.Topology, targets: int) -> MethodPlan:
    """One method's plan on one host of `topology`, for `targets` targets per host."""
    budget = int(topology.hbm_bytes_per_chip * topology.fill)
    devices = topology.devices.shape[1]
    fixed = isinstance(program.slots, int)
    cap = min(program.slots, targets) if fixed else targets
    tried = []
    for shard in (program.shard_params, True) if not program.shard_params else (True,):
        host = Host(topology.devices, lm, program.build, shard)
        tried.append(host)
        if fixed:
            smallest = host.memory(parallel.round_up(max(cap, 1), devices))
            pool = smallest if smallest.total <= budget else None
        else:
            pool, smallest = host.largest_fitting(budget, cap)
        if pool is not None:
            break
    planned = pool or smallest
    cost = host.step_cost(planned.slots)
    fits = pool is not None
    rate, limit = projected_rate(topology, cost, planned.slots) if fits else (None, "")
    return MethodPlan(
        label=program.label, fits=fits, slots=planned.slots * topology.hosts if fits else 0,
        slots_per_host=planned.slots if fits else 0, memory=planned, cost=cost, projected_rate=rate,
        limited_by=limit, compile_s=sum(h.compile_seconds for h in tried), shard_params=host.shard_params,
        shard_chosen=host.shard_params and not program.shard_params,
        advice="" if fits else advice(program, topology, planned, budget, fixed, lm.dtype),
    )


def projected_rate(topology: hardware.Topology, cost: StepCost, slots_per_host: int) -> tuple[float | None, str]:
    """(target·steps/s of the whole slice, the term that limits it): a roofline at `ASSUMED_UTILISATION` of the
    chip's peak flops and HBM bandwidth (XLA's bytes accessed). Traffic between chips (sharded weights, where
    XLA moves activations between a host's chips) is not modelled. None without published figures (`local`)."""
    chip = topology.chip
    if chip is None:
        return None, ""
    terms = {
        "compute": cost.flops / (chip.peak_flops * ASSUMED_UTILISATION),
        "HBM bandwidth": cost.bytes_accessed / (chip.hbm_bandwidth * ASSUMED_UTILISATION),
    }
    limit = max(terms, key=terms.get)
    return slots_per_host * topology.hosts / terms[limit], limit


def advice(program: programs.MethodProgram, topology: hardware.Topology, smallest: PoolMemory, budget: int,
           fixed: bool, dtype) -> str:
    """Why a method does not fit, in bytes per chip, and what would make it fit."""
    def gib(b):
        return f"{b / hardware.GiB:.2f} GiB"

    devices = topology.devices.shape[1]
    section = programs.config_section(program.label)
    if fixed and smallest.slots > devices:
        return (f"{program.label}: {smallest.slots} slots per host need {gib(smallest.total)} per chip, over the "
                f"{gib(budget)} a plan fills; lower config.{section}.slots, or leave it None for the plan to size "
                "the pool")
    said = (f"{program.label}: one slot per chip needs {gib(smallest.total)} per chip (weights "
            f"{gib(smallest.weights)}, sharded over the host's {devices} chips; state {gib(smallest.state)}; "
            f"temporaries {gib(smallest.temp)}), over the {gib(budget)} a plan fills of "
            f"{gib(topology.hbm_bytes_per_chip)}")
    if np.dtype(dtype) == np.float32:
        said += "; bfloat16 weights (config.dtype='bfloat16') would halve the weights"
    return said + ("; shard_params splits the weights over one host's chips only, so chips with more memory, or "
                   "weights sharded across hosts (not built), would make it fit")
