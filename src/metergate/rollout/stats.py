"""Live attempt statistics of one side of a rollout, over the current judgment window."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# A request meant for the candidate that its open circuit breakers turned away: an
# error of the candidate (not a 5xx it answered), with no latency to sample.
TURNED_AWAY = "circuit_open"
# Attempt outcomes that are the upstream's fault. A caller's own 4xx would show on both
# sides alike; it still counts, because a misconfigured candidate answers 4xx too.
ERRORS = frozenset(
    {
        "upstream_error",
        "timeout",
        "connection_error",
        "upstream_rejected",
        "rate_limited",
        TURNED_AWAY,
    }
)
SERVER_ERRORS = frozenset({"upstream_error", "timeout", "connection_error"})
_RESERVOIR = 4096


@dataclass(slots=True)
class WindowStats:
    attempts: int = 0
    errors: int = 0
    server_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    _seen: int = 0

    def observe(self, outcome: str, seconds: float) -> None:
        if outcome == "cancelled":
            return
        self.attempts += 1
        self.errors += outcome in ERRORS
        self.server_errors += outcome in SERVER_ERRORS
        if outcome == TURNED_AWAY:
            return
        # Reservoir sampling keeps the p99 estimate unbiased with bounded memory.
        self._seen += 1
        if len(self.latencies) < _RESERVOIR:
            self.latencies.append(seconds)
        else:
            slot = random.randrange(self._seen)
            if slot < _RESERVOIR:
                self.latencies[slot] = seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.attempts if self.attempts else 0.0

    @property
    def p99(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, -(-99 * len(ordered) // 100) - 1))]

    def summary(self) -> dict[str, float]:
        return {
            "attempts": self.attempts,
            "error_rate": round(self.error_rate, 6),
            "p99_seconds": round(self.p99, 6),
            "server_errors": self.server_errors,
        }
