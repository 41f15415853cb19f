"""Every way a request can fail, as one family of error kinds (a leaf: imports nothing of
metergate, so every package may raise them).

Each kind knows what the caller sees (HTTP status, OpenAI error `type` and `code`), what
the metric contract records (`outcome`), and two things the dispatcher needs:

- `retryable`: may another attempt (here, or on another deployment) succeed? A caller's
  own mistake, a gateway bug and the gateway's own limits are final.
- `charged`: does it count as the upstream failing, for its circuit breaker? **Only what
  an upstream did can be held against it**: a full connection pool, a request the gateway
  could not encode, a caller that went away or an internal bug are never the upstream's
  fault (nor its rollout gates' business), and one caller must not be able to open a
  breaker that every other caller depends on. Only `UpstreamFailure` kinds reach an
  upstream's breaker and rollout statistics at all.

Upstream kinds also say whether part of the answer had arrived (`partial`: the upstream
did work, so it is neither redone nor sent elsewhere).
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

Headers = list[tuple[bytes, bytes]]


class GatewayError(Exception):
    """An error that ends a request. Subclasses fix the defaults; a raise may override
    `status` (e.g. 404 vs 405 for a caller error) and add `code`, `param` and headers."""

    status: int = 500
    outcome: ClassVar[str] = "gateway_error"
    error_type: str = "api_error"
    retryable: ClassVar[bool] = False
    charged: ClassVar[bool] = False

    @property
    def request_outcome(self) -> str:
        """The outcome of the request this error ends (the ledger's, and
        `metergate_requests_total`'s): its attempt's `outcome`, but where a subclass says."""
        return self.outcome

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: Headers | None = None,
        retry_after: float | None = None,
        partial: bool = False,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.code = code if code is not None else self.default_code()
        self.param = param
        self.extra_headers = headers or []
        self.retry_after = retry_after
        self.partial = partial
        self.upstream_status = upstream_status

    def default_code(self) -> str | None:
        return None

    @property
    def headers(self) -> Headers:
        """Headers of the error answer: Retry-After when there is a wait to suggest."""
        if self.retry_after is None or any(n == b"retry-after" for n, _ in self.extra_headers):
            return self.extra_headers
        return [(b"retry-after", b"%d" % int(self.retry_after + 0.999)), *self.extra_headers]

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code, self.param)


def error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> bytes:
    """OpenAI's error shape, so every SDK raises the class it maps the status to."""
    payload: dict[str, Any] = {
        "error": {"message": message, "type": error_type, "code": code, "param": param}
    }
    return orjson.dumps(payload)


def quoted(value: str, limit: int = 100) -> str:
    """A caller's string in an error message, quoted: a long one cut to its first `limit`
    characters and followed by its length, so that a megabyte of model name does not come
    back whole in the answer (and in logs)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} characters)"


# --- the caller's side: never retried, never charged --------------------------------


class InvalidRequest(GatewayError):
    """The request itself is wrong (400, or 404/405/413 where `status` says so)."""

    status = 400
    outcome = "invalid_request"
    error_type = "invalid_request_error"


class NotFound(InvalidRequest):
    status = 404
    error_type = "not_found_error"


class Unauthorized(GatewayError):
    status = 401
    outcome = "unauthorized"
    error_type = "authentication_error"


class RateLimited(GatewayError):
    """The gateway's own rate limit for a key or model (not an upstream's 429)."""

    status = 429
    outcome = "rate_limited"
    error_type = "rate_limit_error"


class BudgetExceeded(GatewayError):
    status = 429
    outcome = "budget_exceeded"
    error_type = "budget_exceeded"

    def default_code(self) -> str | None:
        return "budget_exceeded"


class ClientGone(GatewayError):
    """The caller closed the connection before the answer was complete."""

    status = 499
    outcome = "cancelled"
    error_type = "invalid_request_error"


# --- the gateway's own: counted as errors, never held against an upstream ------------


class InternalError(GatewayError):
    """A fault of the gateway itself (a bug): the message quotes the request id."""


class GatewayLimit(GatewayError):
    """A limit or dependency of the gateway, not of the upstream: a full connection pool,
    shared state (Redis) unreachable. 503, not retried on the same deployment."""

    status = 503


class LedgerUnavailable(GatewayLimit):
    """The ledger database did not answer. What needs it (the admin API, the console,
    usage reports) waits for it; model calls go on, their rows spooled."""

    def __init__(self) -> None:
        super().__init__(
            "the ledger database is unreachable, so this cannot be done now (model calls "
            "are still answered); try again shortly",
            retry_after=1,
        )

    def default_code(self) -> str | None:
        return "ledger_unavailable"


class ShutDown(GatewayLimit):
    """The gateway stopped (its shutdown grace period ran out) before the answer came."""

    def default_code(self) -> str | None:
        return "shutting_down"

    @classmethod
    def of(cls, request_id: str) -> ShutDown:
        return cls(
            f"the gateway shut down before request {request_id} was answered (its grace "
            "period for requests in flight ran out); retry it",
            retry_after=1,
        )


# --- the upstream's side ------------------------------------------------------------


class UpstreamFailure(GatewayError):
    """What an upstream did: answered an error, broke the protocol, or could not be
    reached. Retryable and charged unless a subclass says otherwise."""

    status = 502
    outcome = "upstream_error"
    error_type = "upstream_error"
    retryable = True
    charged = True

    def default_code(self) -> str | None:
        return self.outcome


class UpstreamServerError(UpstreamFailure):
    """A 5xx answer (503 stays 503 for the caller, every other 5xx becomes 502)."""


class UpstreamProtocolError(UpstreamFailure):
    """An answer the gateway cannot use: malformed HTTP, JSON or stream, oversized headers."""


class UpstreamRateLimited(UpstreamFailure):
    """The upstream's 429. Its attempt is `rate_limited` (retried, and held against the
    upstream); a request it ends is `upstream_rejected`, the provider's 4xx, an error of
    the service: `rate_limited` is the gateway's own limits refusing the caller."""

    status = 429
    outcome = "rate_limited"
    error_type = "rate_limit_error"

    @property
    def request_outcome(self) -> str:
        return "upstream_rejected"


class UpstreamTimeout(UpstreamFailure):
    """The upstream accepted the request but did not answer (or finish) in time."""

    status = 504
    outcome = "timeout"
    error_type = "timeout"


class ConnectFailed(UpstreamFailure):
    """The upstream could not be reached, or dropped the connection."""

    outcome = "connection_error"
    error_type = "connection_error"


class ConnectTimeout(ConnectFailed):
    """Opening the connection (TCP, proxy tunnel, TLS) took longer than `timeouts.connect`."""


class UpstreamRejected(UpstreamFailure):
    """A 4xx the upstream blamed on the request (400/413/422: the caller's to fix, final)
    or on the gateway's credentials or model id (401/403/404: tried elsewhere, not retried
    here). Not held against the upstream's breaker: it is healthy, just refusing."""

    outcome = "upstream_rejected"
    error_type = "invalid_request_error"
    charged = False

    @property
    def final(self) -> bool:
        return self.status in (400, 413, 422)


def is_final(error: GatewayError) -> bool:
    """Neither retried nor sent to another deployment or fallback."""
    return (
        not error.retryable
        or error.partial
        or (isinstance(error, UpstreamRejected) and error.final)
    )
