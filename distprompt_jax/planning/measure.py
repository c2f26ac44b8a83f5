"""What one method's pool costs per chip, from compiled programs: memory, slots, flops and bytes.

Memory is XLA's memory analysis of the programs a run executes at a pool size (the segment, whose states are
donated, and the refill, which holds old and new states at once): per device, the weights (their shards), the
pool's state (targets and per-target states), and everything else at the larger program's peak (temporaries).

What a step costs is counted, not read off once: XLA's cost analysis counts a loop body once, and a step runs
the model's layers in a scan. The step (a segment's loop body, compiled on its own) is compiled for the same
model with one layer and with none: the difference is one layer's cost, and a step of n layers costs the
zero-layer program plus n times that. (The zero-layer model has learned positions in place of rotary ones:
one [L, d] addition, counted against the layers, ~1e-7 of a step.)
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distprompt_jax import parallel
from distprompt_jax.lm import DTYPES, LanguageModel, abstract_language_model
from distprompt_jax.solve import lower_refill, lower_segment, lower_step

# Compiles a slot search may spend after its two probes (an estimate, then bisection).
SEARCH_TRIES = 5


@dataclasses.dataclass(frozen=True)
class PoolMemory:
    """Bytes per device of a pool of `slots` slots on one host."""

    slots: int
    weights: int
    state: int
    temp: int

    @property
    def total(self) -> int:
        return self.weights + self.state + self.temp


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One step of a pool, per device: flops and bytes accessed (XLA's counts, layers counted n times)."""

    flops: float
    bytes_accessed: float


class Host:
    """A topology's devices laid out as [hosts, chips per host] (hardware.Topology), a method's pool split over all
    of them and its weights replicated over the hosts (split over a host's chips with shard_params), as each
    process of a run places them on its own chips; compiles the method's programs. Slot counts are per host."""

    HOSTS_AXIS = "hosts"

    def __init__(self, devices: np.ndarray, lm: LanguageModel, build, shard_params: bool):
        self.mesh = Mesh(devices, (self.HOSTS_AXIS, parallel.TARGET_AXIS))
        self.hosts, self.per_host = devices.shape
        self.sharding = NamedSharding(self.mesh, PartitionSpec((self.HOSTS_AXIS, parallel.TARGET_AXIS)))
        self.lm, self.build, self.shard_params = lm, build, shard_params
        self.compile_seconds = 0.0

    def placed_params(self, lm: LanguageModel):
        shardings = parallel.param_shardings(lm.params, self.mesh, self.shard_params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), lm.params, shardings)

    def weight_bytes(self) -> int:
        """Bytes of weights one device holds."""
        params = self.placed_params(self.lm)
        return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(params))

    def _compile(self, lowered):
        started = time.perf_counter()
        result = lowered.compile()
        self.compile_seconds += time.perf_counter() - started
        return result

    def memory(self, slots: int) -> PoolMemory:
        """Per chip, a pool of `slots` slots on every host."""
        problem, inputs = self.build(self.lm)
        params = self.placed_params(self.lm)
        weights = self.weight_bytes()
        # A run holds every weight on the devices, while a program's arguments are only those it reads (jit
        # drops unused ones: the bound reads the unembedding alone). So a program's peak is counted as all the
        # weights plus its own other arguments, outputs not aliased to them, and temporaries.
        peak, state = 0, None
        for lower in (lower_segment, lower_refill):
            lowered = lower(problem, params, inputs, slots * self.hosts, self.sharding)
            pool_args = sum(self._device_bytes(arg) for arg in jax.tree.leaves(lowered.args_info[0][1:]))
            state = pool_args if state is None else state  # the segment's: the pool's targets and states
            try:
                m = self._compile(lowered).memory_analysis()
            except jax.errors.JaxRuntimeError as err:  # the TPU compiler refuses a program larger than its HBM
                peak = max(peak, pool_args + exhausted_temporaries(str(err)))
                continue
            peak = max(peak, pool_args + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
        return PoolMemory(slots=slots, weights=weights, state=state, temp=peak - state)

    def _device_bytes(self, arg) -> int:
        """Bytes one device holds of a pool argument: the driver splits every pool array over its slot axis."""
        shape = tuple(arg.shape)
        if shape:
            shape = (shape[0] // self.mesh.size,) + shape[1:]
        return math.prod(shape) * np.dtype(arg.dtype).itemsize

    def step_cost(self, slots: int) -> StepCost:
        costs = []
        for n_layers in (0, 1):
            lm = with_layers(self.lm, n_layers)
            problem, inputs = self.build(lm)
            lowered = lower_step(problem, self.placed_params(lm), inputs, slots * self.hosts, self.sharding)
            analysis = self._compile(lowered).cost_analysis() or {}
            costs.append((analysis.get("flops", 0.0), analysis.get("bytes accessed", 0.0)))
        (flops0, bytes0), (flops1, bytes1) = costs
        n = self.lm.n_layers
        return StepCost(flops=flops0 + n * (flops1 - flops0), bytes_accessed=bytes0 + n * (bytes1 - bytes0))

    def largest_fitting(self, budget: int, cap: int) -> tuple[PoolMemory | None, PoolMemory]:
        """(the largest pool per host, a multiple of a host's chips and at most `cap` rounded up to them, whose
        compiled total fits `budget` bytes per chip, or None when not even one slot per chip does; the smallest).

        Memory grows about linearly in the slots, with steps where XLA changes a program's layout: two probes (one
        and two slots per chip) give a linear estimate, then compiled sizes decide, bisecting between the largest
        pool that fitted and the smallest that did not, `SEARCH_TRIES` compiles at most."""
        step = self.per_host
        smallest = self.memory(step)
        if smallest.total > budget:
            return None, smallest
        most = parallel.round_up(max(cap, 1), step)
        if most == step:
            return smallest, smallest
        best = self.memory(2 * step)
        if best.total > budget:
            return smallest, smallest
        per_slot = max(1.0, (best.total - smallest.total) / step)
        slots = min(most, step + int((budget - smallest.total) / per_slot) // step * step)
        too_many = most + step  # the smallest pool known not to fit (none yet: past the cap)
        for _ in range(SEARCH_TRIES):
            if slots <= best.slots or slots >= too_many:
                break
            tried = self.memory(slots)
            if tried.total <= budget:
                best = tried
                slots = min(most, (slots + too_many) // 2 // step * step)
            else:
                too_many = slots
                slots = (best.slots + slots) // 2 // step * step
        return best, smallest


def exhausted_temporaries(message: str) -> int:
    """The temporaries' bytes a TPU compile refused as out of memory ("RESOURCE_EXHAUSTED: Ran out of memory in
    memory space hbm ... HLO temporaries (24.51G) exceeds ..."); other errors are raised again."""
    found = re.search(r"RESOURCE_EXHAUSTED.*?temporaries \((\d+(?:\.\d+)?)([KMGT])\)", message, re.S)
    if found is None:
        raise jax.errors.JaxRuntimeError(message)
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))


def with_layers(lm: LanguageModel, n_layers: int) -> LanguageModel:
    """lm's architecture cut to its first `n_layers` layers, as shapes (see the module docstring for 0)."""
    cfg = lm.config
    cut = dataclasses.replace(cfg, n_layers=n_layers, rope=cfg.rope[:n_layers],
                              sliding_window=cfg.sliding_window[:n_layers])
    dtype = next(name for name, dtype in DTYPES.items() if np.dtype(dtype) == np.dtype(lm.dtype))
    return dataclasses.replace(abstract_language_model(cut, dtype, lm.name), tokenizer=lm.tokenizer)
