"""Errors in OpenAI's JSON shape, so every SDK raises the right exception class."""

from __future__ import annotations

from typing import Any

import orjson

from metergate.providers.base import UpstreamFailure

# outcome (metric contract) -> OpenAI error type, for errors raised by the gateway itself
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """An error the caller sees. `outcome` is the metric contract's value for it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        outcome: str = "invalid_request",
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome
        self.code = code
        self.param = param
        self.error_type = error_type or _TYPES.get(status, "api_error")
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code, self.param)


def error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> bytes:
    payload: dict[str, Any] = {
        "error": {"message": message, "type": error_type, "code": code, "param": param}
    }
    return orjson.dumps(payload)


def unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(401, message, outcome="unauthorized", code=code)


def bad_request(
    message: str, *, code: str = "invalid_request", param: str | None = None
) -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def from_failure(failure: UpstreamFailure) -> GatewayError:
    """The caller-facing error for a failed upstream attempt, its message preserved."""
    headers = []
    if failure.retry_after is not None:
        headers.append((b"retry-after", str(int(failure.retry_after + 0.999)).encode()))
    return GatewayError(
        failure.status,
        failure.message,
        outcome=failure.outcome,
        code=failure.outcome,
        error_type=failure.error_type,
        headers=headers,
    )
