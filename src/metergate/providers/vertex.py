"""Google Vertex AI behind the OpenAI format: Gemini and Anthropic models, and embeddings.

URLs are `{endpoint}/v1/projects/{project}/locations/{location}/publishers/{publisher}/
models/{model}:{method}`, the endpoint being `https://{location}-aiplatform.googleapis.com`
(`https://aiplatform.googleapis.com` for location `global`). Behaviour worth knowing:

* The publisher is told by the model id: `claude-*` models are Anthropic's, the rest
  Google's; `publisher/model` (e.g. `anthropic/claude-sonnet-4-5@20250929`) says it
  explicitly.
* Gemini models speak generateContent / streamGenerateContent (SSE) with the same
  translation as the Gemini adapter; Anthropic models speak rawPredict /
  streamRawPredict, which take the Messages API body with `anthropic_version`
  `vertex-2023-10-16` instead of `model`, translated as for the Anthropic adapter.
* Auth: a Google access token (`providers.gcp_auth`), cached and refreshed off the
  request path.
* Embeddings (Google's text embedding models, `:predict`) carry real token counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from metergate.config.model import ProviderConfig, VertexSettings
from metergate.errors import UpstreamProtocolError
from metergate.providers import anthropic, gemini
from metergate.providers.anthropic_translate import from_message, to_messages_request
from metergate.providers.base import Completion, StreamState, UpstreamCall, Usage
from metergate.providers.gcp_auth import GoogleToken
from metergate.providers.gemini_translate import from_response, to_generate_request
from metergate.providers.h1 import StreamResponse
from metergate.providers.http import HttpAdapter
from metergate.providers.translation import (
    EventTranslator,
    invalid_request,
    load_answer,
    load_json,
    relay,
)

ANTHROPIC_VERSION = "vertex-2023-10-16"


class VertexAdapter(HttpAdapter):
    supports_embeddings = True

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        settings = config.vertex or VertexSettings()
        location = settings.location or "us-central1"
        host = (
            "https://aiplatform.googleapis.com"
            if location == "global"
            else f"https://{location}-aiplatform.googleapis.com"
        )
        base = config.base_url or host
        project = quote(settings.project or "", safe="")
        self.prefix = f"{base}/v1/projects/{project}/locations/{quote(location, safe='')}"
        # Google's error details (RetryInfo) are read as for the Gemini API.
        self.transport = gemini._GeminiTransport(config, {}, base)
        self.token = GoogleToken(name, settings)
        self.token.cache.fetched = self.transport.hide_bearer

    async def close(self) -> None:
        await super().close()
        self.token.close()

    def model_path(self, model: str) -> tuple[str, bool]:
        """(URL of the model, without `:method`; whether the model is Anthropic's)."""
        publisher, slash, name = model.partition("/")
        if not slash:
            publisher, name = ("anthropic" if model.startswith("claude") else "google"), model
        path = f"{self.prefix}/publishers/{publisher}/models/{quote(name, safe='@')}"
        return path, publisher == "anthropic"

    async def chat(self, call: UpstreamCall) -> Completion:
        path, claude = self.model_path(call.model)
        auth = await self.token.header() + call.extra_headers
        if claude:
            answer = await self.transport.post(
                f"{path}:rawPredict", _claude_request(call), call.timeouts, auth
            )
            return from_message(load_answer(answer, "rawPredict answer", "content"), call.model)
        answer = await self.transport.post(
            f"{path}:generateContent", to_generate_request(call.body), call.timeouts, auth
        )
        return from_response(load_json(answer, "generateContent answer"), call.model)

    def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        path, claude = self.model_path(call.model)
        translator: EventTranslator
        if claude:
            url, payload = f"{path}:streamRawPredict", {**_claude_request(call), "stream": True}
            translator = anthropic._StreamTranslator(call, state)
        else:
            url, payload = f"{path}:streamGenerateContent?alt=sse", to_generate_request(call.body)
            translator = gemini._StreamTranslator(call, state)
        return relay(self.transport, self._open_stream(url, payload, call), translator)

    async def _open_stream(
        self, url: str, payload: dict[str, Any], call: UpstreamCall
    ) -> StreamResponse:
        """Open a stream once the credentials are at hand (a token may need fetching)."""
        auth = await self.token.header() + call.extra_headers
        return await self.transport.open_stream(url, payload, call.timeouts, auth)

    async def embeddings(self, call: UpstreamCall) -> Completion:
        path, claude = self.model_path(call.model)
        if claude:
            raise invalid_request(f"{call.model!r} is not an embedding model")
        texts, payload = _predict_request(call.body)
        auth = await self.token.header() + call.extra_headers
        answer = load_json(
            await self.transport.post(f"{path}:predict", payload, call.timeouts, auth),
            "predict answer",
        )
        predictions = [p.get("embeddings") or {} for p in answer.get("predictions") or []]
        if len(predictions) != len(texts):
            raise UpstreamProtocolError("the upstream answered a different number of inputs")
        tokens = sum(int((p.get("statistics") or {}).get("token_count") or 0) for p in predictions)
        as_base64 = call.body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": gemini._packed(values) if as_base64 else values,
            }
            for index, values in enumerate(p.get("values") or [] for p in predictions)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        body = {"object": "list", "data": data, "model": call.model, "usage": usage}
        return Completion(orjson.dumps(body), Usage(input_tokens=tokens))


def _claude_request(call: UpstreamCall) -> dict[str, Any]:
    """The Messages API body as rawPredict wants it: the model is in the URL."""
    payload = to_messages_request(call.body, call.model)
    del payload["model"]
    payload["anthropic_version"] = ANTHROPIC_VERSION
    return payload


def _predict_request(body: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    texts, batch = gemini._embed_request(body, "")
    parameters: dict[str, Any] = {"autoTruncate": False}
    dimensions = batch["requests"][0].get("outputDimensionality")
    if dimensions:
        parameters["outputDimensionality"] = dimensions
    return texts, {"instances": [{"content": t} for t in texts], "parameters": parameters}
