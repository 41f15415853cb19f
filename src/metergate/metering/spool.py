"""Ledger rows the database would not take, kept on local disk until it does.

When commits have failed or hung for `ledger.spool_after_seconds`, or the gateway stops
while the database is unreachable, the writer moves the rows it holds into a new file
here: one line per batch (a JSON array of rows), written under a temporary name, fsynced,
then renamed, so a spool file is whole or absent. The rows then survive a restart, a kill
and a long outage without growing the process.

A file is replayed batch by batch, each batch in one transaction and only when its first
row is not in the ledger yet. A batch is all or nothing (the rule the writer's uncertain
batches already follow), so a replay cut off midway, or a commit whose answer was lost,
writes no row twice. A process takes a file by an exclusive `flock` and checks that the
path still names the file it locked, so two workers (or a worker and a restart) never
replay one file at the same time, and one that finds a file taken waits until its rows
are in: every worker loads budgets from a ledger that holds them. A file is deleted only
when all of it is in. A file that holds the batch of a commit still under way (rows are
spooled on time even while a commit hangs) is written locked, and the writer keeps the lock
until that commit has ended: no replay asks whether the batch is in while it may still be
committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from metergate.metering.ledger_row import LedgerRow

log = logging.getLogger("metergate.ledger")

Batch = list[LedgerRow]
_SUFFIX = ".jsonl"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory.absolute()  # the logs name it whatever the cwd
        self._names = itertools.count(1)

    def write(self, batches: list[Batch]) -> Path:
        """Put `batches` in a new file, durably; raise OSError when the disk will not."""
        return self._write(batches, hold=False)[0]

    def write_held(self, batches: list[Batch]) -> tuple[Path, int]:
        """`write`, the file locked as a replay locks it, from before it has its name until
        `release` (or this process ends): a batch whose commit is still under way goes in,
        and no replay may ask whether it is in the ledger before that commit has ended."""
        path, lock = self._write(batches, hold=True)
        assert lock is not None
        return path, lock

    @staticmethod
    def release(lock: int) -> None:
        os.close(lock)

    def _write(self, batches: list[Batch], hold: bool) -> tuple[Path, int | None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"ledger-{time.time_ns()}-{os.getpid()}-{next(self._names)}"
        temporary = self.directory / f".{name}.tmp"
        final = self.directory / f"{name}{_SUFFIX}"
        data = b"".join(orjson.dumps([list(row) for row in batch]) + b"\n" for batch in batches)
        lock = None
        try:
            with open(temporary, "wb") as file:
                if hold:  # a new file: nobody else holds it
                    lock = os.dup(file.fileno())
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.rename(temporary, final)
            _sync_directory(self.directory)
        except BaseException:
            if lock is not None:
                os.close(lock)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        return final, lock

    def problem(self) -> str | None:
        """Why a spool file could not be written here, found at start rather than in an
        outage: the directory (or the nearest parent that exists) is not writable."""
        existing = self.directory
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is not a directory"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable"
        return None

    def waiting(self) -> dict[Path, int]:
        """Every whole spool file here, oldest first, with its rows. One that cannot be
        read back is logged and left out (and in place, for a person to look at)."""
        try:
            paths = sorted(self.directory.glob(f"ledger-*{_SUFFIX}"), key=_written_at)
        except OSError:
            return {}
        found = {}
        for path in paths:
            try:
                found[path] = sum(map(len, _parse(path.read_bytes(), path)))
            except (OSError, SpoolFileError):
                log.exception("ledger spool file %s left out", path)
        return found

    async def replay(
        self, path: Path, insert_missing: Callable[[Batch], Awaitable[int]]
    ) -> int | None:
        """Write one file's batches with `insert_missing` (which returns the rows it
        inserted), then delete the file; return the rows inserted, or None when another
        process replayed it first. A failure leaves the file in place."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            # Wait for a process replaying it: once this returns, its rows are in the
            # ledger or (that replay failed) the file is ours to write.
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    return None
            except FileNotFoundError:
                return None  # replayed and deleted between our open and our lock
            batches = await asyncio.to_thread(_read, fd, path)
            inserted = 0
            for batch in batches:
                inserted += await insert_missing(batch)
            await asyncio.to_thread(_remove, path)
            return inserted
        finally:
            os.close(fd)  # releases the lock


class SpoolFileError(ValueError):
    """A spool file that cannot be read back; it is left in place for a person to see."""


def _parse(data: bytes, path: Path) -> list[Batch]:
    try:
        return [[LedgerRow(*row) for row in orjson.loads(line)] for line in data.splitlines()]
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise SpoolFileError(f"spool file {path} is not a list of ledger rows: {exc}") from exc


def _read(fd: int, path: Path) -> list[Batch]:
    with os.fdopen(os.dup(fd), "rb") as file:
        return _parse(file.read(), path)


def _remove(path: Path) -> None:
    path.unlink()
    _sync_directory(path.parent)


def _written_at(path: Path) -> tuple[int, str]:
    stamp = path.name.split("-")[1]
    return (int(stamp) if stamp.isdigit() else 0, path.name)


def _sync_directory(directory: Path) -> None:
    """Make a rename or unlink durable: fsync the directory that holds the entry."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
