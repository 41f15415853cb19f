"""Judge a rollout stage: does the candidate stay within every gate?

Verdicts: `pass` (promote), `fail` (counts toward rolling back), `insufficient` (fewer
than `min_requests` candidate attempts: hold; a stage is never promoted on too little
data). Too few attempts still fail when more could not change the verdict: more 5xx
than `max_5xx`, or more errors than `max_error_rate` allows of `min_requests` attempts.
A candidate that fails every call opens its circuit breaker and then gets one probe
now and then, never `min_requests` attempts: without this, it would hold for ever when
judged from Prometheus. Judged locally, the requests its open circuit turns away count
as failed attempts too (`Rollout.turned_away`), and it fails on those. Prometheus does
not see them; it sees `metergate_circuit_state`, and a candidate whose every circuit is
open when judged (on every replica that reports one; a replica of several workers
reports the most open of theirs) fails the `circuit_open` gate: it is failing now, and
the traffic that would show it more is being turned away.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from metergate.config.model import RolloutConfig
from metergate.rollout.state import Rollout
from metergate.rollout.stats import WindowStats

if TYPE_CHECKING:
    import httpx2

PASS, FAIL, INSUFFICIENT = "pass", "fail", "insufficient"


@dataclass(frozen=True, slots=True)
class Observed:
    attempts: float
    error_rate: float
    p99_seconds: float
    server_errors: float
    circuit_open: bool = False  # every circuit of the side open (Prometheus's view)

    @classmethod
    def from_window(cls, stats: WindowStats) -> Observed:
        return cls(stats.attempts, stats.error_rate, stats.p99, stats.server_errors)


def judge(config: RolloutConfig, candidate: Observed, baseline: Observed | None) -> dict[str, Any]:
    gates = config.gates
    checks = {
        "error_rate": (candidate.error_rate, gates.max_error_rate),
        "p99_seconds": (candidate.p99_seconds, gates.max_p99_seconds),
        "server_errors": (candidate.server_errors, gates.max_5xx),
    }
    if config.source == "prometheus":  # judged locally, turned-away requests count instead
        checks["circuit_open"] = (float(candidate.circuit_open), 0)
    failed = [name for name, (value, limit) in checks.items() if value > limit]
    if candidate.attempts < config.min_requests:
        errors = candidate.error_rate * candidate.attempts
        failed = [
            name
            for name in failed
            if name in ("server_errors", "circuit_open")
            or (name == "error_rate" and errors > gates.max_error_rate * config.min_requests)
        ]
        verdict = FAIL if failed else INSUFFICIENT
    else:
        verdict = FAIL if failed else PASS
    return {
        "at": time.time(),
        "verdict": verdict,
        "failed_gates": failed,
        "gates": {
            name: {"value": round(v, 6), "limit": limit} for name, (v, limit) in checks.items()
        },
        "candidate": _summary(candidate),
        "baseline": _summary(baseline) if baseline else None,
        "min_requests": config.min_requests,
    }


def _summary(observed: Observed) -> dict[str, float]:
    return {
        "attempts": observed.attempts,
        "error_rate": round(observed.error_rate, 6),
        "p99_seconds": round(observed.p99_seconds, 6),
        "server_errors": observed.server_errors,
    }


def local_observations(rollout: Rollout) -> tuple[Observed, Observed]:
    return (
        Observed.from_window(rollout.candidate_stats),
        Observed.from_window(rollout.baseline_stats),
    )


async def prometheus_observations(
    rollout: Rollout, session: httpx2.AsyncClient, window_seconds: float
) -> tuple[Observed, Observed]:
    """Fleet-wide numbers from Prometheus over the judgment window, per side."""
    assert rollout.config.prometheus_url
    window = f"{max(1, int(window_seconds))}s"
    model = rollout.config.model.replace("\\", "\\\\").replace('"', '\\"')

    async def side(upstreams: list[str]) -> Observed:
        match = "|".join(upstreams)
        # Attempts the upstream answered or failed (as WindowStats counts them).
        attempts = (
            f'metergate_upstream_attempts_total{{upstream=~"{match}",'
            'outcome!~"cancelled|gateway_error|invalid_request"}'
        )
        queries = {
            "attempts": f"sum(increase({attempts}[{window}]))",
            "errors": f'sum(increase(metergate_upstream_attempts_total{{upstream=~"{match}",'
            f'outcome=~"upstream_error|timeout|connection_error|upstream_rejected|'
            f'rate_limited"}}[{window}]))',
            "server_errors": f'sum(increase(metergate_upstream_attempts_total{{upstream=~"{match}",'
            f'outcome=~"upstream_error|timeout|connection_error"}}[{window}]))',
            # Requests of the rollout's model only; attempts have no model label (the
            # metric contract), so other models on these upstreams count there.
            "p99": "histogram_quantile(0.99, sum by (le) (rate("
            f'metergate_request_duration_seconds_bucket{{upstream=~"{match}",model="{model}"}}'
            f"[{window}])))",
            # The least open of the side's circuits (2 open, 1 half-open, 0 closed), now.
            "circuit": f'min(metergate_circuit_state{{upstream=~"{match}"}})',
        }
        values = {
            name: await _instant(session, rollout.config.prometheus_url or "", query)
            for name, query in queries.items()
        }
        attempts_n = values["attempts"]
        return Observed(
            attempts_n,
            values["errors"] / attempts_n if attempts_n else 0.0,
            values["p99"],
            values["server_errors"],
            values["circuit"] == 2,
        )

    return await side(rollout.config.candidate), await side(rollout.config.baseline)


async def _instant(session: httpx2.AsyncClient, base: str, query: str) -> float:
    answer = await session.get(f"{base.rstrip('/')}/api/v1/query", params={"query": query})
    body = answer.json()
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query failed: {body.get('error', body)}")
    result = body["data"]["result"]
    if not result:
        return 0.0  # no data: counts as zero attempts, which judges as insufficient
    value = float(result[0]["value"][1])
    return 0.0 if value != value else value  # NaN (no traffic) -> 0
