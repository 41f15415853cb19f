"""Rate-limit state shared by the workers of one host (`serve --workers N` without Redis).

Each worker used to keep its own buckets, so N workers admitted N times each limit. The
state of a bucket is one number (its GCRA TAT, `limits.rate`), so the workers can keep
it in one file they all map: a table of 16-byte slots, an 8-byte hash of the bucket's
name and its TAT as a double, found by linear probing from the hash. A slot, once
given to a bucket, keeps it until the gateway stops (the file lives in the supervisor's
private directory), so a worker remembers where each of its buckets is.

Every read and write of the table happens under an exclusive `flock` on the file,
taken for a whole admission (check, then take) and again for a debit: four system
calls a limited request (~2 µs), nothing for one without limits. A worker that dies
holding the lock releases it with its file. Times are `CLOCK_MONOTONIC`, one clock for
every process of the host.

Replicas on other hosts still need Redis. A full table (`capacity` buckets) keeps the
rest in each worker's own memory and says so once in the log.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
from pathlib import Path

from metergate.metering.mmapfile import allocate

log = logging.getLogger("metergate.limits")

RATES_FILE = "rate-limits"  # in the directory of the host's tables (`serve --workers N`)
CAPACITY = 1 << 16  # buckets: two per key, model and team with limits; 1 MiB of file
_HEADER = struct.Struct("<8sQ")  # magic, capacity
_MAGIC = b"mgtats01"
_SLOT = struct.Struct("<Qd")  # name hash (0: free), TAT in microseconds
_TAT = struct.Struct("<d")


def create_table(path: Path, capacity: int = CAPACITY) -> None:
    """Make the zeroed file (the supervisor does, before any worker opens it)."""
    with path.open("wb") as file:
        file.write(_HEADER.pack(_MAGIC, capacity))
        file.flush()
        allocate(file, _HEADER.size + capacity * _SLOT.size)  # no SIGBUS on a full disk later


class HostTats:
    """The TATs of every worker's buckets: a mapping `RateLimiter` reads and writes only
    while it holds the table (`with table:`, the lock on the file)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 0)
        magic, self.capacity = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or len(self._map) != _HEADER.size + self.capacity * _SLOT.size:
            raise ValueError(f"{path} is not a rate-limit table")
        self._slot_of: dict[str, int] = {}  # bucket name: offset of its slot
        self._overflow: dict[str, float] = {}  # buckets the full table has no slot for
        self._unplaced: set[str] = set()  # ... found so: never probed for again
        self._told_full = False

    def __enter__(self) -> None:
        """`with table:` no other worker reads or writes the table meanwhile."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def get(self, name: str, default: float) -> float:
        offset = self._find(name, claim=False)
        if offset is None:
            return self._overflow.get(name, default)
        return float(_TAT.unpack_from(self._map, offset + 8)[0])

    def __setitem__(self, name: str, tat: float) -> None:
        offset = self._find(name, claim=True)
        if offset is None:
            self._overflow[name] = tat
        else:
            _TAT.pack_into(self._map, offset + 8, tat)  # the slot's hash is written once

    def _find(self, name: str, claim: bool) -> int | None:
        """The offset of `name`'s slot; a free one when `claim`; else None."""
        offset = self._slot_of.get(name)
        if offset is not None or name in self._unplaced:
            return offset
        wanted = _hash(name)
        start = wanted % self.capacity
        for step in range(self.capacity):
            at = _HEADER.size + ((start + step) % self.capacity) * _SLOT.size
            found = _SLOT.unpack_from(self._map, at)[0]
            if found == wanted:
                self._slot_of[name] = at
                return at
            if found == 0:
                if not claim:
                    return None
                _SLOT.pack_into(self._map, at, wanted, 0.0)
                self._slot_of[name] = at
                return at
        self._unplaced.add(name)  # slots are never freed: a full table stays full
        if not self._told_full:
            self._told_full = True
            log.warning(
                "the workers' rate-limit table is full (%d buckets): further buckets are "
                "kept by each worker on its own until the gateway restarts",
                self.capacity,
            )
        return None

    def close(self) -> None:
        """A worker maps the table for as long as it runs; tests let go of theirs."""
        self._map.close()
        os.close(self._fd)


def _hash(name: str) -> int:
    """Never 0, which marks a free slot."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1
