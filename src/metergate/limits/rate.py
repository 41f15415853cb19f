"""Rate limits: requests and tokens per minute, per key and per model.

The algorithm is GCRA, a token bucket kept as one number per limit: the "theoretical
arrival time" (TAT) at which the bucket would be full again. Compared with a sliding
window it needs O(1) state and one read-modify-write (no log of timestamps, no
approximation between fixed windows), it is exact at every instant, and the same number
gives OpenAI's `remaining` and `reset` headers and a precise `Retry-After`.

- Requests: a bucket of `rpm` requests refilling continuously; each request must fit.
- Tokens: usage is known only after the answer, so admission requires only that the
  bucket is not in debt, and the real tokens (input + output) are debited afterwards.
  Concurrent requests can push it into debt; the debt then blocks new requests until it
  is repaid, so over any long stretch the rate stays within `tpm`.

Times are integer microseconds. This module is the implementation on one host, used
without Redis (and by a degraded fleet), its state shared by the workers of
`serve --workers N` (`limits.host`); `metergate.shared.scripts` does the same
arithmetic in Lua on Redis's clock for a fleet.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

from metergate.config.model import RateLimit, RateLimitsConfig
from metergate.errors import RateLimited
from metergate.limits.host import HostTats

MINUTE_US = 60_000_000
_UNLOCKED = contextlib.nullcontext()  # this process's own buckets: nothing to lock
Kind = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class Bucket:
    """One limit: `per_minute` requests or tokens for one key or one model."""

    scope: Literal["key", "model", "team"]
    name: str
    kind: Kind
    per_minute: int

    @property
    def interval_us(self) -> float:
        """Time one request or token takes to refill. Requests: whole microseconds,
        rounded down, so a full bucket admits exactly `per_minute` at once."""
        if self.kind == "requests":
            return float(MINUTE_US // self.per_minute)
        return MINUTE_US / self.per_minute

    @property
    def window_us(self) -> float:
        """How far the TAT may run ahead of now: the bucket's capacity in time."""
        return self.interval_us * self.per_minute if self.kind == "requests" else MINUTE_US

    @property
    def state_key(self) -> str:
        return f"{self.scope}:{self.name}:{'rpm' if self.kind == 'requests' else 'tpm'}"

    def describe(self) -> str:
        return f"{self.scope} {self.name!r}"


@dataclass(slots=True)  # not frozen: made per bucket per request (see estimate.WorstCase)
class Verdict:
    """One bucket's answer: admitted or not, the TAT to store, and header values."""

    admitted: bool
    tat: float
    remaining: int
    reset_us: float  # until the bucket is full again
    retry_us: float = 0  # when refused: until it would admit


def judge(bucket: Bucket, tat: float, now: float) -> Verdict:
    """GCRA admission of one request against one bucket (nothing is stored here)."""
    tat = max(tat, now)
    interval, window = bucket.interval_us, bucket.window_us
    if bucket.kind == "requests":
        after = tat + interval
        if after - now > window:
            return Verdict(False, tat, 0, tat - now, after - window - now)
        return Verdict(True, after, int((window - (after - now)) // interval), after - now)
    if tat - now >= window:  # in debt (or exactly empty): wait until a token is back
        return Verdict(False, tat, 0, tat - now, tat - now - window + 1)
    return Verdict(True, tat, int((window - (tat - now)) // interval), tat - now)


def token_debit_us(bucket: Bucket, tokens: int) -> int:
    """How far `tokens` move a token bucket's TAT (rounded up: never under-charged)."""
    return math.ceil(tokens * bucket.interval_us)


class RateLimiter:
    """Which buckets apply to a (key, model), and their state: this process's, or that of
    every worker of the host (`limits.host`), read and written while holding `lock`."""

    def __init__(
        self,
        config: RateLimitsConfig,
        carry: RateLimiter | None = None,
        host: HostTats | None = None,
    ) -> None:
        """`carry`: the limiter being replaced; bucket state carries over a reload.
        `host`: the workers' shared table, when there is one (else a dict of our own)."""
        self.config = config
        self._tat: dict[str, float] | HostTats = carry._tat if carry else (host or {})
        # `with limiter.lock:` around a check and its take, and around a debit
        self.lock: contextlib.AbstractContextManager[None] = (
            self._tat if isinstance(self._tat, HostTats) else _UNLOCKED
        )
        self._applicable: dict[
            tuple[str, str, str | None, tuple[int | None, int | None] | None], tuple[Bucket, ...]
        ] = {}
        # teams' own limits (from the database), under the config's `rate_limits.teams`
        self._team_limits: dict[str, RateLimit] = carry._team_limits if carry else {}
        self._teams = self._team_table()

    def __bool__(self) -> bool:
        return bool(self.config.keys or self.config.models or self._teams)

    def applicable(
        self,
        key: str,
        model: str,
        team: str | None = None,
        own: tuple[int | None, int | None] | None = None,
    ) -> tuple[Bucket, ...]:
        """The buckets of a request of `key` (of `team`, with its own rpm and tpm, `own`)
        for `model`. A key's own limits replace the `*` entry's for it; a named entry in
        the config still wins, field by field."""
        found = self._applicable.get((key, model, team, own))
        if found is None:
            found = self._applicable[(key, model, team, own)] = (
                *_buckets("key", key, self.config.keys, own),
                *_buckets("model", model, self.config.models),
                *(_buckets("team", team, self._teams) if team is not None else ()),
            )
        return found

    def set_team_limits(self, limits: dict[str, RateLimit]) -> None:
        """The teams' own limits; a team named in `rate_limits.teams` keeps the config's."""
        if limits != self._team_limits:
            self._team_limits = limits
            self._teams = self._team_table()
            self._applicable.clear()

    def _team_table(self) -> dict[str, RateLimit]:
        return {**self._team_limits, **self.config.teams}

    def check(self, buckets: tuple[Bucket, ...], now: float) -> list[Verdict]:
        """Judge every bucket; raise 429 for the first that refuses. Stores nothing."""
        verdicts = [judge(b, self._tat.get(b.state_key, now), now) for b in buckets]
        for bucket, verdict in zip(buckets, verdicts, strict=True):
            if not verdict.admitted:
                raise rate_limited(bucket, verdict, ratelimit_headers(buckets, verdicts))
        return verdicts

    def take(self, buckets: tuple[Bucket, ...], verdicts: list[Verdict]) -> None:
        """Commit admitted verdicts (only request buckets change at admission)."""
        for bucket, verdict in zip(buckets, verdicts, strict=True):
            if bucket.kind == "requests":
                self._tat[bucket.state_key] = verdict.tat

    def debit(self, buckets: tuple[Bucket, ...], tokens: int, now: float) -> None:
        """Charge the tokens an answer really used to the token buckets."""
        if tokens <= 0:
            return
        for bucket in buckets:
            if bucket.kind == "tokens":
                tat = max(self._tat.get(bucket.state_key, now), now)
                self._tat[bucket.state_key] = tat + token_debit_us(bucket, tokens)


def _buckets(  # type: ignore[no-untyped-def]
    scope: Literal["key", "model", "team"],
    name: str,
    table: dict[str, RateLimit],
    own: tuple[int | None, int | None] | None = None,
):
    """A named entry overrides `*` field by field; `null` in a named entry lifts a limit.
    `own`: a key's own rpm and tpm, between the two (None: not set)."""
    base, named = table.get("*"), table.get(name)
    for index, (field, kind) in enumerate((("rpm", "requests"), ("tpm", "tokens"))):
        if named is not None and field in named.model_fields_set:
            value = getattr(named, field)
        elif own is not None and own[index] is not None:
            value = own[index]
        else:
            value = getattr(base, field) if base is not None else None
        if value is not None:
            yield Bucket(scope, name, kind, value)  # type: ignore[arg-type]


def ratelimit_headers(
    buckets: tuple[Bucket, ...], verdicts: list[Verdict]
) -> list[tuple[bytes, bytes]]:
    """OpenAI's `x-ratelimit-*` headers, for the tightest request and token bucket."""
    headers: list[tuple[bytes, bytes]] = []
    for kind in ("requests", "tokens"):
        pairs = [(b, v) for b, v in zip(buckets, verdicts, strict=True) if b.kind == kind]
        if not pairs:
            continue
        bucket, verdict = min(pairs, key=lambda p: (p[1].remaining, -p[1].reset_us))
        headers += (
            (b"x-ratelimit-limit-" + kind.encode(), b"%d" % bucket.per_minute),
            (b"x-ratelimit-remaining-" + kind.encode(), b"%d" % max(0, verdict.remaining)),
            (b"x-ratelimit-reset-" + kind.encode(), openai_duration(verdict.reset_us).encode()),
        )
    return headers


def rate_limited(
    bucket: Bucket, verdict: Verdict, headers: list[tuple[bytes, bytes]]
) -> RateLimited:
    """429 in OpenAI's shape, naming the limit, with Retry-After (and -ms)."""
    wait = openai_duration(verdict.retry_us)
    if bucket.kind == "requests":
        detail = f"requests per min (RPM): Limit {bucket.per_minute}"
    else:
        debt = max(0, int((verdict.reset_us - bucket.window_us) // bucket.interval_us))
        detail = (
            f"tokens per min (TPM): Limit {bucket.per_minute}, answers already served used "
            f"{debt} tokens more than the bucket held"
        )
    message = f"Rate limit reached for {bucket.describe()} on {detail}. Please try again in {wait}."
    retry_ms = max(1, math.ceil(verdict.retry_us / 1000))
    return RateLimited(
        message,
        code="rate_limit_exceeded",
        headers=[
            (b"retry-after", b"%d" % math.ceil(retry_ms / 1000)),
            (b"retry-after-ms", b"%d" % retry_ms),
            *headers,
        ],
    )


def openai_duration(us: float) -> str:
    """A duration as OpenAI writes reset times: "120ms", "1s", "8.64s", "6m0s", "1h0m0s"."""
    ms = max(0, math.ceil(us / 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"
