"""The built-in `simulated` provider: an in-process model for demos, load tests and drills.

It is deterministic: the same request gives the same answer and usage, and failures
follow a seeded sequence, so a drill with `error_rate: 0.2` fails the same requests every
run. Latency, speed, answer length and the kind of failure are set in the config.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from metergate.config.model import ProviderConfig
from metergate.errors import (
    ConnectFailed,
    UpstreamFailure,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from metergate.providers.base import Adapter, Completion, StreamState, UpstreamCall, Usage
from metergate.providers.sse import DONE, chunk_event
from metergate.providers.translation import (
    a_list,
    an_object,
    function_of,
    request_translator,
    response_format_of,
    stop_sequences,
)

_WORDS = (
    "the",
    "gateway",
    "meters",
    "every",
    "call",
    "and",
    "routes",
    "it",
    "to",
    "a",
    "healthy",
    "upstream",
    "while",
    "budgets",
    "keep",
    "spend",
    "in",
    "check",
    "and",
    "rollouts",
    "shift",
    "traffic",
    "in",
    "careful",
    "stages",
    "with",
    "alerts",
    "ready",
)
_FAILURES: dict[str, tuple[type[UpstreamFailure], int, str]] = {
    "server_error": (UpstreamServerError, 500, "simulated upstream error 500"),
    "rate_limited": (UpstreamRateLimited, 429, "simulated upstream rate limit"),
    "bad_request": (UpstreamRejected, 400, "simulated upstream rejection"),
    "timeout": (UpstreamTimeout, 504, "simulated upstream timeout"),
    "connection_error": (ConnectFailed, 502, "simulated connection refused"),
}


class SimulatedAdapter(Adapter):
    supports_embeddings = True

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        self.settings = config.simulated
        self._dice = random.Random(self.settings.seed)

    async def chat(self, call: UpstreamCall) -> Completion:
        _refuse_embeddings_model(call.model)
        await self._maybe_fail()
        answer = _Answer(call, self.settings.output_tokens)
        if self.settings.tokens_per_second:
            await asyncio.sleep(answer.output_tokens / self.settings.tokens_per_second)
        choices = [
            {
                "index": i,
                "message": answer.message(),
                "finish_reason": answer.finish_reason,
                "logprobs": None,
            }
            for i in range(answer.n)
        ]
        body = {
            "id": answer.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": choices,
            "usage": answer.usage.to_openai(),
            "system_fingerprint": "simulated",
        }
        return Completion(orjson.dumps(body), answer.usage)

    async def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        _refuse_embeddings_model(call.model)
        await self._maybe_fail()
        answer = _Answer(call, self.settings.output_tokens)
        base = {
            "id": answer.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.model,
            "system_fingerprint": "simulated",
        }
        delay = 1 / self.settings.tokens_per_second if self.settings.tokens_per_second else 0
        batch = bytearray()
        for index in range(answer.n):
            for delta in answer.deltas():
                batch += chunk_event(
                    {
                        **base,
                        "choices": [
                            {
                                "index": index,
                                "delta": delta,
                                "finish_reason": None,
                                "logprobs": None,
                            }
                        ],
                    }
                )
                if delay:
                    yield bytes(batch)
                    batch.clear()
                    await asyncio.sleep(delay)
            batch += chunk_event(
                {
                    **base,
                    "choices": [
                        {
                            "index": index,
                            "delta": {},
                            "finish_reason": answer.finish_reason,
                            "logprobs": None,
                        }
                    ],
                }
            )
        state.usage = answer.usage
        state.finish_reason = answer.finish_reason
        if call.include_usage:
            batch += chunk_event({**base, "choices": [], "usage": answer.usage.to_openai()})
        batch += DONE
        yield bytes(batch)

    async def embeddings(self, call: UpstreamCall) -> Completion:
        await self._maybe_fail()
        inputs = call.body.get("input")
        items = (
            inputs
            if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
            else [inputs]
        )
        dimensions = int(call.body.get("dimensions") or 8)
        as_base64 = call.body.get("encoding_format") == "base64"
        data, tokens = [], 0
        for index, item in enumerate(items):
            text = item if isinstance(item, str) else orjson.dumps(item).decode()
            tokens += _count_tokens(text)
            vector = _vector(text, dimensions)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        usage = Usage(input_tokens=tokens)
        body = {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Completion(orjson.dumps(body), usage)

    async def _maybe_fail(self) -> None:
        settings = self.settings
        failing = settings.error_rate > 0 and self._dice.random() < settings.error_rate
        if settings.latency_ms:
            await asyncio.sleep(settings.latency_ms / 1000)
        if not failing:
            return
        kind, status, message = _FAILURES[settings.error_kind]
        if settings.error_kind == "timeout":
            await asyncio.sleep(self.config.timeouts.first_byte)
        raise kind(
            message,
            status=400 if kind is UpstreamRejected else None,
            upstream_status=status,
            retry_after=1.0 if settings.error_kind == "rate_limited" else None,
        )


def _refuse_embeddings_model(model: str) -> None:
    """A model named with `embed` (`sim-embed`) is an embeddings model, and, as a real
    provider's is, it refuses a chat request (or a Responses or Messages one, which reach
    it as chat): a demo that asks the wrong model learns so instead of getting text."""
    if "embed" in model.lower():
        raise UpstreamRejected(
            f"upstream model {model} is an embeddings model: it answers /v1/embeddings, not chat, "
            "completions, Responses or Messages requests; use a chat model",
            status=400,
            upstream_status=400,
        )


MAX_CHOICES = 128  # OpenAI's bound on `n`


class _Answer:
    """The deterministic answer to one request (a malformed one is a 400 naming the field,
    read with the same checks as the translating adapters)."""

    @request_translator
    def __init__(self, call: UpstreamCall, default_tokens: int) -> None:
        body = call.body
        prompt = orjson.dumps(body.get("messages") or [], option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(prompt + call.model.encode()).digest()
        self.id = "chatcmpl-sim-" + digest[:12].hex()
        self.n = max(1, int(body.get("n") or 1))
        if self.n > MAX_CHOICES:  # as OpenAI: n choices of up to `tokens` each is real work
            raise UpstreamRejected(
                f"n: at most {MAX_CHOICES} choices per request (got {self.n})",
                status=400,
                upstream_status=400,
            )
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        wanted = default_tokens
        self.finish_reason = "stop"
        if limit is not None and int(limit) < wanted:
            wanted, self.finish_reason = max(1, int(limit)), "length"
        self.words = [_WORDS[(digest[i % 32] + i) % len(_WORDS)] for i in range(wanted)]
        self.tool_call = _pick_tool(body)
        kind, spec = response_format_of(body)
        self.json_mode = kind in ("json_object", "json_schema")
        # a json_schema answer is an instance of the schema, as strict structured outputs
        # guarantee (the SDKs' `parse` helpers validate it); json_object is free-form
        self.schema = an_object(spec.get("schema") or {}, "response_format.json_schema.schema")
        self._cut_at_stop(stop_sequences(body.get("stop")))
        if self.tool_call:
            self.finish_reason = "tool_calls"
        prompt_tokens = max(1, _count_tokens(prompt.decode()))
        cached = (prompt_tokens // 2) // 128 * 128 if prompt_tokens >= 1024 else 0
        self.output_tokens = len(self.words) * self.n
        self.usage = Usage(prompt_tokens - cached, cached, self.output_tokens)

    def _cut_at_stop(self, stops: list[str]) -> None:
        for index, word in enumerate(self.words):
            if any(stop and stop in word for stop in stops):
                self.words = self.words[:index]
                self.finish_reason = "stop"
                return

    def text(self) -> str:
        text = " ".join(self.words)
        if not self.json_mode:
            return text
        if self.schema:
            return orjson.dumps(_example_of(self.schema, text)).decode()
        return orjson.dumps({"answer": text}).decode()

    def message(self) -> dict[str, Any]:
        if self.tool_call:
            return {
                "role": "assistant",
                "content": None,
                "tool_calls": [self.tool_call],
                "refusal": None,
            }
        return {"role": "assistant", "content": self.text(), "refusal": None}

    def deltas(self) -> list[dict[str, Any]]:
        if self.tool_call:
            call = self.tool_call
            return [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ],
                },
                {
                    "tool_calls": [
                        {"index": 0, "function": {"arguments": call["function"]["arguments"]}}
                    ]
                },
            ]
        text = self.text()
        if self.json_mode:
            return [{"role": "assistant", "content": text}]
        pieces = [word if i == 0 else " " + word for i, word in enumerate(text.split(" "))]
        return [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces if p]


def _pick_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = [an_object(t, f"tools[{i}]") for i, t in enumerate(a_list(body.get("tools"), "tools"))]
    functions = [function_of(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    messages = body.get("messages") or []
    last = messages[-1] if messages else None
    if choice == "auto" and isinstance(last, dict) and last.get("role") == "tool":
        return None  # the tool already answered: reply in text
    index = 0
    if isinstance(choice, dict):
        wanted = function_of(choice, "tool_choice").get("name")
        index = next((i for i, f in enumerate(functions) if f.get("name") == wanted), 0)
    function, where = functions[index], f"tools[{index}].function.parameters"
    schema = an_object(function.get("parameters") or {}, where)
    properties = an_object(schema.get("properties") or {}, f"{where}.properties")
    required = a_list(schema.get("required"), f"{where}.required")
    arguments = {
        name: _example_of(spec, "example", schema)
        for name, spec in properties.items()
        if name in required and isinstance(spec, dict)
    }
    name = function.get("name") or "tool"
    return {
        "id": "call_sim_" + hashlib.sha256(name.encode()).hexdigest()[:16],
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
    }


_SCALARS: dict[str, Any] = {"integer": 1, "number": 1.0, "boolean": True, "null": None}
_DEPTH = 16  # a schema that refers to itself (a tree) is cut here


def _example_of(spec: Any, text: str, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A value valid against the JSON schema `spec` (strings are `text`): every property
    of an object, one item of an array, the first of `enum`/`anyOf`/`oneOf` (not the
    null one: Optional fields get a value), `$ref`s into `root`'s `$defs` (what pydantic
    writes for a nested model). Keywords beyond those (lengths, patterns) are not met."""
    root = root if root is not None else spec
    if not isinstance(spec, dict) or depth > _DEPTH:
        return text
    reference = spec.get("$ref")
    if isinstance(reference, str) and reference.startswith("#"):
        target: Any = root
        for part in reference.lstrip("#").strip("/").split("/"):
            target = target.get(part) if isinstance(target, dict) and part else target
        return _example_of(target, text, root, depth + 1)
    if "const" in spec:
        return spec["const"]
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        return spec["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = spec.get(key)
        if isinstance(options, list) and options:
            typed = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _example_of((typed or options)[0], text, root, depth + 1)
    kind = spec.get("type", "object" if "properties" in spec else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = spec.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {name: _example_of(sub, text, root, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        items = spec.get("items")
        return [_example_of(items, text, root, depth + 1)] if isinstance(items, dict) else []
    return _SCALARS.get(kind, text) if isinstance(kind, str) else text


def _count_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _vector(text: str, dimensions: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % 32] - 127.5) / 127.5, 6) for i in range(dimensions)]
