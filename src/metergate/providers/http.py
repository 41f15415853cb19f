"""Pooled HTTP transport shared by the HTTP adapters, and failure classification.

aiohttp is the client: on this hot path it measured clearly faster than httpx (see
docs/performance.md), and its connector keeps one keep-alive pool per provider.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import orjson

from metergate.config.model import ProviderConfig, Timeouts
from metergate.providers.base import UpstreamFailure

_KEYLIKE = re.compile(r"\b(sk|pk|key|AIza)[-_A-Za-z0-9]{12,}")


class HttpTransport:
    """One keep-alive connection pool to one provider, with its auth headers prebuilt."""

    def __init__(self, config: ProviderConfig, headers: dict[str, str]) -> None:
        self.config = config
        self.headers = {"content-type": "application/json", **headers, **config.headers}
        self._secret = config.api_key.get_secret_value() if config.api_key else ""
        self.session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[Timeouts, bool], aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def client_timeout(self, timeouts: Timeouts, stream: bool) -> aiohttp.ClientTimeout:
        """aiohttp's timeout for an attempt, built once per distinct setting.

        `sock_read` bounds the wait for the first byte and every later read; a stream has
        no total (it may legitimately run long) and its reads switch to `stream_idle`
        once the first chunk arrived (see `idle_after_first_chunk`).
        """
        found = self._timeouts.get((timeouts, stream))
        if found is None:
            found = self._timeouts[(timeouts, stream)] = aiohttp.ClientTimeout(
                total=None if stream else timeouts.total,
                sock_connect=timeouts.connect,
                sock_read=timeouts.first_byte,
            )
        return found

    async def post(self, url: str, payload: dict[str, Any], timeouts: Timeouts) -> bytes:
        """POST JSON and return the body of a 2xx answer; raise a classified failure otherwise."""
        assert self.session is not None, "transport used before start()"
        timeout = self.client_timeout(timeouts, stream=False)
        answered = False
        try:
            async with self.session.post(
                url, data=orjson.dumps(payload), timeout=timeout
            ) as response:
                answered = True
                body = await response.read()
                if response.status >= 300:
                    raise self.failure_from_response(response.status, response.headers, body)
                return body
        except UpstreamFailure:
            raise
        except Exception as exc:
            failure = self.failure_from_exception(exc)
            failure.partial = answered
            raise failure from exc

    async def open_stream(
        self, url: str, payload: dict[str, Any], timeouts: Timeouts
    ) -> aiohttp.ClientResponse:
        """POST and return the response once its headers arrived; the caller must release it."""
        assert self.session is not None, "transport used before start()"
        timeout = self.client_timeout(timeouts, stream=True)
        try:
            response = await self.session.post(url, data=orjson.dumps(payload), timeout=timeout)
        except Exception as exc:
            raise self.failure_from_exception(exc) from exc
        if response.status >= 300:
            try:
                body = await response.read()
            except Exception:
                body = b""
            finally:
                response.release()
            raise self.failure_from_response(response.status, response.headers, body)
        return response

    def failure_from_exception(self, exc: BaseException) -> UpstreamFailure:
        if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            return UpstreamFailure(
                "timeout",
                "the upstream did not answer in time",
                status=504,
                error_type="timeout",
            )
        detail = self.redact(str(exc) or type(exc).__name__)
        return UpstreamFailure(
            "connection_error",
            f"could not reach the upstream: {detail}",
            status=502,
            error_type="connection_error",
        )

    def failure_from_response(self, status: int, headers: Any, body: bytes) -> UpstreamFailure:
        message = self.redact(error_message(body) or f"HTTP {status}")
        retry_after = parse_retry_after(headers.get("retry-after"))
        if status == 429:
            return UpstreamFailure(
                "rate_limited",
                f"upstream rate limit: {message}",
                status=429,
                upstream_status=status,
                retry_after=retry_after,
                error_type="rate_limit_error",
            )
        if status >= 500:
            return UpstreamFailure(
                "upstream_error",
                f"upstream error {status}: {message}",
                status=503 if status == 503 else 502,
                upstream_status=status,
                retry_after=retry_after,
            )
        if status in (401, 403, 404):
            # The gateway's own provider credentials or model id are wrong: not the caller's
            # fault, and a 401 would wrongly tell the caller that their gateway key is bad.
            return UpstreamFailure(
                "upstream_rejected",
                f"upstream refused the gateway's request ({status}): {message}; "
                "check this provider's api_key and model id in the gateway config",
                status=502,
                upstream_status=status,
            )
        return UpstreamFailure(
            "upstream_rejected",
            message,
            status=status if status in (400, 413, 422) else 400,
            upstream_status=status,
            error_type="invalid_request_error",
        )

    def redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return _KEYLIKE.sub("***", text)


def error_message(body: bytes) -> str:
    """The human message of an OpenAI, Anthropic or Gemini error body (all use error.message)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace").strip()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if data.get("message"):
            return str(data["message"])
    return body[:300].decode("utf-8", "replace").strip()


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
