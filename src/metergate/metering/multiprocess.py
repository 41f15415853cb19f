"""The value class of metric children in a `serve --workers N` worker: cheap writes into
prometheus_client's multiprocess files.

prometheus_client's own `MmapedValue` calls `os.getpid()` (a system call) and takes a
lock on every `inc`/`set`/`observe` to notice a `fork()`, then looks the key up in a dict
and packs value and timestamp: 14-19% of a worker's busy time under load. Here a value
resolves its position in the file once and writes only its 8 value bytes there.

No pid check per operation: uvicorn starts its workers with multiprocessing's "spawn"
method (a fresh interpreter that imports everything anew), and nothing in metergate
forks after metrics exist. Should a fork happen anyway, the child must not write into
its parent's file (both would count the same events); `os.register_at_fork` turns every
file of the child into one that raises on the first write, so the mistake fails loudly
instead of counting twice, at no cost to the parent's writes.

Thread safety: the OpenTelemetry export thread increments
`metergate_trace_spans_dropped_total` while the event loop does too (a read-modify-write
of the value, which two threads could interleave), so values take a lock (~0.1 µs
without contention, where the system call cost more) by default. Only the metrics that
`metering.metrics` names as written by the event loop alone (the per-request ones, ~13
writes per request) skip it.
"""

from __future__ import annotations

import array
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Collection
from typing import Any

from prometheus_client import Gauge, values
from prometheus_client.mmap_dict import mmap_key

from metergate.metering.mmapfile import WritableFile

log = logging.getLogger("metergate.metrics")


class _Apart:
    """Where a value lives when its file could not be made or grown (the filesystem is
    full): in this process's memory only, so the request that made it is still served
    and metered in the ledger, though /metrics will not show the series."""

    def __init__(self) -> None:
        self.doubles = array.array("d", (0.0, 0.0))


class ForkedWrite(RuntimeError):
    """A metric was written in a process forked from a worker after its metrics existed."""


class _Forked:
    """Stands in for a file's values in a forked child: every write fails."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setitem__(self, index: int, value: float) -> None:
        raise ForkedWrite(
            f"process {os.getpid()} writes a metric into {self.path}, which belongs to the "
            "process it was forked from: start processes with 'spawn' once metrics exist"
        )


def remove_series(gauge: Gauge, *labelvalues: str) -> None:
    """`gauge.remove(*labelvalues)`, also in a worker's file: prometheus_client's files
    cannot delete a series, so without this it would keep its last value in /metrics
    until the worker restarts. The value is set to NaN first, which the merged /metrics
    (`multiprocess_exposition`) reads as removed; in one process `remove` is enough."""
    gauge.labels(*labelvalues).set(math.nan)
    with warnings.catch_warnings():  # "not implemented in multi-process mode": it is, here
        warnings.filterwarnings("ignore", "Removal of labels", UserWarning)
        gauge.remove(*labelvalues)


def value_class(directory: str, loop_only: Collection[str] = ()) -> Callable[..., Any]:
    """A ValueClass writing `<kind>_<pid>.db` files into `directory`. The values of the
    metrics named in `loop_only` (only ever written by the event loop's thread) take no
    lock; every other metric's values do."""
    lock = threading.Lock()
    files: dict[str, WritableFile] = {}
    owner = os.getpid()
    told: list[str] = []  # the kinds a full filesystem kept out of their file, said once

    def file_of(kind: str) -> WritableFile:
        found = files.get(kind)
        if found is None:
            if os.getpid() != owner:
                raise ForkedWrite(f"process {os.getpid()} creates a metric forked from {owner}")
            path = os.path.join(directory, f"{kind}_{owner}.db")
            found = files[kind] = WritableFile(path)
            if kind.startswith("gauge_live"):
                forget(found)
        return found

    def forget(file: WritableFile) -> None:
        """A `live*` gauge file already there was a dead process's (its pid used again
        by this one): a scrape counts it as this process's, so its values are marked
        removed, as that process's gauges must not show (counters, and gauges of the
        other modes, count a dead process's values: theirs carry on)."""
        for index in file.positions.values():
            file.doubles[index] = math.nan

    def after_fork() -> None:
        nonlocal lock
        lock = threading.Lock()  # another thread may have held it at the fork
        for file in files.values():
            file.doubles = _Forked(file.path)
        files.clear()  # and a new metric finds no file to write to

    os.register_at_fork(after_in_child=after_fork)

    def close_all() -> None:
        with lock:
            for file in files.values():
                file.close()
            files.clear()

    cleanups = getattr(values, "_multi_process_cleanups", None)
    if cleanups is not None:  # prometheus_client's close_all_multiprocess_files()
        cleanups.append(close_all)

    class LoopValue:
        """A float in this process's file, at an index found once; written without a
        lock, for metrics only the event loop writes."""

        _multiprocess = True
        __slots__ = ("_file", "_index", "_value")

        def __init__(self, kind: str, key: str) -> None:
            with lock:  # the files and their growth are shared with the locked values
                try:
                    self._file: WritableFile | _Apart = file_of(kind)
                    self._index = self._file.index(key)
                except OSError as error:  # no space for the file, or for it to grow
                    self._file, self._index = _Apart(), 0
                    if kind not in told:
                        told.append(kind)
                        log.error(
                            "the %s metrics file in %s cannot grow (%s): new series are "
                            "counted in this process's memory only and do not show in "
                            "/metrics until the process restarts with space (the ledger "
                            "and budgets are not affected)",
                            kind,
                            directory,
                            error,
                        )
                # An existing entry (a restarted worker that got the same pid) carries on,
                # except one marked removed (`remove_series`, or a dead process's gauge
                # `forget` marked): it starts again from 0 and shows, as a new one does
                # (a "mostrecent" one once it is set).
                doubles = self._file.doubles
                value = doubles[self._index]
                if value != value:
                    value = doubles[self._index] = doubles[self._index + 1] = 0.0
                self._value: float = value

        def inc(self, amount: float) -> None:
            self._value += amount
            self._file.doubles[self._index] = self._value

        def set(self, value: float, timestamp: float | None = None) -> None:
            self._value = value
            self._file.doubles[self._index] = value
            if timestamp is not None:  # only "mostrecent" gauges have one
                self._file.doubles[self._index + 1] = timestamp

        def set_exemplar(self, exemplar: Any) -> None:
            return  # prometheus_client keeps no exemplars in multiprocess mode either

        def get(self) -> float:
            return self._value

        def get_exemplar(self) -> None:
            return None

    class LockedValue(LoopValue):
        """The same, for metrics that other threads may write too."""

        __slots__ = ()

        def inc(self, amount: float) -> None:
            with lock:
                LoopValue.inc(self, amount)

        def set(self, value: float, timestamp: float | None = None) -> None:
            with lock:
                LoopValue.set(self, value, timestamp)

        def get(self) -> float:
            with lock:
                return self._value

    def make(
        typ: str,
        metric_name: str,
        name: str,
        labelnames: Any,
        labelvalues: Any,
        help_text: str,
        multiprocess_mode: str = "",
        **kwargs: Any,
    ) -> LoopValue:
        """What prometheus_client calls as `values.ValueClass(...)` for each value."""
        kind = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
        key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        cls = LoopValue if metric_name in loop_only else LockedValue
        return cls(kind, key)

    make._multiprocess = True  # type: ignore[attr-defined]
    make.close_all_files = close_all  # type: ignore[attr-defined]
    return make


def install(directory: str, loop_only: Collection[str] = ()) -> None:
    """Make every metric created from now on in this process use `value_class`. Called
    at import of `metering.metrics`, before any metric exists, only when
    PROMETHEUS_MULTIPROC_DIR is set; a second call changes nothing."""
    if getattr(values.ValueClass, "_metergate_directory", None) == directory:
        return
    make = value_class(directory, frozenset(loop_only))
    make._metergate_directory = directory  # type: ignore[attr-defined]
    values.ValueClass = make


class InProcessValue:
    """One process (`serve` with one worker): prometheus_client's MutexValue without its
    lock, for the metrics only the event loop writes (a lock per write cost ~4 µs of a
    request's ~13 writes). Reading `_value` from another thread sees a whole float."""

    _multiprocess = False
    __slots__ = ("_exemplar", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


def install_in_process(loop_only: Collection[str]) -> None:
    """Values of `loop_only` metrics created from now on take no lock (one process)."""
    if getattr(values.ValueClass, "_metergate_in_process", False):
        return
    locked = values.MutexValue
    names = frozenset(loop_only)

    def make(typ: str, metric_name: str, *args: Any, **kwargs: Any) -> Any:
        if metric_name in names:
            return InProcessValue()
        return locked(typ, metric_name, *args, **kwargs)

    make._multiprocess = False  # type: ignore[attr-defined]
    make._metergate_in_process = True  # type: ignore[attr-defined]
    values.ValueClass = make
