"""Host-side float64 work: per-target jobs on a thread pool, with BLAS limited to one thread while they run."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import ThreadpoolController


class HostJobs:
    """Per-target host work on a thread pool: jobs submitted as targets finish, results in row order."""

    def __init__(self, job: Callable[[int, np.ndarray], dict], threads: int | None):
        """`job(row, point)`: one target's work at its float64 point; `threads` None: min(8, CPU count)."""
        self.job = job
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1))
        self.futures: dict[int, tuple[np.ndarray, concurrent.futures.Future]] = {}
        self.seconds = 0.0
        self._lock = threading.Lock()

    def submit(self, rows, points: np.ndarray) -> None:
        for row, point in zip(rows, points):
            self.futures[int(row)] = (np.array(point), self.executor.submit(self._timed, int(row), point))

    def results(self, points: np.ndarray) -> list[dict]:
        """Every row's result for `points` [N, ...] (computing those not submitted with these very points)."""
        try:
            for row, point in enumerate(points):
                held = self.futures.get(row)
                if held is None or not np.array_equal(held[0], point):
                    self.submit([row], [point])
            return [self.futures[row][1].result() for row in range(len(points))]
        finally:
            self.close()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _timed(self, row: int, point: np.ndarray) -> dict:
        start = time.perf_counter()
        with one_blas_thread:
            out = self.job(row, np.asarray(point, np.float64))
        with self._lock:
            self.seconds += time.perf_counter() - start
        return out


class _OneBlasThread:
    """BLAS limited to one thread inside `with one_blas_thread:` (the setting is process-wide, so its users
    are counted and the original limits come back when the last one leaves).

    numpy's OpenBLAS spins its threads while it waits; on a busy or oversubscribed CPU (XLA's own threads
    run the next segment meanwhile) two-thread calls on (d+1)² matrices ran 10-100× slower than one-thread
    calls here (SmolLM2's 577² pseudo-inverse: 1-9 s vs 0.2-0.3 s under load). Parallelism comes from
    certifying several targets at once instead. One thread also makes the results independent of the
    machine's thread count (a multithreaded LAPACK call rounds differently).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._controller: ThreadpoolController | None = None
        self._limits = None

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                self._controller = self._controller or ThreadpoolController()
                self._limits = self._controller.limit(limits=1, user_api="blas")
            self._users += 1

    def __exit__(self, *exc):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._limits.restore_original_limits()


one_blas_thread = _OneBlasThread()
