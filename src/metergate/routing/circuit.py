"""Circuit breakers: stop sending traffic to an upstream that keeps failing.

Closed: traffic flows; the breaker opens after `failure_threshold` consecutive failures,
or when at least `min_requests` in the last `window_seconds` failed at `failure_ratio`
or more. Open: every request skips the upstream until `open_seconds` have passed.
Half-open: up to `half_open_probes` requests at a time probe it; that many successes
close the breaker, one failure opens it again.

The window is kept as counts in `WINDOW_BUCKETS` buckets of a tenth of it each, so a
result counts for the last 90 to 100 % of `window_seconds`. Keeping each result instead
held one entry per request for the whole window: at 5,000 requests/s and the default
30 s, 150,000 entries (~18 MB) per upstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from metergate.config.model import CircuitConfig

log = logging.getLogger("metergate.circuit")

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}
# Outcomes that say the upstream is unwell; a 4xx caused by the request does not.
FAILURES = frozenset({"upstream_error", "timeout", "connection_error", "rate_limited"})
WINDOW_BUCKETS = 10


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        config: CircuitConfig,
        on_change: Callable[[str, int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.state = CLOSED
        self._on_change = on_change
        self._clock = clock
        self._consecutive = 0
        self._bucket_seconds = config.window_seconds / WINDOW_BUCKETS
        self._newest = 0  # the number (time / bucket length) of the bucket last written
        self._requests = [0] * WINDOW_BUCKETS  # per bucket, at its number % WINDOW_BUCKETS
        self._failures = [0] * WINDOW_BUCKETS
        self._requests_in_window = 0
        self._failures_in_window = 0
        self._opened_at = 0.0
        self._probes = 0
        self._probe_successes = 0
        on_change(name, CLOSED)

    def allow(self) -> bool:
        """May a request be sent now? In half-open state this claims a probe slot."""
        if not self.config.enabled or self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self._clock() - self._opened_at < self.config.open_seconds:
                return False
            self._move(HALF_OPEN)
        if self._probes >= self.config.half_open_probes:
            return False
        self._probes += 1
        return True

    def available(self) -> bool:
        """Would `allow` say yes? (Without claiming a probe slot.)"""
        if not self.config.enabled or self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self._clock() - self._opened_at >= self.config.open_seconds
        return self._probes < self.config.half_open_probes

    def tick(self) -> None:
        """Go half-open once `open_seconds` have passed, without waiting for a request:
        the state gauge then says so, where an upstream with little traffic would look
        open (and its alert fire) long after it may be tried again."""
        if self.state == OPEN and self.available():
            self._move(HALF_OPEN)

    def retry_in(self) -> float:
        return max(0.0, self.config.open_seconds - (self._clock() - self._opened_at))

    def release(self) -> None:
        """An attempt ended without a verdict on the upstream (the caller went away, the
        gateway failed): give back its half-open probe slot, judge nothing."""
        if self.state == HALF_OPEN and self._probes:
            self._probes -= 1

    def record(self, outcome: str) -> None:
        """The upstream answered (`success`) or failed with an upstream outcome."""
        if not self.config.enabled or outcome == "cancelled":
            self.release()
            return
        failed = outcome in FAILURES
        if self.state == HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            if failed:
                self._open()
                return
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_probes:
                self._close()
            return
        if self.state == OPEN:
            return  # an attempt that started before the breaker opened
        self._consecutive = self._consecutive + 1 if failed else 0
        bucket = int(self._clock() / self._bucket_seconds)
        if bucket != self._newest:
            self._expire(bucket)
        slot = bucket % WINDOW_BUCKETS
        self._requests[slot] += 1
        total = self._requests_in_window = self._requests_in_window + 1
        if failed:
            self._failures[slot] += 1
            self._failures_in_window += 1
        if self._consecutive >= self.config.failure_threshold or (
            total >= self.config.min_requests
            and self._failures_in_window >= self.config.failure_ratio * total
        ):
            self._open()

    def _expire(self, bucket: int) -> None:
        """Move the window on to `bucket`: empty the buckets it no longer covers."""
        for number in range(max(self._newest + 1, bucket - WINDOW_BUCKETS + 1), bucket + 1):
            slot = number % WINDOW_BUCKETS
            self._requests_in_window -= self._requests[slot]
            self._failures_in_window -= self._failures[slot]
            self._requests[slot] = self._failures[slot] = 0
        self._newest = bucket

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probes = self._probe_successes = 0
        self._move(OPEN)

    def _close(self) -> None:
        self._consecutive = self._requests_in_window = self._failures_in_window = 0
        self._requests = [0] * WINDOW_BUCKETS
        self._failures = [0] * WINDOW_BUCKETS
        self._probes = self._probe_successes = 0
        self._move(CLOSED)

    def _move(self, state: int) -> None:
        if state != self.state:
            log.warning(
                "circuit %s: %s -> %s", self.name, STATE_NAMES[self.state], STATE_NAMES[state]
            )
            self.state = state
            self._on_change(self.name, state)
