"""Our on-disk cache: where it lives, what in it we made, and what a crash left behind.

Cache root: $DISTPROMPT_JAX_CACHE, else ~/.cache/distprompt_jax. Everything is written under a scratch name
(`<final>.<kind>-<host>-<pid>`) and renamed into place, so a kill leaves only scratch entries; the next
load removes those whose process is gone. The host is in the name because a cache on a shared filesystem
is seen by processes of other machines, whose PIDs mean nothing here.

Directories the package creates carry a marker file (`MARKER`); nothing without it is ever deleted or
replaced, whatever its name. Writers take one lock file per folder (`held_lock`), kept for the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

import psutil
from absl import logging

from distprompt_jax.files import open_no_follow

CACHE_ENV = "DISTPROMPT_JAX_CACHE"
MARKER = ".distprompt_jax"
MANIFEST = "distprompt_manifest.json"
SCRATCH_KINDS = ("tmp", "part", "wheels", "old")
LOCK_FILE = ".lock"
# `<final>.<kind>-<host>-<pid>`; names from before the host was added are `<final>.<kind>-<pid>`.
_SCRATCH = re.compile(rf"(?P<final>.+)\.(?:{'|'.join(SCRATCH_KINDS)})-(?:(?P<host>.+)-)?(?P<pid>\d+)")


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "distprompt_jax"


def scratch_path(final: Path, kind: str) -> Path:
    """Where work in progress on `final` lives until it is renamed into place."""
    assert kind in SCRATCH_KINDS, kind
    return final.with_name(f"{final.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def make_owned_dir(path: Path) -> Path:
    """Create a directory and mark it as the package's own (so it may later be replaced or removed)."""
    path.mkdir(parents=True)
    (path / MARKER).write_text("created by distprompt_jax; safe to delete\n")
    return path


def is_owned(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def remove_owned(path: Path):
    """Delete a directory the package created; refuse anything else."""
    if not is_owned(path):
        raise PermissionError(f"{path} was not created by distprompt_jax (no {MARKER} in it); not deleting it")
    shutil.rmtree(path)


def remove_stale_scratch(folder: Path) -> list[Path]:
    """Remove scratch entries in `folder` left by dead processes of this host; return what was removed.

    Best effort: a read-only cache keeps its leftovers (they are never read), and an entry another
    process removes first is simply gone.
    """
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        match = _SCRATCH.fullmatch(entry.name)
        if not match or match["host"] not in (None, host) or psutil.pid_exists(int(match["pid"])):
            continue
        try:
            if entry.is_dir():
                remove_owned(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:  # PermissionError included: only marked directories are removed
            pass
    return removed


@contextlib.contextmanager
def held_lock(folder: Path, waiting: str):
    """An exclusive lock on `folder`'s `LOCK_FILE` for the block, waiting (and printing `waiting`) while another
    process holds it. The file is opened never through a link, and kept: every later lock reuses it (a lock
    file per item piled up, one per GGUF ever converted)."""
    fd = open_no_follow(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, info: dict):
    """Record `info` and the size and sha256 of every file in `folder`; written last, it marks completion."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in (MARKER, MANIFEST)
    }
    (folder / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=1))


def manifest_problem(folder: Path, info: dict) -> str | None:
    """Why `folder` is not a complete, intact copy of what `write_manifest(folder, info)` recorded; None if it is.

    Every recorded file is hashed again: for SmolLM2's 538 MB of converted weights that takes ~0.6 s here
    (sha256 at ~0.9 GB/s), against ~3-9 s for the load itself.
    """
    path = folder / MANIFEST
    if not folder.is_dir():
        return f"{folder} is not a directory"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST} (an interrupted or foreign conversion)"
    if {k: manifest.get(k) for k in info} != info:
        return f"made for {({k: manifest.get(k) for k in info})}, not {info}"
    for name, expected in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['size']} were written"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written (corrupted)"
    return None
