"""The values of one worker's metric file, read again only where its bytes changed.

The merged `/metrics` of `serve --workers N` (`multiprocess_exposition`) reads every
worker's files at every scrape. Most of a file is keys that never change; its values are
8 bytes every ~200. A `FileValues` keeps the file's values in the reader's slot order and
brings them up to date from the blocks of the file that differ from its last copy, or,
when most of it changed, from the whole file at once.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Sequence
from typing import Any

from metergate.metering.mmapfile import ReadableFile

Getter = Callable[[Any], tuple[Any, ...]]
Unpack = Callable[[Any, int], tuple[Any, ...]]  # (buffer, offset) -> values

# Bytes of a file compared at a time between scrapes (`FileValues.read`): ~60 entries of the
# 50 models x 200 keys counters; smaller blocks cost more calls, larger ones more values
# read again around each one that moved.
_BLOCK = 1 << 14


def getter(positions: Sequence[int]) -> Getter:
    """`itemgetter(*positions)` that always returns a tuple."""
    if len(positions) == 1:
        only = positions[0]
        return lambda seq: (seq[only],)
    if not positions:
        return lambda seq: ()
    return operator.itemgetter(*positions)


def unpacker(indices: Sequence[int]) -> Unpack:
    """Reads the doubles at `indices` (increasing, counted from the offset it is called
    with) of a buffer in one call."""
    layout, position = ["="], 0
    for index in indices:
        if index > position:
            layout.append(f"{(index - position) * 8}x")
        layout.append("d")
        position = index + 1
    return struct.Struct("".join(layout)).unpack_from


class Block:
    """A stretch of `_BLOCK` bytes of a file and the entries whose values lie in it."""

    __slots__ = ("indices", "slots", "start", "unpack")

    def __init__(self, start: int) -> None:
        self.start = start
        self.slots: list[int] = []
        self.indices: list[int] = []  # their values' index in the file's doubles
        self.unpack: Unpack | None = None  # None: entries were added, read it whole

    def prepare(self) -> Unpack:
        """The layout that reads its values (from its start), built again after adds."""
        if self.unpack is None:
            self.unpack = unpacker([i - self.start // 8 for i in self.indices])
        return self.unpack


class FileValues:
    """One worker's file of one kind: where each of its entries goes (a slot of its kind,
    numbered by the reader) and its values as last read.

    A scrape compares the file with the copy of its bytes kept from the last one, a block
    of `_BLOCK` bytes at a time (a `memcmp`, ~1 ms for 10 MB), and unpacks only the values
    of the blocks that differ: an idle worker's file costs no float objects at all, and a
    busy one's only those of the blocks its requests wrote to. The price is that copy,
    each file's used bytes once more in the scraping process (the reader bounds the
    copies through `copying`). A copy, not marks set by the writers: those would cost
    every request's metric writes, where the copy costs only the scrape."""

    def __init__(self, file: ReadableFile) -> None:
        self.file = file
        self.slots: list[int] = []  # per entry, in file order
        self.indices: list[int] = []  # per entry: its value's index in the file's doubles
        self.values: list[float] = []  # per slot of the group: this file's value, or fill
        self._copy = bytearray()  # the file's bytes as last read, up to its last entry
        self.copying = True  # False: read whole each time, keep no copy
        self._calm = True  # nothing moved at the last whole read: worth a copy again
        self._blocks: list[Block] = []
        # For reading the file whole: (slots, entries) it was built for, unpack, scatter.
        self._whole: tuple[tuple[int, int], Unpack, Getter | None] | None = None

    def add(self, slot: int, index: int) -> None:
        """An entry just parsed: its series' slot, its value's index in the file."""
        self.slots.append(slot)
        self.indices.append(index)
        number = index * 8 // _BLOCK
        while len(self._blocks) <= number:
            self._blocks.append(Block(len(self._blocks) * _BLOCK))
        block = self._blocks[number]
        block.slots.append(slot)
        block.indices.append(index)
        block.unpack = None

    def read(self, size: int, fill: float) -> list[int] | None:
        """Bring `values` up to date with the file (`size` slots, `fill` where the file
        has no such series); the slots whose value moved, or None when it was read whole.

        It is read whole, and no copy kept, while more than a quarter of its blocks change
        between scrapes (one `struct` call is cheaper then than block by block, and the
        copy would be made for nothing); a copy is taken again at the first scrape that
        finds every value as it was."""
        values = self.values
        if len(values) < size:
            values.extend([fill] * (size - len(values)))
        if not self.slots:  # nothing parsed yet: a file a worker has only just created
            return []
        copy, end = self._copy, self.file.parsed
        changed: list[Block] = []
        most = len(self._blocks) // 4
        if copy and not self.copying:
            self._copy = copy = bytearray()
        with memoryview(self.file.buffer()) as view:
            if not copy:
                if self.copying and self._calm:  # every value as of the copy taken now
                    copy += view[:end]
                    self._read_whole(copy, size, fill)
                else:
                    self._calm = self._read_whole(view, size, fill)
                return None
            if len(copy) < end:
                copy += view[len(copy) : end]  # (its blocks have new entries: read below)
            for block in self._blocks:
                start = block.start
                if block.unpack is None or not copy.startswith(
                    view[start : min(start + _BLOCK, end)], start
                ):
                    changed.append(block)
                    if len(changed) > most:
                        self._copy = bytearray()
                        self._calm = self._read_whole(view, size, fill)
                        return None
            for block in changed:
                start = block.start
                copy[start : start + _BLOCK] = view[start : min(start + _BLOCK, end)]
        moved: list[int] = []
        for block in changed:
            for slot, value in zip(block.slots, block.prepare()(copy, block.start), strict=True):
                if value != values[slot]:
                    values[slot] = value
                    moved.append(slot)
        return moved

    def _read_whole(self, buffer: Any, size: int, fill: float) -> bool:
        """`values` from the whole file at once: one precompiled `struct` layout reads
        every value (~0.8 ms for 50,000 entries), an `itemgetter` puts them in slot order
        (the file whose entries came first numbered the slots: its values need none).
        True when every value is as it was."""
        if self._whole is None or self._whole[0] != (size, len(self.slots)):
            if self.slots == list(range(size)):
                scatter = None
            else:
                where = dict(zip(self.slots, range(len(self.slots)), strict=True))
                missing = len(self.slots)
                scatter = getter([where.get(slot, missing) for slot in range(size)])
            self._whole = ((size, len(self.slots)), unpacker(self.indices), scatter)
        for block in self._blocks:  # (the copy holds their values now)
            block.prepare()
        _, unpack, scatter = self._whole
        found = unpack(buffer, 0)
        values = list(found if scatter is None else scatter((*found, fill)))
        calm = values == self.values
        self.values = values
        return calm
