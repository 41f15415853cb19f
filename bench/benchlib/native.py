"""Where a proxy's CPU goes below Python: the kernel, the interpreter, each C library.

py-spy charges time spent in C (the kernel's socket calls, uvloop, httptools, SQLite) to
the innermost Python frame above it, so it cannot tell how much of a request is the
interpreter running Python and how much is the machine moving bytes. Two outside views
answer that, for metergate and the floor proxy under the same load:

- `perf record -e cpu-clock` (a software clock: it needs no hardware counters, so it
  works in a VM) samples every thread of the process; `perf report --sort dso` splits
  the samples by shared object. Shares times the CPU time per request (from /proc over
  the same run) give microseconds per request for each part.
- `strace -c -f` counts the system calls. strace slows the process several times over,
  so it runs in a separate load of its own; counts per request do not depend on speed.

Both tools are optional: without `perf` or `strace` (or where perf may not attach) the
step says so and the rest of the suite runs.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib import procfs, wrk
from benchlib.procs import pinned
from benchlib.report import table

# Shared objects by what they are (first match wins); anything else is "other".
PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kernel", re.compile(r"^\[kernel")),
    ("interpreter (libpython)", re.compile(r"libpython|^python3")),
    ("uvloop / libuv", re.compile(r"^loop\.cpython|libuv")),
    ("httptools", re.compile(r"^(parser|url_parser)\.cpython")),
    ("libc (malloc, memcpy)", re.compile(r"^libc[.-]|^libm[.-]")),
    ("orjson", re.compile(r"^orjson")),
    ("SQLite", re.compile(r"sqlite")),
    ("OpenSSL / hashlib", re.compile(r"libcrypto|libssl|_hashlib|_ssl")),
    ("asyncio C module", re.compile(r"^_asyncio")),
)
_DSO_LINE = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+(\S.*?)\s*$")  # share, samples, dso
_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


@dataclass(frozen=True)
class NativeProfile:
    name: str
    rps: float  # under perf (which costs little)
    cpu_us: float  # CPU time per request over the perf run, every thread
    parts: list[tuple[str, float]]  # (part, share of samples), largest first
    samples: int
    syscalls: list[tuple[str, float]]  # (system call, calls per request), most first
    strace_rps: float  # what the process managed under strace

    def share(self, part: str) -> float:
        return dict(self.parts).get(part, 0.0)

    def micros(self, part: str) -> float:
        return self.share(part) * self.cpu_us


def missing_tools() -> list[str]:
    return [name for name in ("perf", "strace") if shutil.which(name) is None]


@dataclass(frozen=True)
class Load:
    """The wrk load each view runs under (wrk, perf and strace pinned to `cpus`)."""

    url: str
    token: str
    seconds: int
    connections: int
    cpus: str | None
    headers: Sequence[str] = ()

    def run(self) -> wrk.WrkResult:
        return wrk.run(
            self.url,
            connections=self.connections,
            seconds=self.seconds,
            token=self.token,
            cpus=self.cpus,
            headers=self.headers,
        )


def measure(name: str, pid: int, load: Load, out_dir: Path) -> NativeProfile:
    """Both views of `pid` under `load`."""
    data = out_dir / f"{name}.perf.data"
    record = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-o", str(data)]
    recorder = subprocess.Popen(
        pinned([*record, "-p", str(pid)], load.cpus),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # perf attaches
    cpu = procfs.cpu_seconds(pid)
    loaded = load.run()
    used = procfs.cpu_seconds(pid) - cpu
    _interrupt(recorder)
    parts, samples = _parts(data)
    calls, strace_rps = _syscalls(pid, load, out_dir / f"{name}.strace.txt")
    return NativeProfile(
        name,
        loaded.rps,
        used / loaded.requests * 1e6 if loaded.requests else 0.0,
        parts,
        samples,
        calls,
        strace_rps,
    )


def _interrupt(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)  # perf and strace write their results on SIGINT
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"{process.args[0]} did not stop") from None
    if process.returncode not in (0, -signal.SIGINT, 130) and err:
        raise RuntimeError(f"{process.args[0]} failed: {err.decode(errors='replace')[-2000:]}")


def _parts(data: Path) -> tuple[list[tuple[str, float]], int]:
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "dso", "--stdio", "-q", "-n"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    counts: dict[str, int] = {}
    for line in report.stdout.splitlines():
        match = _DSO_LINE.match(line)
        if match is None:
            continue
        dso = match.group(2)
        part = next((label for label, pattern in PARTS if pattern.search(dso)), "other")
        counts[part] = counts.get(part, 0) + int(match.group(1))
    samples = sum(counts.values())
    shares = [(part, count / samples) for part, count in counts.items()] if samples else []
    return sorted(shares, key=lambda item: -item[1]), samples


def _syscalls(pid: int, load: Load, out: Path) -> tuple[list[tuple[str, float]], float]:
    tracer = subprocess.Popen(
        pinned(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)], load.cpus),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # strace attaches to every thread
    loaded = load.run()
    _interrupt(tracer)
    requests = loaded.requests or 1
    calls = []
    with contextlib.suppress(OSError):
        for line in out.read_text().splitlines():
            match = _STRACE_LINE.match(line)
            if match is not None and match.group(2) != "total":
                calls.append((match.group(2), int(match.group(1)) / requests))
    return sorted(calls, key=lambda item: -item[1]), loaded.rps


def section(profiles: list[NativeProfile], skipped: str, connections: int) -> list[str]:
    """The report's section: each part's microseconds per request, side by side."""
    title = "## Below Python: where each request's CPU goes, metergate and the floor"
    if not profiles:
        return [title, "", f"Not measured: {skipped}.", ""]
    missing = [f"Not measured further: {skipped}.", ""] if skipped else []
    names = [p.name for p in profiles]
    first = profiles[0]
    parts = [part for part, _ in first.parts]
    parts += [part for p in profiles[1:] for part, _ in p.parts if part not in parts]
    rows = []
    for part in parts:
        cells = [f"{p.micros(part):,.1f} ({100 * p.share(part):.1f}%)" for p in profiles]
        extra = [f"{first.micros(part) - p.micros(part):+,.1f}" for p in profiles[1:]]
        rows.append([part, *cells, *extra])
    rows.append(
        [
            "**all (CPU per request)**",
            *(f"**{p.cpu_us:,.1f}**" for p in profiles),
            *(f"**{first.cpu_us - p.cpu_us:+,.1f}**" for p in profiles[1:]),
        ]
    )
    calls = [call for call, _ in first.syscalls[:8]]
    calls += [c for p in profiles[1:] for c, _ in p.syscalls[:8] if c not in calls]
    call_rows = [
        [f"`{call}`", *(f"{dict(p.syscalls).get(call, 0.0):.2f}" for p in profiles)]
        for call in calls
    ]
    call_rows.append(["**all**", *(f"**{sum(n for _, n in p.syscalls):.2f}**" for p in profiles)])
    differences = [f"{names[0]} - {name} (µs)" for name in names[1:]]
    return [
        title,
        "",
        "`perf record -e cpu-clock -F 2000` on each process (every thread) while "
        f"wrk -c{connections} loaded it alone, split by shared object "
        "(`perf report --sort dso`); microseconds = the part's share of the samples x "
        "the CPU time per request over the same run "
        "(`/proc`, user + system). "
        + "; ".join(f"{p.name}: {p.rps:,.0f} requests/s, {p.samples:,} samples" for p in profiles)
        + ".",
        "",
        table(
            ["part", *(f"{name}: µs per request (share)" for name in names), *differences],
            rows,
            "l" + "r" * (len(names) + len(differences)),
        ),
        "",
        "System calls per request (`strace -c -f`, in a load of its own: strace slows a "
        "process several times over, the counts per request do not depend on it; "
        + ", ".join(f"{p.name} made {p.strace_rps:,.0f} requests/s under it" for p in profiles)
        + "):",
        "",
        table(["system call", *names], call_rows, "l" + "r" * len(names)),
        "",
        *missing,
    ]
