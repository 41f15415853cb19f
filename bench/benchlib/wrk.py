"""Drive wrk and read its text report (latency percentiles, requests/s, errors).

wrk prints durations with a unit chosen per value (`143.00us`, `1.15ms`, `2.10s`), so
every time is parsed with its unit and kept in milliseconds.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import BenchError, pinned, tool

POST_SCRIPT = Path(__file__).resolve().parent.parent / "wrk" / "post.lua"
STREAM_SCRIPT = POST_SCRIPT.with_name("stream.lua")
_TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None  # None when run without --latency
    p99_ms: float | None
    non_2xx: int
    socket_errors: int
    output: str

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def to_ms(value: str, unit: str) -> float:
    return float(value) * _TO_MS[unit]


def parse(output: str) -> WrkResult:
    """Read wrk's report; raise when a number every run prints is missing."""
    total = re.search(rf"^\s*(\d+) requests in {_TIME}", output, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if total is None or rps is None:
        raise BenchError(f"cannot read wrk output:\n{output}")
    percentiles = {
        float(m.group(1)): to_ms(m.group(2), m.group(3))
        for m in re.finditer(rf"^\s*([\d.]+)%\s+{_TIME}\s*$", output, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests=int(total.group(1)),
        seconds=to_ms(total.group(2), total.group(3)) / 1e3,
        rps=float(rps.group(1)),
        p50_ms=percentiles.get(50.0),
        p99_ms=percentiles.get(99.0),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
        output=output,
    )


def run(
    url: str,
    *,
    connections: int,
    seconds: int,
    token: str,
    cpus: str | None,
    threads: int = 1,
    script: Path = POST_SCRIPT,
    headers: Sequence[str] = (),
) -> WrkResult:
    """One wrk run (always with --latency); bounded by a timeout well past its duration.
    `headers` ("Name: value") are added to every request by the script."""
    command = [
        tool("wrk"),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        token,
        *headers,
    ]
    done = subprocess.run(
        pinned(command, cpus), capture_output=True, text=True, timeout=seconds + 30
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return parse(done.stdout)
