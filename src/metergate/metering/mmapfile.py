"""prometheus_client's multiprocess file format, written and read without its per-call costs.

One file per process and kind (`counter_<pid>.db`, `gauge_livesum_<pid>.db`,
`histogram_<pid>.db`, ...): a 4-byte int saying how many bytes are used, 4 bytes of
padding, then entries of a 4-byte key length, the UTF-8 key (a JSON list: metric name,
sample name, labels, help) padded with spaces so that the entry's two doubles (value,
timestamp) are 8-byte aligned. Files are created at 64 KiB and double when full; entries
are only ever appended and never move. This is exactly what prometheus_client's
`MmapedDict` writes and its `MultiProcessCollector` reads (tests/test_multiprocess.py
checks both ways), so either side may be ours or theirs.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any

INITIAL_SIZE = 1 << 16
_INT = struct.Struct("i")
_DOUBLES = struct.Struct("dd")


def allocate(file: Any, size: int) -> None:
    """Give a file that is to be mapped `size` bytes of disk, or raise OSError (ENOSPC)
    now: a sparse file (`truncate`) gets its blocks when the mapping is written, and a
    full filesystem then kills the process with SIGBUS instead."""
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        file.truncate(size)  # a filesystem without it: as before


class CorruptFile(Exception):
    """An entry runs past the used part of its file."""


def entries(buf: Any, pos: int, used: int) -> Iterator[tuple[bytes, int]]:
    """(key, index of its value in the file as an array of doubles) of every entry from
    `pos` (an entry boundary) to `used`."""
    unpack = _INT.unpack_from
    while pos < used:
        length = unpack(buf, pos)[0]
        value = pos + 4 + length + (8 - (length + 4) % 8)
        if length < 0 or value + 16 > used:
            raise CorruptFile(f"the entry at byte {pos} runs past the {used} bytes used")
        yield bytes(buf[pos + 4 : pos + 4 + length]), value // 8
        pos = value + 16


def _entry(key: str) -> bytes:
    encoded = key.encode()
    padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
    return _INT.pack(len(encoded)) + padded + _DOUBLES.pack(0.0, 0.0)


def _doubles(mapped: mmap.mmap, size: int) -> Any:
    """The mapping as an array of doubles (a memoryview; typed Any: typeshed's memoryview
    only knows bytes)."""
    return memoryview(mapped)[: size - size % 8].cast("d")


class WritableFile:
    """A process's own file of one kind: entries appended, values written in place.

    `doubles` is the whole file as an array of doubles; a value's index never changes,
    but the array is replaced when the file grows (a new, larger mapping), so writers
    look it up on every write rather than keeping it. Not thread safe: the value class
    holds a lock around every call.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a+b")  # noqa: SIM115 (kept open with the mapping)
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            size = INITIAL_SIZE
            allocate(self._file, size)
        self._map(size)
        self.used = _INT.unpack_from(self._mapped, 0)[0]
        if self.used == 0:
            self.used = 8
            self._mapped[0:4] = _INT.pack(self.used)
        # A file already there (a pid used again): its values carry on from where they are.
        self.positions = {key.decode(): index for key, index in entries(self._mapped, 8, self.used)}

    def _map(self, size: int) -> None:
        self._mapped = mmap.mmap(self._file.fileno(), size)
        self.size = size
        self.doubles = _doubles(self._mapped, size)

    def index(self, key: str) -> int:
        """The index of `key`'s value, appending the key (at 0) on first use."""
        found = self.positions.get(key)
        if found is not None:
            return found
        entry = _entry(key)
        size = self.size
        while self.used + len(entry) > size:
            size *= 2
        if size != self.size:
            allocate(self._file, size)
            self._map(size)
        self._mapped[self.used : self.used + len(entry)] = entry
        self.used += len(entry)
        # Written after the entry: a reader that sees the new length sees the whole entry.
        self._mapped[0:4] = _INT.pack(self.used)
        found = self.positions[key] = self.used // 8 - 2
        return found

    def close(self) -> None:
        self.doubles.release()
        self._mapped.close()
        self._file.close()


class ReadableFile:
    """Another process's file (or our own), read without copying: the values through a
    memoryview of doubles over a read-only mapping, the keys parsed once, then only what
    was appended since the last `refresh`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = 0
        self.parsed = 8  # where the next unparsed entry starts
        self.doubles: Any = None
        self._mapped: mmap.mmap | None = None

    def refresh(self) -> list[tuple[bytes, int]]:
        """The entries appended since the last call (all of them the first time)."""
        if not self._remap():
            return []
        used = _INT.unpack_from(self._view(), 0)[0]
        if used > self.size and not self._remap():  # it grew between the two reads
            return []
        used = min(used, self.size)
        if used <= self.parsed:
            return []
        found = list(entries(self._view(), self.parsed, used))
        self.parsed = used
        return found

    def _remap(self) -> bool:
        """Map the whole file again if it grew; False while it is too short to read."""
        size = os.fstat(self._fd).st_size
        if size != self.size:
            self._release()
            self.size = 0
            if size < 8:
                return False
            self._mapped = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ)
            self.doubles = _doubles(self._mapped, size)
            self.size = size
        return self._mapped is not None

    def _view(self) -> mmap.mmap:
        assert self._mapped is not None
        return self._mapped

    def buffer(self) -> mmap.mmap:
        """The mapping as it stands (after `refresh`), for reading values in bulk."""
        return self._view()

    def _release(self) -> None:
        if self.doubles is not None:
            self.doubles.release()
            self.doubles = None
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None

    def close(self) -> None:
        self._release()
        os.close(self._fd)
