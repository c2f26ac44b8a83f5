"""Host-side float64 work: per-target jobs on a thread pool, with BLAS kept to one thread while they run."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController


class _OneBlasThread:
    """BLAS limited to one thread while held (`with one_blas_thread:`, or acquire/release). The setting is
    process-wide, so holders are counted and the original limits come back when the last one releases.

    Take and release it on the main thread: OpenBLAS (0.3.30/0.3.31 here) ignores a thread count set from
    a worker thread — measured: set there, neither the worker nor the main thread saw it change.

    Why one thread: numpy's OpenBLAS spins its threads while it waits; on a busy or oversubscribed CPU
    (XLA's own threads run the next segment meanwhile) two-thread calls on (d+1)² matrices ran 10-100×
    slower than one-thread calls here (SmolLM2's 577² pseudo-inverse: 1-9 s vs 0.2-0.3 s under load, a
    certificate 2-12 s vs 0.12 s). Parallelism comes from certifying several targets at once instead. One
    thread also makes results independent of the machine's thread count (threaded LAPACK rounds otherwise).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._controller: ThreadpoolController | None = None
        self._limits = None

    def acquire(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._controller = self._controller or ThreadpoolController()
                self._limits = self._controller.limit(limits=1, user_api="blas")
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._limits.restore_original_limits()

    def __enter__(self):
        self.acquire()

    def __exit__(self, *exc):
        self.release()


one_blas_thread = _OneBlasThread()


class HostJobs:
    """Per-target host work on a thread pool: jobs submitted as targets finish, results in row order.

    Created, fed and closed on the main thread (as the driver's `on_finished` and a method's `columns`
    run); it holds `one_blas_thread` from creation to `close`. A run interrupted before `close` keeps BLAS
    at one thread until its owner closes it (a method's next run does).
    """

    def __init__(self, job: Callable[[int, np.ndarray, Any], dict], threads: int | None, *,
                 prepare: Callable[[np.ndarray, np.ndarray], list] | None = None):
        """`job(row, point, prepared)`: one target's work at its float64 point; `prepare(rows, points)`: what
        the jobs of a batch of targets share, computed at once on the calling thread (one item per row);
        `threads` None: min(8, CPU count)."""
        self.job, self.prepare = job, prepare
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1))
        self.futures: dict[int, tuple[np.ndarray, concurrent.futures.Future]] = {}
        self.seconds = 0.0
        self._lock = threading.Lock()
        one_blas_thread.acquire()
        self._open = True

    def submit(self, rows: np.ndarray, points: np.ndarray) -> None:
        """Start the jobs of targets `rows` at `points` [len(rows), ...]."""
        rows, points = np.asarray(rows, np.int64), np.asarray(points, np.float64)
        start = time.perf_counter()
        prepared = self.prepare(rows, points) if self.prepare is not None else [None] * len(rows)
        self._count(time.perf_counter() - start)
        for row, point, extra in zip(rows, points, prepared):
            self.futures[int(row)] = (point, self.executor.submit(self._timed, int(row), point, extra))

    def results(self, points: np.ndarray) -> list[dict]:
        """Every row's result for `points` [N, ...] (computing those not submitted with these very points)."""
        try:
            missing = [row for row, point in enumerate(np.asarray(points, np.float64))
                       if row not in self.futures or not np.array_equal(self.futures[row][0], point)]
            if missing:
                self.submit(np.asarray(missing), np.asarray(points)[missing])
            return [self.futures[row][1].result() for row in range(len(points))]
        finally:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.executor.shutdown(wait=True, cancel_futures=True)
            one_blas_thread.release()

    def _timed(self, row: int, point: np.ndarray, prepared) -> dict:
        start = time.perf_counter()
        out = self.job(row, point, prepared)
        self._count(time.perf_counter() - start)
        return out

    def _count(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds
