"""What the suite measured, kept for the report (`suite_report.py`): one `Outcome` per run,
made of the results of each step.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import ledger_rate, native, procfs, profile, scrape, workers, wrk
from benchlib.report import Check
from benchlib.targets import DIRECT


def ms(seconds: float) -> float:
    return seconds * 1000


def med(values: list[float]) -> float:
    return float(statistics.median(values))


@dataclass
class MemoryResult:
    idle: procfs.Memory
    peak_rss_kib: int
    after: procfs.Memory
    streams_ok: int
    peak_open: int
    first_event_ms: float  # median over the streams
    duration_s: float  # median

    @property
    def peak_mib(self) -> float:
        return max(self.peak_rss_kib, self.after.rss_kib) / 1024


@dataclass
class Pacing:
    """When each event of the slow stream arrived (s after sending), per target."""

    arrivals: dict[str, list[float]]
    reads: dict[str, int]

    def lag_ms(self, name: str) -> PacingLag:
        """How `name` relays the stream compared with direct: when its first event comes,
        and how far each later event (timed from the stream's first event) trails its
        direct pace. A gateway that buffered chunks would hold them back by seconds."""
        direct, other = self.arrivals[DIRECT], self.arrivals[name]
        if not direct or not other:
            return PacingLag(float("nan"), float("nan"), float("nan"))
        extra = [ms((o - other[0]) - (d - direct[0])) for d, o in zip(direct, other, strict=False)]
        return PacingLag(ms(other[0] - direct[0]), med(extra), max(extra))

    @property
    def event_ms(self) -> float:
        """The pace: milliseconds between two events of the direct stream, on average."""
        direct = self.arrivals[DIRECT]
        return ms(direct[-1] - direct[0]) / max(1, len(direct) - 1)


@dataclass(frozen=True)
class PacingLag:
    first_ms: float
    median_ms: float
    max_ms: float


Runs = dict[tuple[str, str], list[wrk.WrkResult]]


def median_of(results: Runs, name: str, load: str, attribute: str) -> float:
    return med([float(getattr(r, attribute)) for r in results[(name, load)]])


@dataclass
class TtftRun:
    p50_ms: float
    p99_ms: float
    total_p50_ms: float
    complete: int
    count: int


@dataclass
class ProfileResult:
    profile: profile.Profile
    rps: float
    raw: Path
    def_lines: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class Outcome:
    """Everything measured, for the report."""

    names: list[str]
    unary: Runs = field(default_factory=dict)
    half: Runs = field(default_factory=dict)
    half_connections: dict[str, int] = field(default_factory=dict)
    calibration: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    streams: Runs = field(default_factory=dict)
    ttft: dict[str, list[TtftRun]] = field(default_factory=dict)
    memory: dict[str, MemoryResult] = field(default_factory=dict)
    # RSS before and after the non-streaming loads
    loaded_rss_mib: dict[str, tuple[float, float]] = field(default_factory=dict)
    pacing: Pacing | None = None
    profiled: ProfileResult | None = None
    native: list[native.NativeProfile] = field(default_factory=list)
    native_skipped: str = ""  # why the native step did not run, when it did not
    scrape: scrape.ScrapeResult | None = None
    scrape_raw: Path | None = None
    micro: list[tuple[str, float, float]] = field(default_factory=list)
    ledger: list[ledger_rate.LedgerRate] = field(default_factory=list)
    postgres: str = "not measured"
    max_pending: int = 0
    pending_samples: int = 0
    checks: list[Check] = field(default_factory=list)
    env: list[tuple[str, str]] = field(default_factory=list)
    peer_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    peer_install: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    workers: workers.WorkersResult | None = None


SAT = "saturation"
ONE = "1 connection"


def half_load_name(connections: int) -> str:
    return f"half load (-c{connections})"
