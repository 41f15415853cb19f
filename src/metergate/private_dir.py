"""The private directory the processes of `serve --workers N` share, and their lives.

The supervisor makes the directory (mode 0700, in the system's temporary directory) for
the config copy, the metric files and the host's tables, and removes it when it exits.
Two things outlive a supervisor killed outright (SIGKILL, the OOM killer):

- its workers, which would serve on alone, unsupervised, holding the port, so that a
  new `serve` cannot bind it. Each worker asks the kernel (Linux) for SIGTERM when its
  supervisor dies, and stops as on any SIGTERM: requests in flight finish first;
- the directory, with its copy of the config (literal secrets included). Every process
  using it holds a shared lock on its `alive` file for as long as it runs, which the
  kernel lets go however the process ends; the next `serve --workers` start removes the
  directories whose lock nobody holds. A directory without that file (made by an older
  gateway) is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("metergate")

PREFIX = "metergate-"
ALIVE = "alive"  # locked (shared) by every process using the directory, while it runs
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_held: list[int] = []  # a worker's descriptor of `alive`: its lock lasts as long as it


@contextlib.contextmanager
def private_directory() -> Iterator[Path]:
    """Make the supervisor's directory, held alive while the block runs, after removing
    those that killed gateways left."""
    parent = Path(tempfile.gettempdir())
    removed = sweep(parent)
    if removed:
        log.info(
            "removed %d private %s left in %s by gateways that were killed",
            removed,
            "directory" if removed == 1 else "directories",
            parent,
        )
    with tempfile.TemporaryDirectory(prefix=PREFIX) as made:  # mode 0700
        path = Path(made)
        fd = _hold(path)
        try:
            yield path
        finally:
            os.close(fd)


def join(path: Path, supervisor: int) -> None:
    """Hold the directory alive for this worker's life, and have the worker stopped if
    its supervisor (pid `supervisor`) dies; SystemExit if it is already gone."""
    fd = os.open(path / ALIVE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held.append(fd)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("this worker will not stop with its supervisor: prctl failed")
    if os.getppid() != supervisor:  # died before the kernel was asked
        raise SystemExit(f"the gateway's supervisor (pid {supervisor}) is gone; not starting")


def sweep(parent: Path) -> int:
    """Remove the directories in `parent` that no process uses any more: this user's,
    with an `alive` file nobody holds a lock on. How many were removed."""
    removed = 0
    for path in parent.glob(PREFIX + "*"):
        try:
            found = path.lstat()  # a symlink is not followed
            if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
                continue
            fd = os.open(path / ALIVE, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # not ours, made by an older gateway, or just removed
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a gateway's process still runs with it
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


def _hold(path: Path) -> int:
    """Lock `alive` before it has its name, so a sweep never finds it unlocked."""
    making = path / (ALIVE + ".new")
    fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    making.rename(path / ALIVE)
    return fd
