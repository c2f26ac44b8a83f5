"""How many target rows run at once, and per-row computations on the solver driver.

Target generation runs on the same driver (distprompt_jax.solve) as the prompting methods: the entropy
solver as a Problem of its own (entropy.py), and computations without an iteration of their own —
sampling a context, reading a next-token distribution — as a one-step `RowProblem` here, so that
batching the rows, sharding them over the devices and looping over them live in the driver only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distprompt_jax import parallel
from distprompt_jax.solve import Driver, DriverOptions, Progress

# Rows optimized together. On a CPU the loop is memory-bound: a pool whose float32 logits, gradients and
# Adam moments (~4 arrays [rows, V]) stay in cache runs 2-3x faster per entry than a large one (measured
# on a 2-core EPYC, 32 MiB L3: 2.1 ns per entry-step at 16 rows of 49152, 5-8 ns at 64-256 rows).
# Accelerators want large batches: there the budget is device memory.
CPU_SLOT_BYTES = 16 << 20
ACCELERATOR_SLOT_BYTES = 1 << 30
_BYTES_PER_ENTRY = 4 * 4


def default_slots(vocab_size: int, platform: str | None = None) -> int:
    """Rows computed at once: the largest power of two (8 to 1024) whose working arrays fit the platform's
    budget — 16 rows of 49152 on a CPU, 1024 on an accelerator — with a floor of 8 rows. Deterministic
    (never from the free memory), so a rerun on the same platform computes the same batches."""
    platform = platform or jax.default_backend()
    budget = CPU_SLOT_BYTES if platform == "cpu" else ACCELERATOR_SLOT_BYTES
    rows = max(8, budget // (_BYTES_PER_ENTRY * vocab_size))
    return int(min(1024, 2 ** int(np.log2(rows))))


def slot_count(n_rows: int, slots: int, n_devices: int) -> int:
    """The pool size for n_rows: `slots`, or for fewer rows the next power of two, rounded up to a multiple
    of the device count. Powers of two keep the number of compiled shapes small when many small requests
    come in."""
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    return parallel.round_up(min(int(slots), 1 << max(0, n_rows - 1).bit_length()), n_devices)


class RowState(NamedTuple):
    progress: Progress
    outputs: dict  # zeros until the row's one step computes them


@dataclasses.dataclass(frozen=True)
class RowProblem:
    """A Problem of one step: `function(shared, row) -> {name: array}` computes one row's outputs, and the
    report returns them.

    `function` must be hashable by what it traces (a frozen dataclass, or a module-level function): equal
    functions share their compiled programs. The computation is the step, not the init, because the
    driver compiles init twice (into its start and its refill programs) but the step once (its segment),
    and a model forward is slow to compile; the step also sees the slots sharded over the devices.
    """

    function: Callable[[object, dict], dict]
    outputs: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype) of one row's outputs

    @classmethod
    def of(cls, function, shared, inputs: dict[str, np.ndarray]) -> RowProblem:
        """The problem of `function` on rows like those of `inputs` (its outputs' shapes are found once here
        rather than by tracing the function again in every program that starts a row)."""
        row = {name: jax.ShapeDtypeStruct(np.shape(values)[1:], np.asarray(values).dtype)
               for name, values in inputs.items()}
        shapes = jax.eval_shape(function, shared, row)
        return cls(function, tuple((name, a.shape, np.dtype(a.dtype).name) for name, a in shapes.items()))

    def prepare(self, inputs: dict) -> dict:
        return inputs

    def init(self, shared, row, index, attempt, key) -> RowState:
        return RowState(Progress.start(), {name: jnp.zeros(shape, dtype) for name, shape, dtype in self.outputs})

    def step(self, shared, row, state: RowState) -> RowState:
        done = Progress(steps=state.progress.steps + 1, best=jnp.float32(0), active=jnp.asarray(False))
        return RowState(done, self.function(shared, row))

    def report(self, shared, row, state: RowState) -> dict:
        return state.outputs


def map_rows(
    function: Callable[[object, dict], dict], inputs: dict[str, np.ndarray], *, shared, slots: int,
    devices=None, desc: str = "targets", progress: bool = True,
) -> dict[str, np.ndarray]:
    """{name: [N, ...]}: `function(shared, row)` for every row of `inputs` (numpy arrays, rows first).

    `shared` is the data every row reads (model weights, temperatures: traced, so changing them compiles
    nothing). At most `slots` rows are computed at once (see `slot_count`), split over `devices` (default:
    this process's).
    """
    n = len(next(iter(inputs.values())))
    mesh = parallel.local_mesh(devices)
    size = slot_count(n, slots, mesh.size)
    options = DriverOptions(slots=size, segment_steps=1, compact_tail=False, desc=desc, progress=progress and n > size)
    return Driver(RowProblem.of(function, shared, inputs), shared, options, mesh).run(inputs)
