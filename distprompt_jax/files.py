"""Writing inside a directory that others may write to as well (a shared workdir), never through a link.

Anyone who can write in a workdir could put a symbolic link where a run will write (`.lock`, `log.jsonl`, a
temporary name) and have the run write or truncate the file it points to. So every file a run opens for
writing is opened with O_NOFOLLOW, temporaries are created exclusively (O_EXCL), and a folder a run writes
into is refused when it is a link: the error names the path. A link as the workdir itself is the user's
choice and is followed.

Errors from the operating system are re-raised as one line naming the path (`os_error_message`).
"""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import psutil

# `.<final name>.tmp-<host>-<pid><suffix>`: what `atomic_write` writes before renaming it into place (the
# suffix keeps writers that look at it, like numpy's, from appending their own). Names from before the host
# was added are `.<final name>.tmp-<pid><suffix>`.
_TEMPORARY = re.compile(r"\.(?P<final>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)(?:\.[^.]*)?")


class LinkedPathError(ValueError):
    """A path a run writes to is a symbolic link (someone else's file may be behind it)."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is a symbolic link: distprompt never writes through links in a workdir "
                         "(it could overwrite a file elsewhere); remove the link and rerun")


def os_error_message(err: OSError, path: str | os.PathLike | None = None) -> str:
    """One line saying what failed where: the path (the error's own, else `path`) and the reason."""
    where = err.filename if err.filename is not None else path
    reason = err.strerror or str(err)
    advice = {errno.ENOSPC: "; free some space and rerun the same command",
              errno.EROFS: "; use a writable directory", errno.EACCES: "; check its permissions"}
    text = f"{where}: {reason}" if where is not None else reason
    return text + advice.get(err.errno, "")


def named_os_error(err: OSError, path: str | os.PathLike) -> OSError:
    """`err` as an OSError of the same errno whose message is `os_error_message(err, path)`."""
    named = OSError(os_error_message(err, path))
    named.errno = err.errno
    return named


def open_no_follow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open(path, flags) that refuses a symbolic link at `path` (LinkedPathError) instead of following it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP or (err.errno == errno.EEXIST and os.path.islink(path)):
            raise LinkedPathError(path) from None
        raise


def append_line(path: Path, line: str) -> None:
    """Append `line` and a newline to the file at `path` (created if needed), never through a link. A last line
    a kill cut short is ended first, so that it does not take this one with it."""
    fd = open_no_follow(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        cut_short = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        with os.fdopen(fd, "a") as file:
            file.write(("\n" if cut_short else "") + line + "\n")
    except OSError as err:  # a full disk: the write's error carries no path
        raise named_os_error(err, path) from err


def real_dir(path: Path, below: Path) -> Path:
    """`path` (inside `below`) as a directory, created where missing; LinkedPathError if it or a directory
    between it and `below` is a symbolic link."""
    path, below = Path(path), Path(below)
    current = below
    for part in path.relative_to(below).parts:
        current = current / part
        if current.is_symlink():
            raise LinkedPathError(current)
        current.mkdir(exist_ok=True)
    return path


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` writes `path` before renaming it."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}{path.suffix}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through a temporary name and rename it, so a kill leaves the old file or the new, never
    half. `write(file)` writes into a binary file object. The temporary is created exclusively, never through
    a link, and removed when writing fails; an OSError is re-raised as one line naming `path`."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        fd = open_no_follow(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:  # left by an earlier process of the same id (ids are reused): not a link, ours
        temporary.unlink()
        fd = open_no_follow(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise named_os_error(err, path) from err
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries `atomic_write` left in `folder` (not below it) when its process died (a kill,
    a full disk): those of this host whose process is gone. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if not match or match["host"] not in (None, host) or int(match["pid"]) == os.getpid():
            continue
        if psutil.pid_exists(int(match["pid"])) or entry.is_dir():
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:  # gone already, or not ours to remove
            pass
    return removed
