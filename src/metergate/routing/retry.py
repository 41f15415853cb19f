"""Retry timing and the retry budget.

Backoff is exponential with full jitter (a uniform draw between zero and the capped
exponential), which spreads retries of many callers instead of synchronising them.
The retry budget is a token bucket filled by live traffic: each first attempt adds
`ratio` tokens and each retry spends one, so during an outage retries add at most that
fraction to the load on the failing provider (plus `min_per_second`, so a quiet gateway
can still retry).
"""

from __future__ import annotations

import random
import time

from metergate.config.model import RetryBudgetConfig, RetryConfig


def backoff_seconds(policy: RetryConfig, retry: int, retry_after: float | None) -> float | None:
    """How long to wait before retry number `retry` (0-based); None: do not wait, move on."""
    if retry_after is not None:
        return retry_after if retry_after <= policy.max_retry_after else None
    ceiling = min(policy.backoff_max, policy.backoff_base * (2**retry))
    return random.uniform(0, ceiling)


class RetryBudget:
    def __init__(self, config: RetryBudgetConfig) -> None:
        self.config = config
        self.capacity = max(10.0, config.min_per_second * 10)
        self.tokens = self.capacity
        self._last = time.monotonic()

    def on_request(self) -> None:
        self.tokens = min(self.capacity, self.tokens + self.config.ratio)

    def try_spend(self) -> bool:
        now = time.monotonic()
        refill = (now - self._last) * self.config.min_per_second
        self._last = now
        self.tokens = min(self.capacity, self.tokens + refill)
        if self.tokens < 1 - 1e-9:  # ten additions of 0.1 sum to 0.9999999999999999
            return False
        self.tokens -= 1
        return True
