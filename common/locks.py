"""One process at a time per output folder: a training run's `--output_dir`, an index that `vqclip index add` rewrites.

The lock is `FOLDER/.lock`, held with `flock`: the kernel releases it when its process ends, however it ends, so
the lock of a process that was killed is simply taken over by the next run. The file names the holder (process
id, host, command), so a run that finds the folder busy says who has it. Forked children (DataLoader workers)
do not keep it. On a filesystem without `flock` (some network filesystems) nothing is locked, with a warning.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"
_HELD: dict[Path, IO[str]] = {}  # the folders this process holds, with the open lock file that holds each


def _forget_in_child() -> None:
    """In a forked child (a DataLoader worker), close the inherited lock files: the lock is the parent's, and a
    child that outlived a killed parent would otherwise keep holding it."""
    for handle in _HELD.values():
        handle.close()  # not an unlock: the parent's descriptor still holds the flock
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class FolderLockedError(ValueError):
    """Another process holds the folder; the message names it."""


def _holder(handle: IO[str]) -> str:
    handle.seek(0)
    try:
        found = json.loads(handle.read() or "{}")
        return f"process {found['pid']} on {found['host']} ({found['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def acquire(folder: str | os.PathLike, what: str = "the folder") -> None:
    """Take the lock on `folder` (created if needed) for this process; FolderLockedError if another holds it.
    Taking a lock this process already holds does nothing."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 (held open for as long as the lock)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        raise FolderLockedError(
            f"{folder} is in use by {holder}: two runs must not write {what} at once; wait for it to end, "
            "or give another folder"
        ) from None
    except OSError as err:  # no flock here
        handle.close()
        warnings.warn(f"cannot lock {folder} ({err}); nothing stops another run writing it at once", stacklevel=2)
        return
    handle.seek(0)
    handle.truncate()
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}) + "\n")
    handle.flush()
    _HELD[folder] = handle


def release(folder: str | os.PathLike) -> None:
    """Give up this process's lock on `folder`, if it holds one."""
    handle = _HELD.pop(Path(folder).resolve(), None)
    if handle is not None:
        handle.close()  # closing the file releases the flock


@contextmanager
def locked(folder: str | os.PathLike, what: str = "the folder") -> Iterator[None]:
    """Hold the lock on `folder` for the `with` block (unless this process held it before)."""
    held_before = Path(folder).resolve() in _HELD
    acquire(folder, what)
    try:
        yield
    finally:
        if not held_before:
            release(folder)
