"""The one driver that runs many independent per-target problems at once.

The pool: `slots` per-target states advance together in one compiled segment (a `while_loop` of up to
`segment_steps` steps; finished slots are frozen). Between segments the host takes the results of slots
that finished, and refills those slots with waiting work, so a run never computes a finished target while
others still run. A unit of work is a job (target, attempt): restarts are more jobs of the same target,
and the best attempt (lowest `Progress.best`) is kept.

What is decided here, once, for every method: slot count, refilling, the slot axis sharded over this
process's devices (`NamedSharding`), the compile cache, progress, and checkpoint/restore of the whole
pool. With `compact_tail`, once no work waits and at most half the slots still run, the running slots are
gathered into a pool half as large (again and again, down to the device count): on a CPU a step costs in
proportion to the slots, so the tail of a run stops computing idle ones (each new pool size compiles once).
Determinism: the job order, the slot count and the compaction points are fixed by the inputs and options,
so the same run on the same hardware and device count gives bitwise the same results, resumed or not.
Across slot counts or device counts a target's float32 trajectory can differ (batched matmuls round
differently per shape).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from distprompt_jax import parallel
from distprompt_jax.field_types import check_field_types
from distprompt_jax.solve.checkpoint import PoolCheckpoint
from distprompt_jax.solve.problem import Problem, select

# Compiled functions of the most recent problems. A problem is a frozen dataclass of exactly what enters
# tracing, so equal problems share their compiled programs across calls (compiling a segment is most of a
# small run's time).
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_KEEP = 16
_OBJECTIVE = "__objective__"
REPORT_ROWS = 16  # finished slots reported per call (fewer slots: all of them)


@dataclasses.dataclass(frozen=True)
class DriverOptions:
    """How a pool runs. None of these enters tracing: they are data or host-side choices."""

    slots: int = 32  # per-target states computed together (a multiple of the device count is used)
    segment_steps: int = 10  # most steps per compiled call (progress and checkpoint granularity)
    # A segment ends early, so that finished targets' slots are refilled at once, when this many slots have
    # finished in it while work is waiting (None: a sixteenth of the slots, at least one).
    refill_at: int | None = None
    attempts: int = 1  # attempts (restarts) per target at most; the best is kept
    # A target's next attempt runs only while its best is more than this above its floor (`Driver.run`'s
    # `floors`: a proven lower bound, or 0): targets already at their floor stop. None: every attempt runs.
    retry_above: float | None = None
    # Halve the pool while no work waits and at most half its slots run (see the module docstring). It pays
    # where a step's cost grows with the slots and a run's tail is long against a compile: None turns it on
    # for CPU devices (an accelerator's step costs about the same with fewer slots). Problems of one-step
    # jobs turn it off (their last batch would compile a smaller program to save part of one step).
    compact_tail: bool | None = None
    seed: int = 0
    checkpoint_every: int = 4  # segments between checkpoints (when a checkpoint directory is given)
    desc: str = "targets"
    progress: bool = True

    def __post_init__(self):
        check_field_types(self)

    def validate(self) -> None:
        if self.refill_at is not None and self.refill_at < 1:
            raise ValueError(f"DriverOptions: refill_at must be a positive integer or None, got {self.refill_at!r}")
        if self.retry_above is not None and not (np.isfinite(self.retry_above) and self.retry_above >= 0):
            raise ValueError(
                f"DriverOptions: retry_above must be a non-negative number or None, got {self.retry_above!r}")
        for name in ("slots", "segment_steps", "attempts", "checkpoint_every"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"DriverOptions: {name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    """What a caller sees after each segment (for logs, progress and metrics)."""

    segment: int
    steps: int  # steps this segment ran
    active: int  # slots still running after it
    finished: int  # targets with every attempt done
    n_targets: int
    slots: int  # the pool's size in this segment (less than the option once the tail is compacted)
    mean_best: float  # over the running slots (nan when none)
    median_best: float
    target_steps: int  # useful steps so far: steps of running targets, summed
    slot_steps: int  # steps times slots so far: what was computed
    seconds: float  # wall time of the segments so far


@dataclasses.dataclass
class RunStats:
    segments: int = 0
    target_steps: int = 0
    slot_steps: int = 0
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Compiled:
    prepare: Callable
    start: Callable
    refill: Callable
    segment: Callable
    report: Callable
    step: Callable  # one step of the whole pool: a segment's loop body, on its own (for cost analysis)


def compiled(problem: Problem, sharding: jax.sharding.NamedSharding | None = None) -> Compiled:
    """The jitted functions of `problem` for a pool placed with `sharding` (the slot axis split over its mesh),
    cached by both. Every function returns the pool in that placement, so a segment sees the same input shardings
    whichever function made its pool and compiles once (left to XLA's propagation, `start`'s and `refill`'s
    outputs came back in different shardings — optimizer moments replicated, say — and each compiled a segment of
    its own). None (one device, a benchmark's direct call): placement is left to XLA."""
    key = (problem, sharding)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]

    def fresh(params, inputs, seed, index, attempt):
        targets = jax.vmap(problem.prepare)(inputs)
        base = jax.random.key(seed)
        keys = jax.vmap(lambda a, i: jax.random.fold_in(jax.random.fold_in(base, a), i))(attempt, index)
        states = jax.vmap(problem.init, in_axes=(None, 0, 0, 0, 0))(params, targets, index, attempt, keys)
        return targets, states

    def start(params, inputs, seed, index, attempt, occupied):
        targets, states = fresh(params, inputs, seed, index, attempt)
        return targets, _with_active(states, states.progress.active & occupied)

    def refill(params, targets, states, inputs, seed, index, attempt, take, occupied):
        # Every slot is initialized, the new jobs' taken: an init at the pool's own shape gives a job the
        # same start bitwise however many slots refill at once (a smaller batch rounds its matmuls
        # differently), so a target's result does not depend on the other targets or the process split.
        new_targets, new_states = fresh(params, inputs, seed, index, attempt)
        targets, states = select(take, new_targets, targets), select(take, new_states, states)
        return targets, _with_active(states, states.progress.active & occupied)

    def pool_step(params, targets, states):
        """One step of every running slot; finished slots stay as they are."""
        stepped = jax.vmap(problem.step, in_axes=(None, 0, 0))(params, targets, states)
        return select(states.progress.active, stepped, states)

    def segment(params, targets, states, stop_after, num_steps):
        """Up to num_steps steps; stops early once `stop_after` slots have finished (data, not traced in)."""
        running_at_start = states.progress.active

        def body(carry):
            i, s = carry
            return i + 1, pool_step(params, targets, s)

        def more(carry):
            i, s = carry
            freed = jnp.sum(running_at_start & ~s.progress.active)
            return (i < num_steps) & jnp.any(s.progress.active) & (freed < stop_after)

        ran, states = jax.lax.while_loop(more, body, (jnp.int32(0), states))
        return states, ran

    def report(params, targets, states, rows):
        def pick(tree):
            return jax.tree.map(lambda a: a[rows], tree)

        out = jax.vmap(problem.report, in_axes=(None, 0, 0))(params, pick(targets), pick(states))
        return dict(out) | {_OBJECTIVE: states.progress.best[rows]}

    pool = {} if sharding is None else {"out_shardings": sharding}
    # The segment's second output, the steps it ran, is a scalar: replicated.
    segment_out = {} if sharding is None else {
        "out_shardings": (sharding, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))}
    entry = Compiled(
        prepare=jax.jit(jax.vmap(problem.prepare)), start=jax.jit(start, **pool), refill=jax.jit(refill, **pool),
        segment=jax.jit(segment, static_argnames="num_steps", donate_argnums=2, **segment_out),
        report=jax.jit(report), step=jax.jit(pool_step, **pool),
    )
    _COMPILED[key] = entry
    if len(_COMPILED) > _COMPILED_KEEP:
        _COMPILED.popitem(last=False)
    return entry


def progress_postfix(info: SegmentInfo, finished_best: np.ndarray) -> dict[str, object]:
    """What the progress bar shows after a segment: the running slots, the mean best objective over those that
    have one, and the mean over finished targets. A mean with nothing to average is left out (between segments
    every running slot may have just started, and at the end none runs), never shown as nan."""
    postfix: dict[str, object] = {"active": info.active}
    if np.isfinite(info.mean_best):
        postfix["mean_best"] = f"{info.mean_best:.4g}"
    finished_best = finished_best[np.isfinite(finished_best)]
    if len(finished_best):
        postfix["mean_done"] = f"{finished_best.mean():.4g}"
    return postfix


def abstract_pool(problem: Problem, params, example_inputs: dict, size: int, sharding) -> tuple[dict, object, object]:
    """(inputs, targets, states) of a pool of `size` slots as ShapeDtypeStructs placed with `sharding` (the
    slot axis split as a run places it): nothing is computed. `example_inputs` holds one target's inputs (arrays
    or ShapeDtypeStructs without the slot axis); the driver's `floor` input is added."""

    def placed(shape, dtype):
        return jax.ShapeDtypeStruct((size,) + tuple(shape), dtype, sharding=sharding)

    example = dict(example_inputs) | {"floor": jax.ShapeDtypeStruct((), np.float32)}
    inputs = {name: placed(np.shape(v), v.dtype) for name, v in example.items()}
    index = placed((), np.int32)
    targets, states = jax.eval_shape(compiled(problem, sharding).start, params, inputs, np.uint32(0), index, index,
                                     placed((), bool))
    def as_placed(tree):
        return jax.tree.map(lambda a: placed(a.shape[1:], a.dtype), tree)

    return inputs, as_placed(targets), as_placed(states)


def lower_segment(problem: Problem, params, example_inputs: dict, size: int, sharding, num_steps: int = 1):
    """The compiled-to-be segment a Driver runs for a pool of `size` slots (`jax.stages.Lowered`), from shapes
    alone: `params` may be ShapeDtypeStructs carrying their shardings (a plan for hardware not at hand)."""
    _, targets, states = abstract_pool(problem, params, example_inputs, size, sharding)
    return compiled(problem, sharding).segment.lower(params, targets, states, np.int32(1), num_steps=num_steps)


def lower_refill(problem: Problem, params, example_inputs: dict, size: int, sharding):
    """The refill (every slot's init, the new jobs' taken) of a pool of `size` slots, lowered from shapes."""
    inputs, targets, states = abstract_pool(problem, params, example_inputs, size, sharding)
    def slot(dtype):
        return jax.ShapeDtypeStruct((size,), dtype, sharding=sharding)

    return compiled(problem, sharding).refill.lower(params, targets, states, inputs, np.uint32(0), slot(np.int32),
                                                    slot(np.int32), slot(bool), slot(bool))


def lower_step(problem: Problem, params, example_inputs: dict, size: int, sharding):
    """One step of a pool of `size` slots (a segment's loop body), lowered from shapes: what a step costs."""
    _, targets, states = abstract_pool(problem, params, example_inputs, size, sharding)
    return compiled(problem, sharding).step.lower(params, targets, states)


def with_floors(inputs: dict[str, np.ndarray], floors: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """The problem's inputs with the driver's `floor` input added, and the floors as float64 [N] (given ones,
    NaN read as 0 (unknown), or zeros)."""
    n = len(next(iter(inputs.values())))
    floors = np.zeros(n) if floors is None else np.nan_to_num(np.asarray(floors, np.float64), nan=0.0)
    if floors.shape != (n,):
        raise ValueError(f"floors has shape {floors.shape}; expected one per target, ({n},)")
    return inputs | {"floor": floors.astype(np.float32)}, floors


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows` padded to `size` by repeating the first (one compiled shape; a repeat is harmless)."""
    return np.concatenate([rows, np.repeat(rows[:1], size - len(rows))]).astype(np.int32)


def _state_layout(states) -> list[str]:
    """Each leaf of a pool's states as "path shape dtype", without the slot axis: what a checkpoint must match to
    be restored into them."""
    return [f"{jax.tree_util.keystr(path)} {tuple(leaf.shape[1:])} {np.dtype(leaf.dtype).name}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(states)]


def _with_active(states, active):
    return states._replace(progress=states.progress._replace(active=active))


class Driver:
    """Runs one problem over many targets: `Driver(problem, params, options, mesh).run(inputs)`."""

    def __init__(self, problem: Problem, params, options: DriverOptions, mesh):
        options.validate()
        self.problem, self.params, self.options, self.mesh = problem, params, options, mesh
        self.slots = parallel.round_up(options.slots, mesh.size)
        self.refill_at = options.refill_at or max(1, self.slots // 16)
        self.compact_tail = (mesh.devices.flat[0].platform == "cpu" if options.compact_tail is None
                             else options.compact_tail)
        self.sharding = parallel.target_sharding(mesh)
        self.functions = compiled(problem, self.sharding)
        self.stats = RunStats()

    def run(
        self, inputs: dict[str, np.ndarray], *, first_index: int = 0, checkpoint: PoolCheckpoint | None = None,
        on_segment: Callable[[SegmentInfo], None] | None = None,
        on_finished: Callable[[np.ndarray, dict[str, np.ndarray]], None] | None = None,
        floors: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The report of each target's best attempt: {name: array [N, ...]} in input order.

        `inputs` hold one row per target (numpy, first axis N); `first_index` is the first row's index in
        the whole target set (keys and inits depend on it, so a process's share gives the rows it would in
        a one-process run). With `checkpoint`, the pool is saved every `checkpoint_every` segments and a
        run finds and continues the latest save.

        `on_finished(rows, reports)` is told of targets whose every attempt is done (row indices into
        `inputs`, and their best reports), while the next segment computes — for host work on results such
        as certificates. After a restore it is first told of every target finished before the save.

        `floors` [N]: a proven lower bound on each target's objective (default 0; NaN means unknown, 0). The
        problem sees it as `inputs["floor"]` (a target may stop once it is close enough), the driver uses it
        for `retry_above`.
        """
        n = len(next(iter(inputs.values())))
        inputs, floors = with_floors(inputs, floors)
        pool = _Pool(self, inputs, n, first_index, on_finished, floors)
        if n == 0:
            return pool.results
        if checkpoint is not None and pool.restore(checkpoint):
            pool.announce(np.flatnonzero(pool.done))
        else:
            pool.begin()
        bar = tqdm(total=n, initial=pool.targets_done(), desc=self.options.desc, unit="target",
                   disable=not self.options.progress)
        while pool.has_work():
            started = time.perf_counter()
            ran = pool.advance()
            done_before = pool.targets_done()
            pool.collect()
            pool.refill()
            self.stats.seconds += time.perf_counter() - started
            self.stats.segments += 1
            info = pool.info(ran)  # of the pool this segment ran in
            pool.compact()
            bar.update(pool.targets_done() - done_before)
            bar.set_postfix(progress_postfix(info, pool.best[pool.done]))
            if checkpoint is not None and self.stats.segments % self.options.checkpoint_every == 0 and pool.has_work():
                pool.save(checkpoint)
            if on_segment is not None:
                on_segment(info)
        pool.announce_pending()
        bar.close()
        return pool.results


class _Pool:
    """The host's view of a run: which job each slot holds, the queue, and the results so far."""

    def __init__(self, driver: Driver, inputs: dict[str, np.ndarray], n: int, first_index: int, on_finished,
                 floors: np.ndarray):
        self.driver, self.inputs, self.n, self.first_index = driver, inputs, n, first_index
        self.on_finished, self.floors = on_finished, floors
        self.pending = []  # targets finished since on_finished was last told
        # Jobs in order: every target's first attempt; a further attempt joins the queue when the previous
        # one finishes (and the target still needs it), so restarts never hold back first results.
        self.queue = collections.deque((t, 0) for t in range(n))
        self.size = driver.slots  # the pool's current size: `slots`, or less once the tail is compacted
        self.slot_target = np.full(self.size, -1, np.int64)
        self.slot_attempt = np.zeros(self.size, np.int64)
        self.attempts_done = np.zeros(n, np.int64)
        self.done = np.zeros(n, bool)  # every attempt the target gets is done
        self.best = np.full(n, np.inf, np.float64)
        self.results = self._empty_results()
        self.targets = self.states = None

    def _abstract_pool(self, size: int):
        """(targets, states) of a pool of `size` slots as shapes and dtypes (nothing runs)."""
        example = {name: jax.ShapeDtypeStruct(values.shape[1:], values.dtype) for name, values in self.inputs.items()}
        _, targets, states = abstract_pool(self.driver.problem, self.driver.params, example, size,
                                           self.driver.sharding)
        return targets, states

    def _empty_results(self) -> dict[str, np.ndarray]:
        """Zeroed result arrays [n, ...] shaped as a target's report, found without running anything."""
        abstract = jax.eval_shape(lambda: self.driver.functions.report(
            self.driver.params, *self._abstract_pool(self.size), np.zeros(1, np.int32)))
        return {name: np.zeros((self.n,) + a.shape[1:], a.dtype) for name, a in abstract.items() if name != _OBJECTIVE}

    def _slot_inputs(self, rows: np.ndarray) -> dict:
        return {name: jax.device_put(np.asarray(values[rows]), self.driver.sharding)
                for name, values in self.inputs.items()}

    def _slot_data(self):
        occupied = self.slot_target >= 0
        rows = np.where(occupied, self.slot_target, 0)
        def put(x, dtype):
            return jax.device_put(np.asarray(x, dtype), self.driver.sharding)

        return (self._slot_inputs(rows), np.uint32(self.driver.options.seed),
                put(self.first_index + rows, np.int32), put(self.slot_attempt, np.int32), put(occupied, bool))

    def _assign(self, free: np.ndarray) -> np.ndarray:
        """Give waiting jobs to free slots, in order; returns the mask of slots that took one."""
        take = np.zeros(self.size, bool)
        for slot in free:
            if not self.queue:
                break
            target, attempt = self.queue.popleft()
            self.slot_target[slot], self.slot_attempt[slot] = target, attempt
            take[slot] = True
        return take

    def begin(self):
        self._assign(np.arange(self.size))
        inputs, seed, index, attempt, occupied = self._slot_data()
        self.targets, self.states = self.driver.functions.start(
            self.driver.params, inputs, seed, index, attempt, occupied)

    def has_work(self) -> bool:
        return bool((self.slot_target >= 0).any() or self.queue)

    def targets_done(self) -> int:
        return int(np.sum(self.done))

    def _wants_another(self, target: int) -> bool:
        options = self.driver.options
        if self.attempts_done[target] >= options.attempts:
            return False
        return options.retry_above is None or self.best[target] > self.floors[target] + options.retry_above

    def advance(self) -> int:
        d = self.driver
        before = np.asarray(self.states.progress.steps)  # the states are donated to the segment
        # With nothing left to give freed slots, the segment runs its full length.
        stop_after = np.int32(d.refill_at if self.queue else self.size + 1)
        self.states, ran = d.functions.segment(d.params, self.targets, self.states, stop_after,
                                              num_steps=d.options.segment_steps)
        self.announce_pending()  # host work overlaps the segment, which runs asynchronously
        ran = int(ran)
        d.stats.slot_steps += ran * self.size
        d.stats.target_steps += int(np.sum(np.asarray(self.states.progress.steps) - before))
        return ran

    def collect(self):
        """Record the reports of slots whose attempt finished, and free those slots."""
        active = np.asarray(self.states.progress.active)
        finished = np.flatnonzero((self.slot_target >= 0) & ~active)
        if not len(finished):
            return
        out = self._reports(finished)
        for i, slot in enumerate(finished):
            target = self.slot_target[slot]
            objective = float(out[_OBJECTIVE][i])
            if self.attempts_done[target] == 0 or objective < self.best[target]:
                self.best[target] = objective
                for name, values in self.results.items():
                    values[target] = out[name][i]
            self.attempts_done[target] += 1
            if self._wants_another(target):
                self.queue.append((int(target), int(self.attempts_done[target])))
            else:
                self.done[target] = True
                self.pending.append(target)
        self.slot_target[finished] = -1

    def _reports(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """The reports of `slots`, in padded batches of one size: a pool compiles one report program (a batch of
        each size that finished compiled up to log2(slots) + 1), and a segment computes at most REPORT_ROWS - 1
        reports in vain, beside its slots x segment_steps steps."""
        d = self.driver
        size = min(REPORT_ROWS, d.slots)
        chunks = [slots[i : i + size] for i in range(0, len(slots), size)]
        batches = [jax.device_get(d.functions.report(d.params, self.targets, self.states, _padded(chunk, size)))
                   for chunk in chunks]
        return {name: np.concatenate([batch[name][: len(chunk)] for batch, chunk in zip(batches, chunks)])
                for name in batches[0]}

    def announce_pending(self):
        rows, self.pending = np.asarray(self.pending, np.int64), []
        self.announce(rows)

    def announce(self, rows: np.ndarray):
        if self.on_finished is not None and len(rows):
            self.on_finished(rows, {name: values[rows] for name, values in self.results.items()})

    def refill(self):
        free = np.flatnonzero(self.slot_target < 0)
        if not len(free) or not self.queue:  # slots left without work stay frozen
            return
        take = jax.device_put(self._assign(free), self.driver.sharding)
        inputs, seed, index, attempt, occupied = self._slot_data()
        self.targets, self.states = self.driver.functions.refill(
            self.driver.params, self.targets, self.states, inputs, seed, index, attempt, take, occupied)

    def compact(self):
        """With `compact_tail`: while no work waits and at most half the slots run, move the running slots
        into a pool half the size (a multiple of the devices); their states move unchanged."""
        d = self.driver
        if not d.compact_tail or self.queue:
            return
        running = int(np.sum(self.slot_target >= 0))
        size = self.size
        while size % 2 == 0 and size // 2 >= max(running, 1) and (size // 2) % d.mesh.size == 0:
            size //= 2
        if size == self.size:
            return
        occupied = np.flatnonzero(self.slot_target >= 0)
        spare = np.flatnonzero(self.slot_target < 0)[: size - len(occupied)]  # frozen slots fill the rest
        rows = np.sort(np.concatenate([occupied, spare]))
        gather = jax.device_put(rows.astype(np.int32), d.sharding)
        def pick(tree):
            return jax.device_put(jax.tree.map(lambda a: a[gather], tree), d.sharding)

        self.targets, self.states = pick(self.targets), pick(self.states)
        self.slot_target, self.slot_attempt = self.slot_target[rows], self.slot_attempt[rows]
        self.size = size

    def info(self, ran: int) -> SegmentInfo:
        d = self.driver
        running = np.asarray(self.states.progress.active) & (self.slot_target >= 0)
        best = np.asarray(self.states.progress.best)[running]
        best = best[np.isfinite(best)]
        return SegmentInfo(
            segment=d.stats.segments, steps=ran, active=int(running.sum()), finished=self.targets_done(),
            n_targets=self.n, slots=self.size, mean_best=float(best.mean()) if len(best) else float("nan"),
            median_best=float(np.median(best)) if len(best) else float("nan"),
            target_steps=d.stats.target_steps, slot_steps=d.stats.slot_steps, seconds=d.stats.seconds,
        )

    # -- checkpoints --------------------------------------------------------------------------------------

    def save(self, checkpoint: PoolCheckpoint):
        d = self.driver
        # On the host: orbax cannot write process-local device arrays in a multi-host run, and the pool's
        # states are small beside the model.
        arrays = {"states": jax.device_get(self.states), "results": self.results, "best": self.best,
                  "attempts_done": self.attempts_done, "done": self.done}
        meta = {
            "slots": d.slots, "size": self.size, "n": self.n, "first_index": self.first_index,
            "attempts": d.options.attempts,
            "slot_target": self.slot_target.tolist(), "slot_attempt": self.slot_attempt.tolist(),
            "queue": [list(job) for job in self.queue],
            "stats": dataclasses.asdict(d.stats),
            "state_layout": _state_layout(self.states),
        }
        checkpoint.save(d.stats.segments, arrays, meta)

    def restore(self, checkpoint: PoolCheckpoint) -> bool:
        """Continue from the checkpoint's newest good step; False when it has none."""
        if checkpoint.latest() is None:
            return False
        d = self.driver
        expected = {"slots": d.slots, "n": self.n, "first_index": self.first_index, "attempts": d.options.attempts}

        def template(meta) -> dict:
            held = {k: meta.get(k) for k in expected}
            if held != expected:
                raise ValueError(f"{checkpoint.directory} holds a pool of {held}, not of {expected}: it belongs to "
                                 "another run (or another slot count); use that run's settings or a new directory")
            # The states' structure at the saved pool's size (only shapes and dtypes are read).
            _, abstract = self._abstract_pool(meta.get("size", d.slots))
            # A state of another layout (another version of the problem) is not damage: refuse, never delete.
            saved, layout = meta.get("state_layout"), _state_layout(abstract)
            if saved is not None and saved != layout:
                differ = sorted(set(saved) ^ set(layout))
                raise ValueError(f"{checkpoint.directory} holds search states of another layout (differing: "
                                 f"{differ}): it was written by another version of this method; resume it with "
                                 "that version, or use a new directory")
            return {
                "states": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract),
                "results": self.results, "best": self.best, "attempts_done": self.attempts_done, "done": self.done,
            }

        restored = checkpoint.restore(template)
        if restored is None:
            return False
        arrays, meta = restored
        self.slot_target = np.asarray(meta["slot_target"], np.int64)
        self.slot_attempt = np.asarray(meta["slot_attempt"], np.int64)
        self.size = len(self.slot_target)
        self.queue = collections.deque(tuple(job) for job in meta["queue"])
        self.results = {k: np.asarray(v) for k, v in arrays["results"].items()}
        self.best = np.asarray(arrays["best"])
        self.attempts_done = np.asarray(arrays["attempts_done"])
        self.done = np.asarray(arrays["done"])
        d.stats = RunStats(**meta["stats"])
        occupied = self.slot_target >= 0
        rows = np.where(occupied, self.slot_target, 0)
        self.targets = d.functions.prepare(self._slot_inputs(rows))
        self.states = jax.device_put(arrays["states"], d.sharding)
        return True
