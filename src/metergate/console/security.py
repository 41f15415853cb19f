"""Response headers for the console and the admin API, and the sign-in failure limiter.

The console keeps the admin key in the tab's sessionStorage and sends it as a Bearer
header, so a strict Content-Security-Policy (scripts from this origin only, nothing
inline) is what keeps a script injected through ledger data from reading it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# The console page: its own scripts and styles only; data arrives by fetch to itself.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# JSON and CSV: nothing in them may ever run or be framed.
API_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

_COMMON = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def secure_headers(csp: str = API_CSP, cache: str = "no-store") -> list[tuple[bytes, bytes]]:
    """Headers for every console and admin response; `no-store` unless it is a static asset."""
    return [
        (b"content-security-policy", csp.encode()),
        *_COMMON,
        (b"cache-control", cache.encode()),
    ]


class FailedSignIns:
    """Counts wrong admin keys per client address; past `limit` in `window` seconds the
    address is refused (even with the right key) until its oldest failure expires.

    Per process: with N workers an address gets up to N x `limit` guesses a window, still
    hopeless against a random key but worth knowing. The address is the peer's, or the
    client's named in X-Forwarded-For when the peer is one of `server.trusted_proxies`
    (uvicorn rewrites it, `metergate serve` configures which): anyone else could forge
    the header to get fresh attempts. Behind an unlisted proxy all clients share one.
    """

    def __init__(
        self,
        limit: int = 5,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 10_000,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        failures = self._failures.get(address)
        if failures is None:
            return 0.0
        horizon = self._clock() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return 0.0
        if len(failures) < self.limit:
            return 0.0
        return failures[-self.limit] + self.window - self._clock()

    def fail(self, address: str) -> None:
        if address not in self._failures and len(self._failures) >= self._max:
            self._prune()
        self._failures.setdefault(address, deque(maxlen=self.limit)).append(self._clock())

    def _prune(self) -> None:
        """Bound memory under a spray of addresses: drop expired, then the oldest."""
        for address in list(self._failures):
            self.retry_after(address)
        while len(self._failures) >= self._max:
            del self._failures[next(iter(self._failures))]
