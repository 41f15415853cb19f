"""Azure OpenAI: OpenAI's wire format at deployment URLs, with Azure's auth and filters.

* URLs: `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...`
  (`azure.api: deployments`, the default) or the v1 surface `{endpoint}/openai/v1/...`
  where the deployment name goes in `model`. An upstream's `model` is the model id its
  price is looked up by; `azure.deployments` maps it to the deployment's name.
* Auth: the `api-key` header, or a Microsoft Entra bearer token (client credentials,
  `providers.entra`) fetched off the request path and refreshed before it expires.
* Content filtering: a completion Azure filtered keeps `finish_reason: content_filter`
  (a successful, billed answer). A prompt Azure refuses (400, code `content_filter`,
  inner code `ResponsibleAIPolicyViolation`) reaches the caller as an OpenAI-shaped 400
  with code `content_filter`, its filter results kept under `innererror`; its outcome
  is `upstream_rejected` and it is final: neither retried nor sent to a fallback, so a
  safety filter is not worked around by asking another deployment.
* Streams: Azure's extra chunks that carry only `prompt_filter_results` (no choices, no
  usage) are dropped, so callers that read `chunk.choices[0]` work as with OpenAI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from metergate.config.model import AzureSettings, ProviderConfig
from metergate.errors import UpstreamFailure, UpstreamRejected, error_body
from metergate.providers.base import Completion, StreamState, UpstreamCall
from metergate.providers.entra import EntraToken
from metergate.providers.h1 import StreamResponse
from metergate.providers.http import HttpAdapter, HttpTransport
from metergate.providers.openai import _PassThrough, completion_of
from metergate.providers.sse import Event
from metergate.providers.translation import load_json, relay

FILTER_CODES = frozenset({"content_filter", "ResponsibleAIPolicyViolation"})


class AzureOpenAIAdapter(HttpAdapter):
    supports_embeddings = True

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        self.settings = config.azure or AzureSettings()
        headers = {}
        if config.api_key is not None:
            headers["api-key"] = config.api_key.get_secret_value()
        self.endpoint = config.base_url or ""
        self.transport = _AzureTransport(config, headers, self.endpoint)
        self.entra = EntraToken(name, config, self.settings) if self.settings.client_id else None
        if self.entra is not None:
            self.entra.cache.fetched = self.transport.hide_bearer
        self._targets: dict[tuple[str, str], tuple[str, str]] = {}

    async def close(self) -> None:
        await super().close()
        if self.entra is not None:
            await self.entra.close()

    def target(self, model: str, operation: str) -> tuple[str, str]:
        """(URL, deployment name) of `operation` (chat/completions, embeddings) for `model`."""
        found = self._targets.get((model, operation))
        if found is None:
            deployment = self.settings.deployments.get(model, model)
            if self.settings.api == "v1":
                url = f"{self.endpoint}/openai/v1/{operation}"
            else:
                version = quote(self.settings.api_version, safe="")
                url = (
                    f"{self.endpoint}/openai/deployments/{quote(deployment, safe='')}/"
                    f"{operation}?api-version={version}"
                )
            found = self._targets[(model, operation)] = (url, deployment)
        return found

    async def _auth(self, call: UpstreamCall) -> bytes:
        """This attempt's own header lines: an Entra token (cached), trace context."""
        token = await self.entra.header() if self.entra is not None else b""
        return token + call.extra_headers

    async def chat(self, call: UpstreamCall) -> Completion:
        url, deployment = self.target(call.model, "chat/completions")
        body = await self.transport.post(
            url, {**call.body, "model": deployment}, call.timeouts, await self._auth(call)
        )
        return completion_of(body)

    async def embeddings(self, call: UpstreamCall) -> Completion:
        url, deployment = self.target(call.model, "embeddings")
        body = await self.transport.post(
            url, {**call.body, "model": deployment}, call.timeouts, await self._auth(call)
        )
        return completion_of(body, "data")

    def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        url, deployment = self.target(call.model, "chat/completions")
        options = {**(call.body.get("stream_options") or {}), "include_usage": True}
        payload = {**call.body, "model": deployment, "stream": True, "stream_options": options}
        translator = _AzurePassThrough(call.include_usage, state)
        return relay(self.transport, self._open_stream(url, payload, call), translator)

    async def _open_stream(
        self, url: str, payload: dict[str, Any], call: UpstreamCall
    ) -> StreamResponse:
        """Open a stream once the credentials are at hand (a token may need fetching)."""
        return await self.transport.open_stream(url, payload, call.timeouts, await self._auth(call))


class _AzurePassThrough(_PassThrough):
    def feed(self, event: Event) -> bytes:
        if event.data.find(b'"prompt_filter_results"') >= 0:  # per chunk: find(), not `in`
            chunk = load_json(event.data, "stream chunk")
            if not chunk.get("choices") and not chunk.get("usage"):
                return b""
        return super().feed(event)


class ContentFiltered(UpstreamRejected):
    """Azure refused the prompt under its content policy: the caller's 400, kept final."""

    def __init__(self, message: str, inner: dict[str, Any], upstream_status: int) -> None:
        super().__init__(
            message,
            status=400,
            code="content_filter",
            param="prompt",
            upstream_status=upstream_status,
        )
        self.inner = inner

    def body(self) -> bytes:
        payload = orjson.loads(error_body(self.message, self.error_type, self.code, self.param))
        payload["error"]["innererror"] = self.inner
        return orjson.dumps(payload)


class _AzureTransport(HttpTransport):
    def failure_from_response(
        self, status: int, headers: dict[bytes, bytes], body: bytes
    ) -> UpstreamFailure:
        error = _error_of(body)
        inner = error.get("innererror")
        inner = inner if isinstance(inner, dict) else {}
        codes = {error.get("code"), inner.get("code")}
        if status == 400 and codes & FILTER_CODES:
            message = self.redact(str(error.get("message") or "filtered by the content policy"))
            return ContentFiltered(message, inner, status)
        return super().failure_from_response(status, headers, body)


def _error_of(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else {}
