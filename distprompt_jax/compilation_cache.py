"""JAX's persistent compilation cache, on by default for runs of the command line.

Compiling a segment of a real model takes tens of seconds; with the cache a rerun, a resume or the next
experiment on the same model and settings loads the compiled program from disk instead. The cache lives
under the package's cache directory (`DISTPROMPT_JAX_CACHE`, default ~/.cache/distprompt_jax) unless a
directory is given; `DISTPROMPT_JAX_COMPILATION_CACHE=off` (or the CLI's --nocompilation_cache) turns it off.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

from distprompt_jax.checkpoints.cache import cache_dir

ENV = "DISTPROMPT_JAX_COMPILATION_CACHE"


def default_dir() -> Path | None:
    """The cache directory from the environment: None when it says off."""
    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "false", "none"):
        return None
    return Path(value).expanduser() if value else cache_dir() / "jax_compilation"


def enable(directory: str | os.PathLike | None = None, *, min_compile_seconds: float = 0.0) -> Path | None:
    """Use a persistent compilation cache in `directory` (default: `default_dir()`); returns it, or None
    when the environment turned it off. Programs that compile faster than `min_compile_seconds` are not
    stored; by default all are: besides its segments, a command line run compiles ~70 small programs of ~0.1 s
    each (target solves, reductions), and reading those back too took a tiny model's rerun from 21 s to 15 s.
    A directory that cannot be created or written (a read-only cache) leaves the cache off, with a warning:
    compiling again is slower, never wrong."""
    path = Path(directory).expanduser() if directory is not None else default_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        warnings.warn(f"no persistent compilation cache: cannot create {path} ({err.strerror}); programs are "
                      f"compiled afresh (set {ENV} to a writable folder, or to 'off')")
        return None
    if not os.access(path, os.W_OK):
        warnings.warn(f"no persistent compilation cache: {path} is not writable; programs are compiled afresh "
                      f"(set {ENV} to a writable folder, or to 'off')")
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
