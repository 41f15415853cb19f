"""Google Gemini (generateContent, batchEmbedContents) behind the OpenAI format.

Requests are translated in `gemini_translate`; this module holds the adapter, the stream
translation and embeddings. Behaviour callers may notice:

* `n` maps to `candidateCount`: one choice per candidate, streamed or not.
* `response_format` json_object sets `responseMimeType: application/json`; json_schema
  also passes the schema as `responseJsonSchema` (best effort: Gemini supports a subset
  of JSON Schema and ignores or rejects the rest).
* Tool call ids are made up by the gateway (`call_<hex>`): Gemini's calls have none.
* Embeddings: Gemini reports no token counts, so input tokens are estimated.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from metergate.config.model import ProviderConfig
from metergate.errors import (
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
)
from metergate.providers.base import (
    Completion,
    StreamState,
    UpstreamCall,
    Usage,
)
from metergate.providers.gemini_translate import (
    candidates_of,
    finish_reason,
    from_response,
    parts_of,
    to_generate_request,
    usage_of,
)
from metergate.providers.http import HttpAdapter, HttpTransport, error_message
from metergate.providers.restream import gemini_events
from metergate.providers.sse import Event
from metergate.providers.translation import (
    ChunkWriter,
    invalid_request,
    load_json,
    new_call_id,
    relay,
    request_translator,
)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"


class GeminiAdapter(HttpAdapter):
    supports_embeddings = True

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        headers = {}
        if config.api_key is not None:
            headers["x-goog-api-key"] = config.api_key.get_secret_value()
        base = config.base_url or DEFAULT_BASE_URL
        self.transport = _GeminiTransport(config, headers, base)
        self.base = f"{base}/v1beta/models"

    def _url(self, model: str, method: str) -> str:
        return f"{self.base}/{quote(model.removeprefix('models/'), safe='')}:{method}"

    async def chat(self, call: UpstreamCall) -> Completion:
        answer = await self.transport.post(
            self._url(call.model, "generateContent"),
            to_generate_request(call.body),
            call.timeouts,
            call.extra_headers,
        )
        return from_response(load_json(answer, "generateContent answer"), call.model)

    def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        url = self._url(call.model, "streamGenerateContent") + "?alt=sse"
        opening = self.transport.open_stream(
            url, to_generate_request(call.body), call.timeouts, call.extra_headers
        )
        return relay(self.transport, opening, _StreamTranslator(call, state))

    async def embeddings(self, call: UpstreamCall) -> Completion:
        model = call.model.removeprefix("models/")
        texts, payload = _embed_request(call.body, model)
        answer = load_json(
            await self.transport.post(
                self._url(model, "batchEmbedContents"), payload, call.timeouts, call.extra_headers
            ),
            "batchEmbedContents answer",
        )
        as_base64 = call.body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": _packed(values) if as_base64 else values,
            }
            for index, values in enumerate(
                (item.get("values") or []) for item in answer.get("embeddings") or []
            )
        ]
        # Gemini's embedding answers carry no token counts; ~4 characters per token is the
        # usual estimate for English text and keeps metering and budgets roughly right.
        tokens = sum(math.ceil(len(text) / 4) for text in texts)
        body = {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Completion(orjson.dumps(body), Usage(input_tokens=tokens))


class _StreamTranslator:
    """Gemini stream events (each a whole GenerateContentResponse) -> OpenAI chunks."""

    def __init__(self, call: UpstreamCall, state: StreamState) -> None:
        self.call = call
        self.state = state
        self.writer: ChunkWriter | None = None
        self.started: set[int] = set()  # choices that already sent their role chunk
        self.tool_counts: dict[int, int] = {}  # choice -> tool calls streamed so far
        self.finished: dict[int, str] = {}  # choice -> OpenAI finish reason

    def feed(self, event: Event) -> bytes:
        if not event.data:
            return b""
        data = load_json(event.data, "stream event")
        if "error" in data:
            raise _stream_failure(data, event.data)
        if self.writer is None:
            response_id = "chatcmpl-" + (data.get("responseId") or new_call_id()[5:])
            self.writer = ChunkWriter(response_id, data.get("modelVersion") or self.call.model)
        if data.get("usageMetadata"):
            self.state.usage = usage_of(data["usageMetadata"])
        out = bytearray()
        for index, candidate in candidates_of(data):
            out += self._candidate(self.writer, index, candidate)
        return bytes(out)

    def _candidate(self, writer: ChunkWriter, index: int, candidate: dict[str, Any]) -> bytes:
        out = bytearray()
        delta: dict[str, Any] = {}
        if index not in self.started:
            self.started.add(index)
            delta["role"] = "assistant"
        text, calls = parts_of(candidate)
        if text:
            delta["content"] = text
        if calls:
            first = self.tool_counts.get(index, 0)
            delta["tool_calls"] = [{"index": first + i, **c} for i, c in enumerate(calls)]
            self.tool_counts[index] = first + len(calls)
        if delta:
            out += writer.delta(delta, index=index)
        if candidate.get("finishReason"):
            reason = finish_reason(candidate["finishReason"], index in self.tool_counts)
            self.finished[index] = reason
            out += writer.delta({}, reason, index=index)
        return bytes(out)

    def restream(self, answer: dict[str, Any]) -> list[Event]:
        return gemini_events(answer)

    def finish(self) -> bytes:
        """Gemini has no end-of-stream event: a finish reason is the only sign of a full answer."""
        if self.writer is None or not self.finished:
            raise UpstreamProtocolError("the upstream stream ended before any finishReason")
        # No usageMetadata at all leaves the usage unknown: the relayed text is billed.
        self.state.finish_reason = self.finished.get(0) or next(iter(self.finished.values()))
        return self.writer.end(self.state.usage, self.call.include_usage)


class _GeminiTransport(HttpTransport):
    """Reads the two Gemini error details that the generic classification cannot see."""

    def failure_from_response(
        self, status: int, headers: dict[bytes, bytes], body: bytes
    ) -> UpstreamFailure:
        details = _error_details(body)
        if status == 400 and any(d.get("reason") == "API_KEY_INVALID" for d in details):
            # Gemini answers a bad API key with 400 INVALID_ARGUMENT; the gateway's config is
            # at fault, not the caller's request, so this must not look like the caller's 400.
            message = self.redact(error_message(body))
            return UpstreamRejected(
                f"upstream refused the gateway's API key: {message}; "
                "check this provider's api_key in the gateway config",
                status=502,
                error_type="upstream_error",  # not the caller's request: the gateway's key
                upstream_status=status,
            )
        failure = super().failure_from_response(status, headers, body)
        if failure.retry_after is None:
            failure.retry_after = _retry_delay(details)
        return failure


def _stream_failure(data: dict[str, Any], raw: bytes) -> UpstreamFailure:
    """An error object in a stream, classed by its code as the same error answered with
    that HTTP status would be: 429 (RESOURCE_EXHAUSTED) a rate limit with its retry
    delay, 503 kept, anything else a 502."""
    error = data.get("error")
    code = error.get("code") if type(error) is dict else None
    message = f"upstream stream error: {error_message(raw)}"
    if code == 429:
        delay = _retry_delay(_error_details(raw))
        return UpstreamRateLimited(message, upstream_status=429, retry_after=delay)
    status = code if type(code) is int else None
    return UpstreamServerError(message, status=503 if code == 503 else 502, upstream_status=status)


def _error_details(body: bytes) -> list[dict[str, Any]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    error = data.get("error") if isinstance(data, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Gemini puts the wait in a google.rpc.RetryInfo detail ("7s"), not in Retry-After."""
    for detail in details:
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                return None
    return None


@request_translator
def _embed_request(body: dict[str, Any], model: str) -> tuple[list[str], dict[str, Any]]:
    """The texts to embed and the batchEmbedContents payload for an OpenAI request."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid_request(
            "Gemini embeddings take `input` as a string or a list of strings (not token ids)",
            "input",
        )
    extra = {"outputDimensionality": int(body["dimensions"])} if body.get("dimensions") else {}
    requests = [
        {"model": f"models/{model}", "content": {"parts": [{"text": text}]}, **extra}
        for text in texts
    ]
    return texts, {"requests": requests}


def _packed(values: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32, what the openai SDK asks for."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
