"""/metrics with `serve --workers N`: every worker's metric files merged and rendered, in
about the time the single-process renderer takes.

prometheus_client's `MultiProcessCollector` reads every file whole, parses every JSON key,
builds Sample objects and dicts for every series, and then `generate_latest` formats them
all: ~1.5 s at 50 models x 200 keys with 2 workers. Here, across scrapes:

- each file stays mapped; its keys are parsed once, and later only what was appended
  (files only grow); each series of a kind of file has a slot, so that the workers'
  values add up element by element;
- values are unpacked only from the blocks of a file whose bytes changed since the last
  scrape (`multiprocess_values.py`), and when few series moved only their totals are
  added up again;
- each series' `name{labels}` prefix is built once; a family whose values did not change
  reuses its rendered text, and within a family that changed, so does every line whose
  value did not.

The result is what `MultiProcessCollector` + `generate_latest` say
(tests/test_multiprocess.py compares every sample on files written by real processes):
counters, histograms and summaries summed over every file, a dead worker's included (so
counters never go backwards); gauges by their multiprocess_mode, where the `live*` modes
count only processes still running, and a gauge series a process removed (its value a
NaN, `multiprocess.remove_series`) is shown only while another process that counts
still has it. prometheus_client leaves liveness to
`mark_process_dead` deleting a dead process's `live*` files, which nothing calls when a
uvicorn worker dies; so liveness is decided here by the pid in the file name (and a
process given a dead one's pid marks that one's `live*` gauges removed as it opens the
file: `multiprocess.value_class`).
"""

from __future__ import annotations

import json
import operator
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from metergate.metering.exposition import RenderedFamily, header, label_text
from metergate.metering.mmapfile import ReadableFile
from metergate.metering.multiprocess_values import FileValues, Getter, getter

Labels = tuple[tuple[str, str], ...]

# How each kind of file combines its processes' values: (combine, live only, per process).
_GAUGE_MODES = {
    "all": ("sum", False, True),  # one series per process (a `pid` label): nothing to combine
    "liveall": ("sum", True, True),
    "sum": ("sum", False, False),
    "livesum": ("sum", True, False),
    "max": ("max", False, False),
    "livemax": ("max", True, False),
    "min": ("min", False, False),
    "livemin": ("min", True, False),
    "mostrecent": ("recent", False, False),
    "livemostrecent": ("recent", True, False),
}
# What a process without a series contributes to the element-wise combination.
_FILL = {"sum": 0.0, "max": float("-inf"), "min": float("inf")}
_COMBINE: dict[str, Callable[[float, float], float]] = {
    "sum": operator.add,
    "max": max,
    "min": min,
}


# The most bytes of copies (`FileValues.read`) one process keeps: every worker that
# serves /metrics holds a copy of every worker's files, so without a bound the copies
# would grow with the square of the workers. A file past it is read whole at every scrape.
_COPIES = 64 << 20


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Group:
    """Every file of one kind (`counter`, `histogram`, `gauge_livesum`, ...): its series
    are numbered slots, and a scrape combines its files into `totals[slot]`."""

    def __init__(self, kind: str, typ: str, mode: str) -> None:
        self.kind = kind
        self.typ = typ
        self.combine, self.live, self.per_pid = _GAUGE_MODES.get(mode, ("sum", False, False))
        self.sources: list[_Source] = []
        self.size = 0  # slots numbered so far
        self.totals: list[float] = []
        self.present: set[int] = set()  # the slots to show
        self.listed: set[int] = set()  # the slots of the processes that count
        self.layout: tuple[Any, ...] = ()
        self.version = 0  # counts the reads at which something moved

    def new_slot(self) -> int:
        self.size += 1
        return self.size - 1

    def combine_values(self, active: list[_Source]) -> bool:
        """`totals` and `present` from the files of the processes that count; True when
        the set of present series may have changed."""
        size = self.size
        layout = (size, *((id(s), len(s.slots)) for s in active))
        changed = layout != self.layout
        if changed:
            self.layout = layout
            self.present = self.listed = set().union(*(s.slots for s in active))
        if self.combine == "recent":
            self.version += 1
            self._most_recent(active, size)
            return True
        fill = _FILL[self.combine]
        combine = _COMBINE[self.combine]
        moved = [source.read(size, fill) for source in active]
        gauge = self.typ == "gauge"  # (only gauges are removed: counters never go away)
        few = not changed and None not in moved
        if few and not any(moved):
            return False
        self.version += 1
        if few and not gauge and len(self.totals) == size:
            slots = {slot for found in moved if found for slot in found}
            if len(slots) * 4 < size:  # a few series moved: add up only theirs
                self._combine_slots(active, slots, combine)
                return False
        totals: list[float] | None = None
        removed: dict[int, set[int]] = {}  # source -> slots it marked removed
        for number, source in enumerate(active):
            values: Sequence[float] = source.values
            total = sum(values) if gauge else 0.0  # (in C: a NaN anywhere makes it NaN)
            if total != total:
                removed[number] = {slot for slot, value in enumerate(values) if value != value}
                values = [fill if value != value else value for value in values]
            totals = list(values) if totals is None else list(map(combine, totals, values))
        self.totals = totals if totals is not None else []
        present = self.listed
        if removed:  # shown while any process that counts still has it
            kept = set().union(
                *(set(s.slots) - removed.get(n, set()) for n, s in enumerate(active))
            )
            present = self.listed & kept
        if present is not self.present and present != self.present:
            self.present = present
            changed = True
        return changed

    def _combine_slots(
        self, active: list[_Source], slots: set[int], combine: Callable[[float, float], float]
    ) -> None:
        """`totals` again at `slots` only, each added up in the same order as the whole
        arrays are (so either way gives the same bits)."""
        totals = self.totals
        first, *others = [source.values for source in active]
        for slot in slots:
            total = first[slot]
            for values in others:
                total = combine(total, values[slot])
            totals[slot] = total

    def _most_recent(self, active: list[_Source], size: int) -> None:
        """The value with the latest timestamp; a series never set (timestamp 0) is left out."""
        totals = [0.0] * size
        stamps = [0.0] * size
        for source in active:
            doubles = source.file.doubles
            for slot, index in zip(source.slots, source.indices, strict=True):
                stamp = doubles[index + 1]
                if stamp > stamps[slot]:
                    totals[slot], stamps[slot] = doubles[index], stamp
        self.totals = totals
        # Never set (timestamp 0), or removed last (a NaN): not shown.
        self.present = {
            slot for slot in self.listed if stamps[slot] > 0 and totals[slot] == totals[slot]
        }


class _Source(FileValues):
    """One process's file of a group, and the process it belongs to."""

    def __init__(self, file: ReadableFile, group: _Group, pid: str) -> None:
        super().__init__(file)
        self.group = group
        self.pid = pid

    def alive(self) -> bool:
        return not self.pid.isdigit() or alive(int(self.pid))


class _Family:
    """One metric: its series (slots of its group) and their rendered text, laid out
    again when the set of series shown changed."""

    def __init__(self, name: str, typ: str, help_text: str, group: _Group) -> None:
        self.name = name
        self.group = group
        self.rendered = RenderedFamily(header(name, typ, help_text))
        self.series: dict[tuple[str, Labels], int] = {}  # a plain sample -> its slot
        self.hists: dict[Labels, _Histogram] = {}  # a histogram's labels -> its slots
        self.names: set[str] = set()  # the sample names it has
        self.dirty = True
        self.shown = 0  # lines shown
        self.getter: Getter = getter(())
        self.rendered_at = -1  # the group's version its text was rendered at

    def hist(self, labels: Labels) -> _Histogram:
        found = self.hists.get(labels)
        if found is None:
            found = self.hists[labels] = _Histogram()
            self.names.update(self.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        return found

    def lines(self, present: set[int]) -> Iterator[tuple[Any, str, Labels]]:
        """(key, sample name, labels) of every line shown, in order: a line's key is its
        slot, a histogram's count line's its labels."""
        for (sample, labels), slot in self.series.items():
            if slot in present:
                yield slot, sample, labels
        for labels, hist in self.hists.items():
            buckets = [(b, s) for b, s in sorted(hist.buckets.items()) if s in present]
            for bound, slot in buckets:
                yield slot, self.name + "_bucket", (*labels, ("le", floatToGoString(bound)))
            if buckets:
                yield labels, self.name + "_count", labels
            if hist.sum is not None and hist.sum in present:
                yield hist.sum, self.name + "_sum", labels

    def rebuild(self, present: set[int]) -> None:
        lines = list(self.lines(present))
        keys = [key for key, _, _ in lines]
        plain = sum(1 for line in self.series.values() if line in present)
        shape = []
        for hist in self.hists.values():
            buckets = sum(1 for slot in hist.buckets.values() if slot in present)
            shape.append((buckets, hist.sum is not None and hist.sum in present))
        self.getter = getter([key for key in keys if isinstance(key, int)])
        self.rendered.layout(keys, lambda i: lines[i][1] + label_text(lines[i][2]), plain, shape)
        self.shown = len(lines)
        self.dirty = False

    def render(self) -> bytes:
        if not self.shown:
            return b""  # (prometheus_client shows no family without samples either)
        if self.rendered_at == self.group.version and self.rendered.raw is not None:
            return self.rendered.text  # nothing moved since (laid out again, `raw` is None)
        self.rendered_at = self.group.version
        return self.rendered.render(self.getter(self.group.totals))

    def samples(self, names: set[str]) -> Iterator[Sample]:
        values = self.rendered.line_values(self.getter(self.group.totals))
        lines = self.lines(self.group.present)
        for (_, sample, labels), value in zip(lines, values, strict=True):
            if sample in names:
                yield Sample(sample, dict(labels), value)


class _Histogram:
    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets: dict[float, int] = {}  # upper bound -> slot
        self.sum: int | None = None


class MultiProcessExposition:
    """The merged view of every `*.db` file in a PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._sources: dict[str, _Source] = {}  # by file name
        self._groups: dict[str, _Group] = {}  # by kind
        self._families: dict[str, _Family] = {}
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}  # one object per label pair

    def render(self) -> bytes:
        """The text format 0.0.4 exposition of every worker's metrics."""
        with self._lock:
            self._refresh()
            return b"".join(family.render() for family in self._families.values())

    def samples(self, names: set[str]) -> Iterator[Sample]:
        """Every merged sample whose name is in `names` (for the console)."""
        with self._lock:
            self._refresh()
            found = [
                sample
                for family in self._families.values()
                if family.shown and family.names & names
                for sample in family.samples(names)
            ]
        yield from found

    # -- reading -----------------------------------------------------------------------

    def _refresh(self) -> None:
        self._scan()
        # The first read of several files finds the same keys in each: parse each once.
        # (Kept for this read only: the keys would take more memory than all the rest.)
        seen: dict[Any, int | None] = {}
        for source in self._sources.values():
            per_pid = source.group.per_pid
            for key, index in source.file.refresh():
                cache_key = (key, source.pid) if per_pid else (key, source.group.kind)
                slot = seen.get(cache_key, -1)
                if slot == -1:
                    slot = seen[cache_key] = self._resolve(source, key)
                if slot is not None:
                    source.add(slot, index)
        room = _COPIES
        for source in self._sources.values():
            source.copying = source.file.parsed <= room
            room -= source.file.parsed if source.copying else 0
        pids: dict[str, bool] = {}
        for group in self._groups.values():
            active = group.sources
            if group.live:
                active = [s for s in active if pids.setdefault(s.pid, s.alive())]
            if group.combine_values(active):
                for family in self._families.values():
                    if family.group is group:
                        family.dirty = True
        for family in self._families.values():
            if family.dirty:
                family.rebuild(family.group.present)

    def _scan(self) -> None:
        """Open the files that appeared since the last scrape; forget any that vanished."""
        try:
            names = {n for n in os.listdir(self.directory) if n.endswith(".db")}
        except FileNotFoundError:
            names = set()
        for name in self._sources.keys() - names:
            gone = self._sources.pop(name)
            gone.group.sources.remove(gone)
            gone.group.layout = ()
            gone.file.close()
        for name in sorted(names - self._sources.keys()):
            parts = name[:-3].split("_")
            typ = parts[0]
            mode = parts[1] if typ == "gauge" and len(parts) > 2 else ""
            kind = f"{typ}_{mode}" if mode else typ
            try:
                file = ReadableFile(os.path.join(self.directory, name))
            except FileNotFoundError:
                continue
            group = self._groups.get(kind)
            if group is None:
                group = self._groups[kind] = _Group(kind, typ, mode)
            source = _Source(file, group, parts[-1])
            group.sources.append(source)
            self._sources[name] = source

    def _resolve(self, source: _Source, key: bytes) -> int | None:
        """The slot of an entry's series in its group (numbered on first sight)."""
        group = source.group
        metric, sample, labels, help_text = json.loads(key)
        family = self._families.get(metric)
        if family is None:
            family = self._families[metric] = _Family(metric, group.typ, help_text, group)
        elif family.group is not group:
            return None  # the same name written as another kind: not a valid exposition
        histogram = group.typ == "histogram"
        if histogram and sample == metric + "_count":
            return None  # (not written by prometheus_client) the buckets' total is shown
        le = labels.pop("le", None) if histogram else None
        if group.per_pid:
            labels["pid"] = source.pid
        # Label names and values repeat across thousands of series: one object each.
        pair = self._pairs.get
        pairs = tuple(sorted(pair((k, v)) or self._pair(k, v) for k, v in labels.items()))
        if le is not None:
            buckets = family.hist(pairs).buckets
            slot = buckets.get(float(le))
            if slot is None:
                slot = buckets[float(le)] = group.new_slot()
        elif histogram and sample == metric + "_sum":
            hist = family.hist(pairs)
            slot = hist.sum
            if slot is None:
                slot = hist.sum = group.new_slot()
        else:
            line = (sys.intern(sample), pairs)
            slot = family.series.get(line)
            if slot is None:
                slot = family.series[line] = group.new_slot()
                family.names.add(line[0])
        family.dirty = True
        return slot

    def _pair(self, name: str, value: str) -> tuple[str, str]:
        found = self._pairs[(name, value)] = (sys.intern(name), value)
        return found


_shared: dict[str, MultiProcessExposition] = {}
_shared_lock = threading.Lock()


def shared(directory: str) -> MultiProcessExposition:
    """One merged view per directory and process, so /metrics and the console share the
    parsed keys and mappings."""
    with _shared_lock:
        found = _shared.get(directory)
        if found is None:
            found = _shared[directory] = MultiProcessExposition(directory)
        return found
