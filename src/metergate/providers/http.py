"""The HTTP transport shared by the HTTP adapters, and failure classification.

Requests go through `h1.HttpClient`, a small pooled HTTP/1.1 client: on this hot path it
costs about 100 µs less CPU per request than aiohttp (bench/stack/results.md), and
httpx was far slower still. Headers are encoded once per provider.
"""

from __future__ import annotations

import datetime
import email.utils
import errno
import html
import math
import re
import resource
import weakref
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import orjson

from metergate import __version__
from metergate.config.model import ProviderConfig, Timeouts
from metergate.errors import (
    ConnectFailed,
    ConnectTimeout,
    GatewayLimit,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from metergate.providers import h1
from metergate.providers.base import Adapter
from metergate.providers.h1 import Deadlines, H1Error, HttpClient, StreamResponse
from metergate.providers.proxy import proxy_for

_KEYLIKE = re.compile(r"\b(sk|pk|key|AIza)[-_A-Za-z0-9]{12,}|\b(AKIA|ASIA)[A-Z0-9]{16}\b")
# Headers that carry a provider credential, whatever the adapter; every header the
# operator configured (`providers.*.headers`) is treated as one too.
_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key"}
)
# The credentials each live transport sends: taken out of any upstream text that reaches
# a caller or a log (an upstream that echoes the request's headers in its error).
_credentials: weakref.WeakKeyDictionary[HttpTransport, tuple[str, ...]] = (
    weakref.WeakKeyDictionary()
)


# The status of the 2xx answer the current attempt got (set in the attempt's task): the
# request log's attempt shows it; a failure carries its own (`upstream_status`).
answered_status: ContextVar[int | None] = ContextVar("answered_status", default=None)


class HttpTransport:
    """One keep-alive connection pool to one provider, with its headers prebuilt."""

    def __init__(self, config: ProviderConfig, headers: dict[str, str], base_url: str) -> None:
        self.config = config
        parts = urlsplit(base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.name = "this provider"  # the adapter names it (for messages) once built
        merged = {
            "content-type": "application/json",
            "accept-encoding": "gzip",
            "user-agent": f"metergate/{__version__}",
            **headers,
            **config.headers,
        }
        for name, value in merged.items():
            if any(c in name + value for c in "\r\n"):
                raise ValueError(f"header {name!r} of provider contains a line break")
        self.head = "".join(f"{name}: {value}\r\n" for name, value in merged.items()).encode()
        self._configured = _credentials_of(config, merged)
        self._fetched: tuple[set[str], ...] = ()
        _credentials[self] = _longest_first(self._configured)
        self.client: HttpClient | None = None
        # Keyed by the Timeouts object's identity: hashing a frozen pydantic model hashes
        # every field, per request. A deployment's Timeouts live as long as its plan.
        self._deadlines: dict[tuple[int, bool], tuple[Timeouts, Deadlines]] = {}

    async def start(self) -> None:
        self.client = HttpClient(
            self.origin,
            self.config.max_connections,
            max_body=self.config.max_response_bytes,
            proxy=proxy_for(self.origin, self.config.proxy),
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def deadlines(self, timeouts: Timeouts, stream: bool) -> Deadlines:
        """A stream is bounded as a whole only by `stream_total`, if set (it may
        legitimately run long); its gaps after the first chunk by `stream_idle` instead of
        `first_byte`."""
        cached = self._deadlines.get((id(timeouts), stream))
        if cached is not None and cached[0] is timeouts:  # (an id can be reused)
            return cached[1]
        found = Deadlines(
            connect=timeouts.connect,
            first_byte=timeouts.first_byte,
            total=timeouts.stream_total if stream else timeouts.total,
            idle=timeouts.stream_idle if stream else None,
            pool=timeouts.pool,
        )
        self._deadlines[(id(timeouts), stream)] = (timeouts, found)
        return found

    async def post(
        self,
        url: str,
        payload: dict[str, Any] | bytes,
        timeouts: Timeouts,
        headers: bytes = b"",
    ) -> bytes:
        """POST JSON and return the body of a 2xx answer; raise a classified failure otherwise.

        `headers`: CRLF-terminated lines for this request only (a SigV4 signature, a
        rotating bearer token); `payload` may come encoded when those headers sign it.
        """
        assert self.client is not None, "transport used before start()"
        try:
            response = await self.client.post(
                url.removeprefix(self.origin),
                self.head + headers if headers else self.head,
                payload if isinstance(payload, bytes) else orjson.dumps(payload),
                self.deadlines(timeouts, stream=False),
            )
        except (H1Error, OSError) as exc:
            raise self.failure_from_exception(exc) from exc
        if response.status >= 300:
            raise self.failure_from_response(response.status, response.headers, response.body)
        answered_status.set(response.status)
        return response.body

    async def open_stream(
        self,
        url: str,
        payload: dict[str, Any] | bytes,
        timeouts: Timeouts,
        headers: bytes = b"",
    ) -> StreamResponse:
        """POST and return the response once its headers arrived; the caller must close it."""
        assert self.client is not None, "transport used before start()"
        try:
            response = await self.client.stream(
                url.removeprefix(self.origin),
                self.head + headers if headers else self.head,
                payload if isinstance(payload, bytes) else orjson.dumps(payload),
                self.deadlines(timeouts, stream=True),
            )
        except (H1Error, OSError) as exc:
            raise self.failure_from_exception(exc) from exc
        if response.status >= 300:
            try:
                body = await response.read()
            except H1Error:
                body = b""
            finally:
                response.close()
            raise self.failure_from_response(response.status, response.headers, body)
        answered_status.set(response.status)
        return response

    def failure_from_exception(self, exc: BaseException) -> UpstreamFailure | GatewayLimit:
        """The gateway's error kind for a transport failure (the one place they map)."""
        partial = isinstance(exc, H1Error) and exc.partial
        detail = self.redact(str(exc) or type(exc).__name__)
        if isinstance(exc, h1.PoolTimeout):
            return GatewayLimit(
                f"the gateway's connection limit for provider {self.name!r} is reached: "
                f"{detail} (max_connections: {self.config.max_connections}, "
                f"timeouts.pool); raise max_connections or add capacity",
                code="gateway_pool_exhausted",
            )
        if _out_of_files(exc):  # the gateway's own limit: never held against the upstream
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            return GatewayLimit(
                f"the gateway has no file descriptor left to reach provider {self.name!r} "
                f"(it may open {soft} files, and each request in flight holds two: its "
                "caller's connection and its upstream's); raise the limit (systemd "
                "LimitNOFILE=, docker --ulimit nofile=, ulimit -n) or add capacity",
                code="gateway_out_of_files",
            )
        if isinstance(exc, h1.TooLarge):  # a limit of this gateway, named so it can be raised
            return UpstreamProtocolError(
                f"{detail} (max_response_bytes of provider {self.name!r})", partial=partial
            )
        if isinstance(exc, h1.ConnectTimeout):
            return ConnectTimeout(f"could not reach the upstream: {detail} (timeouts.connect)")
        if isinstance(exc, h1.ReadTimeout):
            return UpstreamTimeout(f"{detail} (timeouts.{exc.setting})", partial=partial)
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout("the upstream did not answer in time", partial=partial)
        if isinstance(exc, h1.Disconnected):  # it says when: before or while answering
            return ConnectFailed(detail, partial=partial)
        if isinstance(exc, h1.ConnectError | OSError):
            return ConnectFailed(f"could not reach the upstream: {detail}", partial=partial)
        return UpstreamProtocolError(
            f"the upstream broke the HTTP protocol: {detail}", partial=partial
        )

    def failure_from_response(
        self, status: int, headers: dict[bytes, bytes], body: bytes
    ) -> UpstreamFailure:
        message = self.redact(error_message(body) or f"HTTP {status}")
        retry_after = parse_retry_after(headers.get(b"retry-after"))
        if status == 429:
            return UpstreamRateLimited(
                f"upstream rate limit: {message}",
                upstream_status=status,
                retry_after=retry_after,
            )
        if status >= 500:
            return UpstreamServerError(
                f"upstream error {status}: {message}",
                status=503 if status == 503 else 502,
                upstream_status=status,
                retry_after=retry_after,
            )
        if status in (401, 403, 404):
            # The gateway's own provider credentials or model id are wrong: not the caller's
            # fault, and a 401 would wrongly tell the caller that their gateway key is bad.
            return UpstreamRejected(
                f"upstream refused the gateway's request ({status}): {message}; "
                "check this provider's api_key and model id in the gateway config",
                error_type="upstream_error",
                upstream_status=status,
            )
        if not body.strip():
            message = f"the upstream answered {status} with an empty body"
        elif not body.lstrip().startswith(b"{"):  # a proxy's page or text, not the API's
            message = f"the upstream answered {status}: {message}"
        return UpstreamRejected(
            message,
            status=status if status in (400, 413, 422) else 400,
            param=error_param(body),
            upstream_status=status,
        )

    def redact(self, text: str) -> str:
        return redact(text)

    def hide(self, *secrets: str | None) -> None:
        """Credentials fetched at run time (AWS role keys, Entra and Google access
        tokens): taken out of upstream text like the configured ones. The last two
        fetches' are kept (the one before is valid a while after a refresh), so that
        refreshed tokens do not pile up."""
        self._fetched = ({s for s in secrets if s}, *self._fetched[:1])
        _credentials[self] = _longest_first(self._configured.union(*self._fetched))

    def hide_bearer(self, line: bytes) -> None:
        """`hide` the token of an `authorization: Bearer <token>` header line."""
        self.hide(line.decode("latin-1").partition("Bearer ")[2].strip())


def _out_of_files(exc: BaseException) -> bool:
    """Did the failure come from this process (or host) running out of descriptors?"""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.EMFILE, errno.ENFILE):
            return True
        cause = cause.__cause__
    return False


def _credentials_of(config: ProviderConfig, headers: dict[str, str]) -> set[str]:
    """The secrets among a provider's request headers (the whole value and, after an
    auth scheme (`Bearer x`), the token alone) and in its settings (Bedrock's keys, an
    Entra client secret)."""
    found = {config.api_key.get_secret_value()} if config.api_key else set()
    for name, value in headers.items():
        if name.lower() in _CREDENTIAL_HEADERS or name in config.headers:
            found.add(value)
            found.add(value.partition(" ")[2])
    bedrock, azure = config.bedrock, config.azure
    for secret in (
        bedrock and bedrock.secret_access_key,
        bedrock and bedrock.session_token,
        azure and azure.client_secret,
    ):
        if secret:
            found.add(secret.get_secret_value())
    if bedrock and bedrock.access_key_id:  # not a secret, but whose keys they are
        found.add(bedrock.access_key_id)
    return found


def _longest_first(secrets: set[str]) -> tuple[str, ...]:
    """Longest first (a secret that holds another is taken out whole), short ones left
    out (they would take ordinary words out of messages)."""
    return tuple(sorted((s for s in secrets if len(s) >= 8), key=len, reverse=True))


def redact(text: str) -> str:
    """`text` without any live provider's credentials or anything shaped like a key."""
    for credentials in list(_credentials.values()):
        for secret in credentials:
            if secret in text:
                text = text.replace(secret, "***")
    return _KEYLIKE.sub("***", text)


def error_message(body: bytes) -> str:
    """The human message of an OpenAI, Anthropic or Gemini error body (all use error.message),
    credentials taken out."""
    return redact(_error_text(body))


def error_param(body: bytes) -> str | None:
    """The field an OpenAI-format error body blames (`error.param`), so that the caller's
    SDK shows which one was refused; None when it names none (or not as a short string)."""
    if body.lstrip()[:1] != b"{":
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if type(data) is dict else None
    param = error.get("param") if type(error) is dict else None
    if type(param) is not str or not param or len(param) > _PARAM_LONGEST:
        return None
    return redact(param)


_PARAM_LONGEST = 200  # a field path (`messages[12].content[3].image_url`), never a text


def how_it_began(body: bytes) -> str:
    """The start of an upstream body that is not the JSON asked for, for an error
    message: an HTML page says at once that `base_url` is wrong or a proxy answered.
    Whitespace collapsed, credentials taken out."""
    began = _one_line(body, _QUOTED)
    if not began:
        return "an empty body"
    return repr(redact(began) + ("..." if len(body) > _QUOTED else ""))


_QUOTED = 120  # bytes of an unusable body quoted


def _error_text(body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _page_title(body) or _one_line(body, 300)
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if data.get("message"):
            return str(data["message"])
    return body[:300].decode("utf-8", "replace").strip()


def _one_line(body: bytes, limit: int) -> str:
    """The start of a body, its whitespace (newlines too) collapsed into single spaces."""
    return " ".join(body[:limit].decode("utf-8", "replace").split())


_TITLE = re.compile(rb"<title(?:\s[^>]*)?>([^<]*)</title", re.IGNORECASE)
_PAGE_HEAD = 16 * 1024  # where a page's title is looked for


def _page_title(body: bytes) -> str | None:
    """What an HTML error page says, by its title: a proxy's, a load balancer's or a
    CDN's page (Cloudflare's "api.example.com | 502: Bad gateway") begins with markup
    and scripts for a few kilobytes, so its first bytes say nothing."""
    if body.lstrip()[:1] != b"<":
        return None
    found = _TITLE.search(body, 0, _PAGE_HEAD)
    if found is None:
        return None
    title = " ".join(html.unescape(found.group(1).decode("utf-8", "replace")).split())
    return f"an HTML page titled {title[:200]!r}" if title else None


MAX_RETRY_AFTER = 86_400.0  # a day: longer is no wait anyone means, and is not relayed


def parse_retry_after(value: bytes | None) -> float | None:
    """Seconds to wait, from delay-seconds or an HTTP-date (RFC 9110 10.2.3).

    Not a finite number or a date (`inf`, `1e400`, garbage): no advice. Capped at a day,
    so what is relayed to the caller stays a number a client can sleep on."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP-date is GMT; a zone-less one is read as such
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


class HttpAdapter(Adapter):
    """An adapter that reaches its provider over HTTP through one pooled transport."""

    transport: HttpTransport

    async def start(self) -> None:
        self.transport.name = self.name
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()
