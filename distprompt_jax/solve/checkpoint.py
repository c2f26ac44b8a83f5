"""Saving and restoring a driver's pool with orbax's CheckpointManager (public API only).

Each process checkpoints its own pool on its own (no barrier with other processes): the manager runs in
orbax's per-process mode, every process the primary of its own directory. A save is atomic (orbax writes
a temporary step directory and renames it when complete), and only the newest `keep` steps are kept, so
a kill at any moment leaves the last complete checkpoint in place.

Each step also records the size and sha256 of its files (`SUMS_FILE`), checked before orbax reads it: a
damaged step is then skipped without orbax failing half-way through its asynchronous reads (which printed a
traceback for each read still in flight once its event loop had closed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from distprompt_jax.checkpoints.cache import file_sha256
from distprompt_jax.files import atomic_write

# In each step's directory, beside orbax's items: {relative path: [size, sha256]} of every file orbax wrote.
SUMS_FILE = "distprompt_sums.json"


class PoolCheckpoint:
    """One pool's checkpoints in `directory` (a process-local directory in multi-host runs)."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        me = jax.process_index()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            enable_per_process_directory_creation=jax.process_count() > 1,
            # Every process is the primary of its own directory, and waits on no other process.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=None if jax.process_count() > 1 else 0, active_processes={me},
                barrier_sync_key_prefix=f"process{me}",
            ),
            # Half-written steps a kill left behind are removed when the manager opens.
            cleanup_tmp_directories=True,
            create=False,  # orbax refuses to create the root with active_processes set: we do
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays, meta: dict) -> None:
        """Arrays (a pytree of numpy/jax arrays) and JSON-able host bookkeeping, as checkpoint `step`.

        A full disk raises OSError(ENOSPC) naming the directory (orbax raises a ValueError from its writer
        thread and logs ~100 lines of traceback, which are kept quiet here: the error says it all). A Ctrl-C
        during the save takes effect once the save is complete (`_interrupts_held`)."""
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.CRITICAL)
        try:
            with _interrupts_held():
                self.manager.save(step, args=ocp.args.Composite(
                    arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta),
                ), force=True)
                self.manager.wait_until_finished()
                sums = json.dumps(_file_sums(self._step_dir(step)))
                atomic_write(self._step_dir(step) / SUMS_FILE, lambda file: file.write(sums.encode()))
        except Exception as err:
            if "No space left on device" in str(err) or getattr(err, "errno", None) == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on the disk of {self.directory} while saving a checkpoint; "
                              "free some space and rerun the same command: the run resumes from its last complete "
                              "checkpoint") from None
            raise
        finally:
            absl_logger.setLevel(level)

    def restore(self, template: Callable[[dict], object]) -> tuple[object, dict] | None:
        """(arrays, meta) of the newest step that reads back whole, or None when there is none.
        `template(meta)` gives the arrays' structure, dtypes and shardings from the step's meta; it raises when
        the checkpoint belongs to another run (that is the caller's error, never a reason to delete it). A
        damaged step is named in a warning and deleted, and the one before it is tried."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            damage = _damage(self._step_dir(step))
            if damage is not None:
                self._discard(step, damage)
                continue
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as err:  # orbax raises many kinds for a damaged file
                self._discard(step, f"{type(err).__name__}: {str(err)[:200]}")
                continue
            structure = template(meta)
            try:
                arrays = self.manager.restore(step, args=ocp.args.Composite(
                    arrays=ocp.args.StandardRestore(structure)))["arrays"]
            except Exception as err:
                self._discard(step, f"{type(err).__name__}: {str(err)[:200]}")
                continue
            return arrays, meta
        return None

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _discard(self, step: int, reason: str) -> None:
        warnings.warn(f"checkpoint {self._step_dir(step)} is damaged ({reason}); deleting it and trying an older one")
        self.manager.delete(step)

    def close(self) -> None:
        self.manager.close()


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT held back until the block ends, then delivered to the handler it would have reached. Interrupted
    mid-save, orbax's writer threads failed at the interpreter's exit ("cannot schedule new futures after
    interpreter shutdown", "Event loop is closed") with tracebacks below the run's own message; a save takes
    well under a second. Signal handlers belong to the main thread: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        if received:
            signal.raise_signal(signal.SIGINT)


def _file_sums(step_dir: Path) -> dict[str, list]:
    return {path.relative_to(step_dir).as_posix(): [path.stat().st_size, file_sha256(path)]
            for path in sorted(step_dir.rglob("*")) if path.is_file() and path.name != SUMS_FILE}


def _damage(step_dir: Path) -> str | None:
    """What differs in a step's files from the sums recorded when it was saved; None when nothing does, or when
    the step records none (saved by an earlier version: orbax's own reading is then the check)."""
    try:
        recorded = json.loads((step_dir / SUMS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"its {SUMS_FILE} is unreadable: {err}"
    for name, (size, sha256) in recorded.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size or file_sha256(path) != sha256:
            return f"{name} differs from what was saved"
    return None
