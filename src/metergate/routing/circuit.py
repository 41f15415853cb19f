"""Circuit breakers: stop sending traffic to an upstream that keeps failing.

Closed: traffic flows; the breaker opens after `failure_threshold` consecutive failures,
or when at least `min_requests` in the last `window_seconds` failed at `failure_ratio`
or more. Open: every request skips the upstream until `open_seconds` have passed.
Half-open: up to `half_open_probes` requests at a time probe it; that many successes
close the breaker, one failure opens it again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from metergate.config.model import CircuitConfig

log = logging.getLogger("metergate.circuit")

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}
# Outcomes that say the upstream is unwell; a 4xx caused by the request does not.
FAILURES = frozenset({"upstream_error", "timeout", "connection_error", "rate_limited"})


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
        self._window: deque[tuple[float, bool]] = deque()  # (time, failed)
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
        now = self._clock()
        self._window.append((now, failed))
        self._failures_in_window += failed
        horizon = now - self.config.window_seconds
        while self._window and self._window[0][0] < horizon:
            self._failures_in_window -= self._window.popleft()[1]
        total = len(self._window)
        if self._consecutive >= self.config.failure_threshold or (
            total >= self.config.min_requests
            and self._failures_in_window >= self.config.failure_ratio * total
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probes = self._probe_successes = 0
        self._move(OPEN)

    def _close(self) -> None:
        self._consecutive = self._failures_in_window = 0
        self._window.clear()
        self._probes = self._probe_successes = 0
        self._move(CLOSED)

    def _move(self, state: int) -> None:
        if state != self.state:
            log.warning(
                "circuit %s: %s -> %s", self.name, STATE_NAMES[self.state], STATE_NAMES[state]
            )
            self.state = state
            self._on_change(self.name, state)
