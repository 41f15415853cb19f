"""The text and tool calls of a chat stream, released as blocks one at a time.

An OpenAI-compatible upstream may interleave the argument deltas of parallel tool calls
(index 0, then 1, then 0 again: vLLM and some proxies do), but a Messages content block or
a Responses output item must be finished before the next one starts, and nothing may be
sent for it afterwards. So `Blocks` streams the first unfinished block live and buffers
what comes for the blocks after it; when that block is finished, the next one is opened
with what it buffered and goes live. A text block is finished when anything follows it;
a tool call when a later block has begun and its arguments are a whole JSON object
(past which only whitespace could validly follow); every block when the stream ends. So
calls sent one after the other, as OpenAI does, are still relayed as they come. A call
opens once its name is known: some upstreams send the id and name after the first
argument piece.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from typing import Any

import orjson


class Block:
    """A text or a tool call, numbered in the order it appeared (its index downstream)."""

    __slots__ = ("call", "closed", "index", "opened", "sent", "text")

    def __init__(self, index: int, call: dict[str, Any] | None) -> None:
        self.index = index
        self.call = call  # the chat tool call's first delta (id, name); None for text
        self.text = ""  # the text, or the call's arguments, so far
        self.sent = 0  # how much of `text` was streamed
        self.opened = False
        self.closed = False

    @property
    def name(self) -> str | None:
        return None if self.call is None else (self.call.get("function") or {}).get("name")


class Blocks(ABC):
    """Chat deltas in (`_add_text`, `_add_call`), a door's events out, block by block: its
    `_opened`, `_grew` (with what is new) and `_closed` say what each step sends."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.calls: dict[int, Block] = {}  # chat tool call index -> its block
        self.live = 0  # the first unfinished block, the one streamed as it comes

    def _add_text(self, text: str) -> bytes:
        if not self.blocks or self.blocks[-1].call is not None:
            self.blocks.append(Block(len(self.blocks), None))
        self.blocks[-1].text += text
        return self._release()

    def _add_call(self, call: dict[str, Any]) -> bytes:
        block = self.calls.get(call.get("index", 0))
        if block is None:
            block = self.calls[call.get("index", 0)] = Block(len(self.blocks), call)
            self.blocks.append(block)
        elif not block.opened:  # an id or name sent after the call's first delta
            _complete(block.call, call)
        if not block.closed:  # a closed call was a whole object: nothing more counts
            block.text += (call.get("function") or {}).get("arguments") or ""
        return self._release()

    def _finish(self) -> bytes:
        """The rest of every block, in order, at the end of the stream."""
        return self._release(ending=True)

    def _release(self, ending: bool = False) -> bytes:
        out = bytearray()
        while self.live < len(self.blocks):
            block = self.blocks[self.live]
            if not block.opened:
                if block.call is not None and not block.name and not ending:
                    break  # a call opens with its name, which may come in a later delta
                block.opened = True
                if block.call is not None and not block.call.get("id"):
                    block.call["id"] = "call_" + secrets.token_hex(12)  # one id, everywhere
                out += self._opened(block)
            if block.sent < len(block.text):
                out += self._grew(block, block.text[block.sent :])
                block.sent = len(block.text)
            if not (ending or self._done(block)):
                break
            block.closed = True
            out += self._closed(block)
            self.live += 1
        return bytes(out)

    def _done(self, block: Block) -> bool:
        if block is self.blocks[-1]:
            return False
        return block.call is None or _whole_object(block.text)

    @abstractmethod
    def _opened(self, block: Block) -> bytes: ...

    @abstractmethod
    def _grew(self, block: Block, piece: str) -> bytes: ...

    @abstractmethod
    def _closed(self, block: Block) -> bytes: ...


def _complete(first: dict[str, Any] | None, later: dict[str, Any]) -> None:
    """Take an id or a function name that a later delta of a call brings."""
    assert first is not None
    if later.get("id") and not first.get("id"):
        first["id"] = later["id"]
    name = (later.get("function") or {}).get("name")
    if name and not (first.get("function") or {}).get("name"):
        first["function"] = {**(first.get("function") or {}), "name": name}


def _whole_object(arguments: str) -> bool:
    if not arguments.rstrip().endswith("}"):  # most prefixes: spare the parse
        return False
    try:
        return isinstance(orjson.loads(arguments), dict)
    except orjson.JSONDecodeError:
        return False
