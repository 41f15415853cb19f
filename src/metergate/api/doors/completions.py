"""POST /v1/completions: OpenAI's legacy text completions, for tools that still use them.

Upstreams that serve the legacy API (`providers.*.apis`, by default OpenAI's own) get the
request as it came. Every other upstream gets it as a chat request: the prompt becomes
one user message, and the answer's message its `text`. What chat cannot express (several
prompts in one request, token-id prompts, `suffix`, `echo`, `logprobs`, `best_of` > 1) is
refused with a 400 by those upstreams. `max_tokens` defaults to 16, as in OpenAI's API.
"""

from __future__ import annotations

from typing import Any

import orjson

from metergate.api.doors import Door, Exchange, Relay, check_integer, check_number, check_stop
from metergate.asgi import Request
from metergate.auth.keys import KeyRecord
from metergate.errors import GatewayError, InvalidRequest
from metergate.providers.base import Completion, NativeRequest, StreamState
from metergate.providers.sse import DONE, SSEDecoder, chunk_event, event_object
from metergate.routing.router import Deployment
from metergate.runtime import Plan

DEFAULT_MAX_TOKENS = 16  # the legacy API's own default
_PASSED = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "logit_bias",
    "stream",
    "stream_options",
)


# The integers the legacy API takes, with their least value (as the chat door checks).
_INTEGERS = (("max_tokens", 1), ("n", 1), ("best_of", 1), ("logprobs", 0), ("seed", None))
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


class CompletionsDoor(Door):
    api = "completions"
    max_tokens_field = "max_tokens"

    async def enter(
        self, request: Request, body: dict[str, Any], key: KeyRecord, plan: Plan
    ) -> Exchange:
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest("`stream` must be true or false", param="stream")
        for name, least in _INTEGERS:
            check_integer(body, name, least)
        for name in _NUMBERS:
            check_number(body, name)
        check_stop(body, "stop")
        chat, lost = to_chat(body)
        return Exchange(chat, bool(stream), NativeRequest("completions", body, {}, lost))

    async def answer(
        self, exchange: Exchange, deployment: Deployment, completion: Completion, key: KeyRecord
    ) -> bytes:
        if exchange.passthrough(deployment):
            return completion.body
        chat = orjson.loads(completion.body)
        choices = [_choice(c, (c.get("message") or {}).get("content")) for c in chat["choices"]]
        return orjson.dumps({**_head(chat), "choices": choices, "usage": chat.get("usage")})

    def relay(self, exchange: Exchange, deployment: Deployment, state: StreamState) -> Relay | None:
        return None if exchange.passthrough(deployment) else _TextStream()


def to_chat(body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    lost: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        if prompt is None or prompt == []:
            raise InvalidRequest("`prompt` is required", param="prompt")
        lost.append("a prompt that is not one string (several prompts, or token ids)")
        prompt = ""
    for name, unset in (("suffix", None), ("echo", False), ("logprobs", None), ("best_of", 1)):
        if body.get(name) not in (unset, None):
            lost.append(f"`{name}`")
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": [{"role": "user", "content": prompt}],
        "max_completion_tokens": body.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    chat.update((name, body[name]) for name in _PASSED if body.get(name) is not None)
    reason = "; ".join(lost)
    return chat, f"{reason}, which only the legacy completions API has" if lost else None


def _head(chunk: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "cmpl-" + str(chunk.get("id") or "").removeprefix("chatcmpl-"),
        "object": "text_completion",
        "created": chunk.get("created"),
        "model": chunk.get("model"),
    }


def _choice(choice: dict[str, Any], text: str | None) -> dict[str, Any]:
    reason = choice.get("finish_reason")
    return {
        "text": text or "",
        "index": choice.get("index", 0),
        "logprobs": None,
        "finish_reason": "stop" if reason == "tool_calls" else reason,
    }


class _TextStream:
    """Chat chunks -> text_completion chunks (the usage chunk and [DONE] as they were)."""

    def __init__(self) -> None:
        self.decoder = SSEDecoder()

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for sse in self.decoder.feed(chunk):
            if sse.data == b"[DONE]":
                out += DONE
                continue
            data = event_object(sse.data)  # not JSON: the upstream's fault, said so
            choices = [
                _choice(c, (c.get("delta") or {}).get("content"))
                for c in data.get("choices") or []
                if isinstance(c, dict)
                and ((c.get("delta") or {}).get("content") or c.get("finish_reason"))
            ]
            if choices or data.get("usage"):
                out += chunk_event({**_head(data), "choices": choices, "usage": data.get("usage")})
        return bytes(out)

    async def end(self) -> bytes:
        return b""

    async def failed(self, error: GatewayError) -> bytes:
        return b"data: " + error.body() + b"\n\n"
