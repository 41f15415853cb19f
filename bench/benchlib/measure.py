"""Measurements of one target that several scenarios take (the suite, the A/B run)."""

from __future__ import annotations

from benchlib import probe, wrk
from benchlib.outcome import TtftRun, ms
from benchlib.targets import STREAM_BODY, Target


def half_load_connections(
    target: Target, max_rps: float, seconds: int, cpus: str | None
) -> tuple[int, list[tuple[int, float]]]:
    """The wrk connection count whose throughput is closest to half of `max_rps`."""
    tried: list[tuple[int, float]] = []
    for connections in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48):
        result = wrk.run(
            target.unary,
            connections=connections,
            seconds=seconds,
            token=target.token,
            cpus=cpus,
            headers=target.headers("unary"),
        )
        tried.append((connections, result.rps))
        if result.rps >= 0.5 * max_rps:
            break
    best = min(tried, key=lambda item: abs(item[1] - 0.5 * max_rps))
    return best[0], tried


def ttft_once(target: Target, count: int) -> TtftRun:
    """`count` streamed requests one after the other on one connection: when each one's
    first body bytes arrived, and when it ended."""
    exchanges = probe.run(
        probe.sequential(target.stream, STREAM_BODY, target.token, count, target.headers("stream"))
    )
    good = [
        e
        for e in exchanges
        if e.status == 200 and e.error is None and e.first_event is not None and b"[DONE]" in e.body
    ]
    firsts = [ms(e.first_event) for e in good if e.first_event is not None]
    totals = [ms(e.done) for e in good if e.done is not None]
    return TtftRun(
        probe.percentile(firsts, 50) if firsts else float("nan"),
        probe.percentile(firsts, 99) if firsts else float("nan"),
        probe.percentile(totals, 50) if totals else float("nan"),
        len(good),
        len(exchanges),
    )
