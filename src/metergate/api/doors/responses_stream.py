"""Streams of the `/v1/responses` door, in the Responses API's semantic events.

`ResponseStream` turns OpenAI chat chunks into the events OpenAI sends: response.created
and .in_progress; per output item output_item.added, then for a message
content_part.added, output_text.delta... output_text.done, content_part.done, and for a
function call function_call_arguments.delta... .done; output_item.done; and finally
response.completed (or .incomplete) with usage. A stream broken after its first byte ends
with an `error` event and response.failed. `NativeResponseStream` relays an upstream's
own Responses events. Both hold the final event back until the response is stored, so
a caller that saw it can continue the conversation at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from metergate.api.doors.blocks import Block, Blocks
from metergate.api.doors.responses_translate import (
    call_item,
    finished,
    new_id,
    response_object,
    text_item,
)
from metergate.errors import GatewayError
from metergate.providers.base import StreamState
from metergate.providers.sse import SSEDecoder, event_object

Store = Callable[[dict[str, Any]], Awaitable[None]]  # keeps a finished response


class _Events:
    """Numbered Responses events (`sequence_number` counts from 0)."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def failure(self, failed: dict[str, Any], error: GatewayError) -> bytes:
        """`error`, then response.failed with the `failed` response."""
        code = error.code or error.error_type
        return self("error", code=code, message=error.message, param=error.param) + self(
            "response.failed", response=failed
        )


async def fail(response: dict[str, Any], error: GatewayError, store: Store) -> dict[str, Any]:
    """`response` as failed by `error`, stored as it is sent (OpenAI keeps a failed
    response: its id can be retrieved, and says why it failed)."""
    code = error.code or error.error_type
    failed = {**response, "status": "failed", "error": {"code": code, "message": error.message}}
    if failed.get("id"):
        await store(failed)
    return failed


class ResponseStream(Blocks):
    """OpenAI chat chunks -> Responses events; output items one at a time, in the order
    they began upstream (see `Blocks`)."""

    def __init__(
        self, body: dict[str, Any], response_id: str, state: StreamState, store: Store
    ) -> None:
        super().__init__()
        self.body = body
        self.state = state
        self.store = store
        self.events = _Events()
        self.decoder = SSEDecoder()
        self.response = response_object(body, response_id, body["model"], "in_progress", [], None)
        self.output: list[dict[str, Any]] = []  # the items opened, by block index
        self.reason: str | None = None
        self.started = False
        self.refusals: set[int] = set()  # the blocks that are a refusal, not text

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for sse in self.decoder.feed(chunk):
            if not sse.data or sse.data == b"[DONE]":
                continue
            data = event_object(sse.data)
            if not self.started:
                out += self._start(data.get("model"))
            for choice in data.get("choices") or []:
                if choice.get("index", 0) == 0:
                    out += self._delta(choice.get("delta") or {})
                    self.reason = choice.get("finish_reason") or self.reason
        return bytes(out)

    def _start(self, model: str | None) -> bytes:
        self.started = True
        if model:
            self.response["model"] = model
        return self.events("response.created", response=self.response) + self.events(
            "response.in_progress", response=self.response
        )

    def _delta(self, delta: dict[str, Any]) -> bytes:
        out = bytearray()
        if delta.get("content"):
            out += self._add_text(delta["content"])
        if delta.get("refusal"):  # its own message item, with a `refusal` part
            last = self.blocks[-1] if self.blocks else None
            if last is None or last.call is not None or last.index not in self.refusals:
                self.refusals.add(len(self.blocks))
                self.blocks.append(Block(len(self.blocks), None))
            self.blocks[-1].text += delta["refusal"]
            out += self._release()
        for call in delta.get("tool_calls") or []:
            out += self._add_call(call)
        return bytes(out)

    def _opened(self, block: Block) -> bytes:
        if block.call is not None:
            item = call_item(new_id("fc"), block.call, "in_progress")
            item["arguments"] = ""  # the deltas bring them
            self.output.append(item)
            return self.events("response.output_item.added", output_index=block.index, item=item)
        item = text_item(new_id("msg"), "", "in_progress")
        part: dict[str, Any] = {
            "type": "output_text",
            "text": "",
            "annotations": [],
            "logprobs": [],
        }
        if block.index in self.refusals:
            part = {"type": "refusal", "refusal": ""}
        item["content"] = [part]
        self.output.append(item)
        added = {**item, "content": []}
        return self.events(
            "response.output_item.added", output_index=block.index, item=added
        ) + self.events(
            "response.content_part.added",
            item_id=item["id"],
            output_index=block.index,
            content_index=0,
            part=dict(part),
        )

    def _grew(self, block: Block, piece: str) -> bytes:
        item = self.output[block.index]
        if block.call is not None:
            item["arguments"] += piece
            return self.events(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=block.index,
                delta=piece,
            )
        refusal = block.index in self.refusals
        item["content"][0]["refusal" if refusal else "text"] += piece
        return self.events(
            "response.refusal.delta" if refusal else "response.output_text.delta",
            item_id=item["id"],
            output_index=block.index,
            content_index=0,
            delta=piece,
            **({} if refusal else {"logprobs": []}),
        )

    def _closed(self, block: Block) -> bytes:
        """The item's .done events, in order."""
        item = self.output[block.index]
        item["status"] = "completed"
        index = block.index
        if block.call is not None:
            return self.events(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            ) + self.events("response.output_item.done", output_index=index, item=item)
        part = item["content"][0]
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if index in self.refusals:
            done = self.events("response.refusal.done", **ids, refusal=part["refusal"])
        else:
            done = self.events("response.output_text.done", **ids, text=part["text"], logprobs=[])
        return (
            done
            + self.events("response.content_part.done", **ids, part=part)
            + self.events("response.output_item.done", output_index=index, item=item)
        )

    async def end(self) -> bytes:
        out = bytearray() if self.started else bytearray(self._start(None))
        out += self._finish()
        status, incomplete = finished(self.reason)
        final = response_object(
            self.body,
            self.response["id"],
            self.response["model"],
            status,
            self.output,
            self.state.usage,
            incomplete_details=incomplete,
        )
        final["created_at"] = self.response["created_at"]
        await self.store(final)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return bytes(out + self.events(kind, response=final))

    async def failed(self, error: GatewayError) -> bytes:
        out = b"" if self.started else self._start(None)
        # What the caller was sent before the failure stays in the response it retrieves.
        failed = await fail({**self.response, "output": self.output}, error, self.store)
        return out + self.events.failure(failed, error)


class NativeResponseStream:
    """An upstream's own Responses events, relayed; the final one held back until the
    response is stored."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.decoder = SSEDecoder()
        self.events = _Events()
        self.response: dict[str, Any] = {}
        self.held: list[tuple[bytes, dict[str, Any]]] = []

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for sse in self.decoder.feed(chunk):
            kind = sse.name
            if kind in ("response.created", "response.completed", "response.incomplete") or (
                not kind and sse.data
            ):
                data = orjson.loads(sse.data)
                kind = data.get("type") or kind
                if kind == "response.created":
                    self.response = data.get("response") or {}
                elif kind in ("response.completed", "response.incomplete"):
                    self.held.append((sse.raw, data.get("response") or {}))
                    continue
            self.events.sequence = self.events.sequence + 1
            out += sse.raw
        return bytes(out)

    async def end(self) -> bytes:
        for _, response in self.held:
            await self.store(response)
        return b"".join(raw for raw, _ in self.held)

    async def failed(self, error: GatewayError) -> bytes:
        return self.events.failure(await fail(self.response, error, self.store), error)
