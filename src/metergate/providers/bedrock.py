"""AWS Bedrock behind the OpenAI format: Converse, ConverseStream, and InvokeModel embeddings.

Requests are translated in `bedrock_translate`; this module holds the adapter, the
stream (AWS event-stream frames, decoded by botocore) and the error mapping. Behaviour
callers and operators may notice:

* Auth: SigV4 (`providers.aws_auth`), or a Bedrock API key as `api_key` (a bearer token).
* Model ids are used as written: foundation model ids, cross-region inference profile
  ids (`us.anthropic...`, `eu.`, `apac.`, `global.`) and ARNs all go in the URL path.
  A profile id is priced as the model it routes to (`metering.pricing`).
* Throttling (`ThrottlingException`, `ServiceQuotaExceededException`, a model not ready)
  is a 429 `rate_limited`, retried with backoff or moved to another deployment like any
  upstream rate limit; `ModelTimeoutException` is a timeout; a model that failed
  (`ModelErrorException`, HTTP 424) is an upstream error, retried and fallen back from.
* Embeddings: Titan (`amazon.titan-embed-*`, one text per InvokeModel call, sent
  concurrently) and Cohere (`cohere.embed-*`, one call) with their own token counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson
from botocore.eventstream import EventStreamBuffer, ParserError

from metergate.config.model import BedrockSettings, ProviderConfig
from metergate.errors import (
    GatewayError,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from metergate.providers.aws_auth import AwsSigner
from metergate.providers.base import Completion, StreamState, UpstreamCall, Usage
from metergate.providers.bedrock_translate import (
    finish_reason,
    from_converse,
    to_converse_request,
    usage_of,
)
from metergate.providers.gemini import _packed
from metergate.providers.h1 import H1Error
from metergate.providers.http import HttpAdapter, HttpTransport, error_message
from metergate.providers.translation import (
    ChunkWriter,
    HoldsOpening,
    invalid_request,
    load_json,
    new_call_id,
    request_translator,
)

_THROTTLED = frozenset(
    {
        "ThrottlingException",
        "ServiceQuotaExceededException",
        "ModelNotReadyException",
        "TooManyRequestsException",
    }
)
# HTTP 424: the model failed while serving a valid request (not the caller's 400).
_MODEL_FAILED = frozenset({"ModelErrorException", "ModelStreamErrorException"})


class BedrockAdapter(HttpAdapter):
    supports_embeddings = True
    transport: _BedrockTransport

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        settings = config.bedrock or BedrockSettings()
        region = settings.region or "us-east-1"
        headers = {}
        if config.api_key is not None:
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self.base = config.base_url or f"https://bedrock-runtime.{region}.amazonaws.com"
        self.transport = _BedrockTransport(config, headers, self.base)
        self.signer = None if config.api_key is not None else AwsSigner(name, settings, region)
        if self.signer is not None:  # keys from the environment or a role, once fetched
            self.signer.cache.fetched = lambda keys: self.transport.hide(*keys)

    async def close(self) -> None:
        await super().close()
        if self.signer is not None:
            self.signer.cache.close()

    def url(self, model: str, operation: str) -> str:
        return f"{self.base}/model/{quote(model, safe='')}/{operation}"

    async def _send(self, url: str, payload: dict[str, Any]) -> tuple[bytes, bytes]:
        """The encoded body and the header lines that authenticate it."""
        body = orjson.dumps(payload)
        return body, (await self.signer.headers(url, body) if self.signer else b"")

    async def chat(self, call: UpstreamCall) -> Completion:
        url = self.url(call.model, "converse")
        body, auth = await self._send(url, to_converse_request(call.body))
        answer = await self.transport.post(url, body, call.timeouts, auth + call.extra_headers)
        return from_converse(load_json(answer, "Converse answer"), call.model)

    async def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        url = self.url(call.model, "converse-stream")
        body, auth = await self._send(url, to_converse_request(call.body))
        response = await self.transport.open_stream(
            url, body, call.timeouts, auth + call.extra_headers
        )
        translator = _StreamTranslator(call, state)
        frames = EventStreamBuffer()
        try:
            async for data in response:
                frames.add_data(data)
                out, failed = _translated(translator, frames)
                if out:
                    yield out
                if failed is not None:
                    raise failed
            yield translator.finish()
        except GatewayError:
            raise
        except ParserError as exc:
            raise UpstreamProtocolError(f"malformed event stream from the upstream: {exc}") from exc
        except Exception as exc:
            raise self.transport.failure_from_exception(exc) from exc
        finally:
            response.close()
            del frames  # what it held goes now (see `translation.relay`)

    async def embeddings(self, call: UpstreamCall) -> Completion:
        texts = _texts(call.body)
        model = call.model
        if "cohere.embed" in model:
            vectors, tokens = await self._cohere(call, texts)
        elif "titan-embed" in model:
            answers = await asyncio.gather(*(self._titan(call, text) for text in texts))
            vectors = [vector for vector, _ in answers]
            tokens = sum(count for _, count in answers)
        else:
            raise invalid_request(
                f"Bedrock embeddings are served for Titan and Cohere models, not {model!r}"
            )
        as_base64 = call.body.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": _packed(v) if as_base64 else v}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"object": "list", "data": data, "model": model, "usage": usage}
        return Completion(orjson.dumps(answer), Usage(input_tokens=tokens))

    async def _invoke(self, call: UpstreamCall, payload: dict[str, Any]) -> tuple[dict, int]:
        """InvokeModel: the answer and the input token count Bedrock reports in a header."""
        url = self.url(call.model, "invoke")
        body, auth = await self._send(url, payload)
        answer, headers = await self.transport.post_for_headers(url, body, call.timeouts, auth)
        count = headers.get(b"x-amzn-bedrock-input-token-count", b"")
        return load_json(answer, "InvokeModel answer"), int(count) if count.isdigit() else 0

    async def _titan(self, call: UpstreamCall, text: str) -> tuple[list[float], int]:
        payload: dict[str, Any] = {"inputText": text}
        if call.body.get("dimensions"):
            payload["dimensions"] = int(call.body["dimensions"])
        answer, counted = await self._invoke(call, payload)
        return answer.get("embedding") or [], answer.get("inputTextTokenCount") or counted

    async def _cohere(self, call: UpstreamCall, texts: list[str]) -> tuple[list[Any], int]:
        payload = {"texts": texts, "input_type": call.body.get("input_type") or "search_document"}
        answer, counted = await self._invoke(call, payload)
        vectors = answer.get("embeddings") or []
        if isinstance(vectors, dict):  # when embedding_types was given: {"float": [...]}
            vectors = vectors.get("float") or []
        return vectors, counted


def _translated(
    translator: _StreamTranslator, frames: EventStreamBuffer
) -> tuple[bytes, Exception | None]:
    """The translation of the complete frames of a read, and what stopped it (None: all
    went). What came before an exception frame, or a corrupt one, still goes out first:
    the caller gets the text the upstream generated, and it is billed."""
    parts = []
    try:
        for frame in frames:
            parts.append(translator.feed(frame.headers, frame.payload))
    except (GatewayError, ParserError) as error:
        return b"".join(parts), error
    return b"".join(parts), None


class _StreamTranslator(HoldsOpening):
    """ConverseStream events -> OpenAI chunks; keeps `state` up to date. The opening
    waits for the next event (`HoldsOpening`): a throttle right after it is retried."""

    def __init__(self, call: UpstreamCall, state: StreamState) -> None:
        self.call = call
        self.state = state
        self.writer = ChunkWriter("chatcmpl-" + new_call_id()[5:], call.model)
        self.tool_index: dict[int, int] = {}  # content block index -> OpenAI tool call index
        self.stopped = False

    def feed(self, headers: dict[str, Any], payload: bytes) -> bytes:
        kind = headers.get(":message-type")
        if kind == "exception":
            raise _stream_failure(str(headers.get(":exception-type")), payload)
        if kind == "error":
            message = headers.get(":error-message") or headers.get(":error-code")
            raise UpstreamServerError(f"upstream stream error: {message}")
        event = headers.get(":event-type")
        data = load_json(payload, "stream event") if payload else {}
        if event == "messageStart":
            return self.hold(self.writer.delta({"role": "assistant", "content": ""}))
        if self.held:
            return self.release(self._event(event, data))
        return self._event(event, data)

    def _event(self, event: Any, data: dict[str, Any]) -> bytes:
        if event == "contentBlockStart":
            use = (data.get("start") or {}).get("toolUse")
            if use:
                position = self.tool_index[data.get("contentBlockIndex", 0)] = len(self.tool_index)
                call = {
                    "index": position,
                    "id": use.get("toolUseId"),
                    "type": "function",
                    "function": {"name": use.get("name"), "arguments": ""},
                }
                return self.writer.delta({"tool_calls": [call]})
        elif event == "contentBlockDelta":
            return self._delta(data.get("contentBlockIndex", 0), data.get("delta") or {})
        elif event == "messageStop":
            self.stopped = True
            reason = self.state.finish_reason = finish_reason(data.get("stopReason"))
            return self.writer.delta({}, reason)
        elif event == "metadata" and data.get("usage"):  # none: unknown, the text is billed
            self.state.usage = usage_of(data["usage"])
        return b""

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        if delta.get("text"):
            return self.writer.delta({"content": delta["text"]})
        arguments = (delta.get("toolUse") or {}).get("input")
        if arguments and index in self.tool_index:
            call = {"index": self.tool_index[index], "function": {"arguments": arguments}}
            return self.writer.delta({"tool_calls": [call]})
        return b""  # reasoning deltas have no place in OpenAI's chat format

    def finish(self) -> bytes:
        if not self.stopped:
            raise UpstreamProtocolError("the upstream stream ended before messageStop")
        return self.writer.end(self.state.usage, self.call.include_usage)


def _stream_failure(kind: str, payload: bytes) -> UpstreamFailure:
    """An exception frame of ConverseStream (its type names are lower camel case)."""
    message = f"upstream stream error ({kind}): {error_message(payload)}"
    name = kind[:1].upper() + kind[1:]
    if name in _THROTTLED:
        return UpstreamRateLimited(message)
    if name == "ValidationException":
        return UpstreamRejected(message, status=400)
    if name == "ModelTimeoutException":
        return UpstreamTimeout(message)
    unavailable = name == "ServiceUnavailableException"
    return UpstreamServerError(message, status=503 if unavailable else 502)


class _BedrockTransport(HttpTransport):
    """Reads the error type AWS puts in `x-amzn-errortype`, not only the status."""

    def failure_from_response(
        self, status: int, headers: dict[bytes, bytes], body: bytes
    ) -> UpstreamFailure:
        kind = headers.get(b"x-amzn-errortype", b"").decode("latin-1").split(":", 1)[0]
        if not kind:
            kind = str(load_json_or_empty(body).get("__type") or "").rsplit("#", 1)[-1]
        message = self.redact(error_message(body) or f"HTTP {status}")
        if kind in _THROTTLED:
            return UpstreamRateLimited(
                f"upstream rate limit ({kind}): {message}", upstream_status=status
            )
        if kind == "ModelTimeoutException" or status == 408:
            return UpstreamTimeout(f"the model timed out ({kind}): {message}")
        if kind in _MODEL_FAILED or status == 424:  # the model failed, not the request
            return UpstreamServerError(
                f"the model failed ({kind or status}): {message}", upstream_status=status
            )
        return super().failure_from_response(status, headers, body)

    async def post_for_headers(
        self, url: str, body: bytes, timeouts: Any, headers: bytes
    ) -> tuple[bytes, dict[bytes, bytes]]:
        """Like `post`, also returning the answer's headers (InvokeModel counts tokens there)."""
        assert self.client is not None, "transport used before start()"
        try:
            response = await self.client.post(
                url.removeprefix(self.origin),
                self.head + headers,
                body,
                self.deadlines(timeouts, stream=False),
            )
        except (H1Error, OSError) as exc:
            raise self.failure_from_exception(exc) from exc
        if response.status >= 300:
            raise self.failure_from_response(response.status, response.headers, response.body)
        return response.body, response.headers


def load_json_or_empty(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


@request_translator
def _texts(body: dict[str, Any]) -> list[str]:
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid_request(
            "Bedrock embeddings take `input` as a string or a list of strings (not token ids)"
        )
    return texts
