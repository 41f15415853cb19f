"""Token estimates for when exact usage is not (yet) known.

Used to reserve budget before a call, and to bill a stream that did not complete (cut
by the upstream, stalled, or abandoned by the caller) or an answer whose upstream
reported no usage. Such a stream is billed at least what the caller received: its
output is the larger of what the upstream reported and a bound on the relayed text,
one token per UTF-8 byte. No provider's tokenizer makes a token of less than one byte
(byte-level BPE and SentencePiece with byte fallback alike), so the bound never
under-counts, whatever the model; for English it is about four times the real count.
A real tokenizer would be closer for one model family only, and tiktoken fetches its
encodings over the network on first use, which a gateway cannot count on. The bound
stops at what the request's `max_tokens` (for each of its `n` choices) lets an upstream
bill, so an estimate never passes the worst case its budget hold reserved. The prompt
of such a stream is the upstream's count when it sent one (Anthropic does at the
start), else four characters per token of the messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from metergate.metering.pricing import UnitPrices
from metergate.providers.base import Usage

CHARS_PER_TOKEN = 4


def prompt_tokens(body: dict[str, Any]) -> int:
    size = len(orjson.dumps(body.get("messages") or body.get("input") or ""))
    return (size + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


class RelayedText:
    """The text a stream relayed to its caller, measured in UTF-8 bytes (see above).

    The relay only keeps the chunks, and reads them in batches of `batch_bytes`: a
    stream that ends (with the upstream's usage) before its first batch is full is
    never read at all, and a stream holds at most one batch (plus the event it ends
    in, and an event of at most 2 KiB to learn its shape from) however long it runs:
    4 KiB x 1,000 open streams is 4 MiB. Reading an event
    costs 1 to 2 µs (`orjson` and a walk of the deltas), except for an event of the
    stream's shape once learnt (`_shape_of`): a token's event differs from the one
    before only in its text, and is measured by the text's length.
    """

    __slots__ = (
        "_last",
        "_pending",
        "_pending_size",
        "_shape",
        "_tries",
        "batch_bytes",
        "text_bytes",
    )

    def __init__(self, batch_bytes: int = 4 * 1024) -> None:
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.batch_bytes = batch_bytes
        self.text_bytes = 0
        # (the data line up to the text's opening quote, the rest from its closing
        # quote, the text elsewhere in such an event): see `_shape_of`
        self._shape: tuple[bytes, bytes, int] | None = None
        self._last = b""  # the last event read in full: a shape is learnt from two
        self._tries = 0  # shapes looked for in this stream (bounded: `_SHAPE_TRIES`)

    def add(self, chunk: bytes) -> None:
        """A chunk of OpenAI SSE events as sent to the caller."""
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= self.batch_bytes:
            self._read()

    def tokens(self) -> int:
        """At least as many output tokens as the caller has received."""
        self._read(final=True)
        return self.text_bytes

    def _read(self, final: bool = False) -> None:
        data = b"".join(self._pending)
        if not final:  # keep an event split between chunks for the next batch
            data, _, rest = data.rpartition(b"\n\n")
            self._pending, self._pending_size = ([rest], len(rest)) if rest else ([], 0)
        else:
            self._pending, self._pending_size = [], 0
        size = 0
        head, tail, fixed = self._shape or (b"", b"", -1)
        least = len(head) + len(tail)
        for line in data.split(b"\n"):
            if fixed >= 0 and line.startswith(head) and line.endswith(tail) and len(line) >= least:
                text = line[len(head) : len(line) - len(tail)]
                if _NOT_PLAIN.search(text) is None:  # the shape's event, with another text
                    size += fixed + len(text)
                    continue
            if line[:5] != b"data:" or line[-6:] == b"[DONE]":
                continue
            event = line[6:] if line[5:6] == b" " else line[5:]
            size += _delta_text_bytes(event)
            if self._tries < _SHAPE_TRIES and self._last:
                self._tries += 1
                found = _shape_of(self._last, event)
                if found is not None:
                    lead = line[: len(line) - len(event)]
                    self._shape = (lead + found[0], found[1], found[2])
                    head, tail, fixed = self._shape
                    least = len(head) + len(tail)
            # kept while shapes are looked for, and if small (a token's event is)
            self._last = event if len(event) <= _SHAPE_EVENT and self._tries < _SHAPE_TRIES else b""
        self.text_bytes += size


# Shapes looked for per stream: a stream whose events never share one (Responses events
# number themselves) costs at most this many extra reads.
_SHAPE_TRIES = 8
_SHAPE_EVENT = 2048  # the largest event a shape is learnt from
# A byte that may not stand in a JSON string's raw text for its length to be the text's
# UTF-8 size: anything but printable ASCII, and the quote and backslash.
_NOT_PLAIN = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_PROBE = b"abc"


def _agreeing(agree: Callable[[int], bool], limit: int) -> int:
    """The largest n <= limit for which `agree(n)` (true up to some n, false after),
    found by bisection: slices compared in C, not a byte at a time in Python."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if agree(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _shape_of(one: bytes, other: bytes) -> tuple[bytes, bytes, int] | None:
    """The shape two events share when they differ only inside one JSON string that is
    counted text (a delta's `content`, `arguments`, `text`, ...): the event up to and
    with the string's opening quote, the rest from its closing quote, and the text
    bytes elsewhere in the event. An event made of the two with plain ASCII between
    (no quote, backslash or control character) is then an event of the same structure
    with another text: it counts that fixed part plus the text's length. The shape is
    checked by reading it with two texts, so that this count is exactly what reading
    such an event in full gives."""
    limit = min(len(one), len(other))
    same = _agreeing(lambda n: one[:n] == other[:n], limit)
    tail = _agreeing(lambda n: one[len(one) - n :] == other[len(other) - n :], limit - same)
    # The string the difference is in: its opening quote in the common start, its
    # closing quote in the common end (so that both events have the prefix and suffix).
    opening = one.rfind(b'"', 0, same)
    closing = one.find(b'"', len(one) - tail) if tail else -1
    if opening < 0 or closing < 0:
        return None
    prefix, suffix = one[: opening + 1], one[closing:]
    try:  # with plain text between, the shape must be an object whose text counts
        probe = orjson.loads(prefix + _PROBE + suffix)
    except orjson.JSONDecodeError:
        return None
    fixed = _delta_text_bytes(prefix + suffix)
    if probe.__class__ is not dict or _delta_text_bytes(prefix + _PROBE + suffix) != fixed + 3:
        return None
    return prefix, suffix, fixed


def _delta_text_bytes(data: bytes) -> int:
    """UTF-8 bytes of the text in one chunk's deltas: content, refusal, reasoning, and
    tool calls' names and arguments. A stream relayed in its own protocol (an Anthropic
    or Responses upstream serving its own door) counts its deltas the same way."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return len(data)  # not JSON, yet relayed: count all of it
    if chunk.__class__ is not dict:
        return 0
    choices = chunk.get("choices")
    if choices is None:
        return _native_delta_bytes(chunk.get("delta"))
    size = 0
    for choice in choices if choices.__class__ is list else ():
        if choice.__class__ is not dict:
            continue
        delta, text = choice.get("delta"), choice.get("text")
        if delta.__class__ is dict:
            size += _fields_bytes(delta)
        elif text.__class__ is str:  # a legacy completions chunk, passed through
            size += _utf8_size(text)
    return size


def _fields_bytes(fields: dict[str, Any]) -> int:
    """UTF-8 bytes of the text of a chunk's delta or an answer's message."""
    size = 0
    for name, value in fields.items():  # a delta holds one or two fields
        if value.__class__ is str and name in _DELTA_TEXTS:
            size += _utf8_size(value)
        elif name == "tool_calls" and value.__class__ is list:
            size += _tool_call_bytes(value)
    return size


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _tool_call_bytes(calls: list[Any]) -> int:
    size = 0
    for call in calls:
        function = call.get("function") if call.__class__ is dict else None
        if function.__class__ is dict:
            for name in ("name", "arguments"):
                text = function.get(name)
                if text.__class__ is str:
                    size += _utf8_size(text)
    return size


_DELTA_TEXTS = frozenset(("content", "refusal", "reasoning_content", "reasoning"))
# Anthropic's content_block_delta: text_delta, input_json_delta, thinking_delta.
_NATIVE_DELTA_TEXTS = ("text", "partial_json", "thinking")


def _native_delta_bytes(delta: Any) -> int:
    """Responses events carry their delta as a string (`response.output_text.delta`,
    `...function_call_arguments.delta`); Anthropic's as an object."""
    if isinstance(delta, str):
        return _utf8_size(delta)
    if not isinstance(delta, dict):
        return 0
    texts = (delta.get(name) for name in _NATIVE_DELTA_TEXTS)
    return sum(_utf8_size(text) for text in texts if isinstance(text, str))


def stream_usage(
    body: dict[str, Any],
    reported: Usage | None,
    relayed: RelayedText,
    complete: bool,
    tier: str | None = None,
    limit: int = 0,
) -> tuple[Usage, bool]:
    """What a stream is billed, and whether that is an estimate: the upstream's usage
    when the stream completed with it, else at least what was relayed (up to what
    `max_tokens` lets the upstream bill, or the `limit` the adapter sent in its place),
    on the processing `tier` its first event named when no usage did.

    What an unfinished stream did report is kept whole: Anthropic states its prompt's
    cache writes (priced above plain input) in its first event, and searches run or
    reasoning spent are billed whether or not the stream ends well. A stated cost stands
    only while the output it covers is at least what was relayed."""
    if complete and reported is not None:
        return reported, False
    output = _billable(relayed.tokens(), body, limit)
    if reported is None:
        found = Usage(input_tokens=prompt_tokens(body), output_tokens=output)
        found.service_tier = tier
        return found, True
    found = replace(reported, output_tokens=max(reported.output_tokens, output))
    if reported.input_tokens + reported.cached_input_tokens == 0:  # no prompt count yet
        found.input_tokens = prompt_tokens(body)
    if found.output_tokens > reported.output_tokens:
        found.billed_nano = None  # it did not cover what was relayed: priced by tokens
    found.service_tier = reported.service_tier or tier  # priced on the tier served on
    return found, True


def answer_usage(body: dict[str, Any], answer: bytes) -> Usage:
    """What a whole answer whose upstream reported no usage is billed: its prompt as a
    stream's, its output one token per UTF-8 byte of the answer's text (as relayed text
    is counted), up to what `max_tokens` lets the upstream bill. `answer` is in the
    protocol it came in: chat, legacy completions, Responses or Anthropic Messages (the
    last three passed through as they are); `body` is the request's chat form."""
    try:
        data = orjson.loads(answer)
    except orjson.JSONDecodeError:
        data = None
    size = _answer_text_bytes(data) if data.__class__ is dict else 0
    return Usage(input_tokens=prompt_tokens(body), output_tokens=_billable(size, body))


def _answer_text_bytes(answer: dict[str, Any]) -> int:
    """UTF-8 bytes of the text a whole answer holds, whichever its protocol."""
    size = 0
    choices = answer.get("choices")
    for choice in choices if choices.__class__ is list else ():
        if choice.__class__ is not dict:
            continue
        message, text = choice.get("message"), choice.get("text")
        if message.__class__ is dict:  # chat
            size += _fields_bytes(message)
        elif text.__class__ is str:  # legacy completions
            size += _utf8_size(text)
    items = answer.get("output")  # Responses: messages, function calls, reasoning
    for item in items if items.__class__ is list else ():
        size += _strings_bytes(item, _OUTPUT_TEXTS)
    blocks = answer.get("content")  # Anthropic Messages: text, tool_use, thinking
    for block in blocks if blocks.__class__ is list else ():
        if block.__class__ is not dict:
            continue
        for name in ("text", "thinking", "name"):  # "name": a tool_use block's
            text = block.get(name)
            size += _utf8_size(text) if text.__class__ is str else 0
        if block.get("input") is not None:  # a tool call's arguments, as JSON
            size += len(orjson.dumps(block["input"]))
    return size


# The fields of a Responses output item (or of the parts and summaries nested in it)
# that hold generated text.
_OUTPUT_TEXTS = ("text", "refusal", "arguments", "name")


def _strings_bytes(value: Any, names: tuple[str, ...]) -> int:
    """UTF-8 bytes of the strings under `names` in `value`, at any depth of lists and
    objects (a Responses message's content parts, a reasoning item's summary)."""
    if value.__class__ is list:
        return sum(_strings_bytes(item, names) for item in value)
    if value.__class__ is not dict:
        return 0
    size = 0
    for name, field_value in value.items():
        if field_value.__class__ is str:
            size += _utf8_size(field_value) if name in names else 0
        elif field_value.__class__ in (list, dict):
            size += _strings_bytes(field_value, names)
    return size


def _max_tokens(body: dict[str, Any]) -> int:
    """The request's limit on each choice's output tokens; 0 when it sets none. With
    both fields set, the larger: upstreams differ in which they read."""
    return max(int(body.get("max_completion_tokens") or 0), int(body.get("max_tokens") or 0))


def _billable(tokens: int, body: dict[str, Any], sent: int = 0) -> int:
    """`tokens` of output, but no more than an upstream may bill for the request: its
    max_tokens (else the limit `sent` in its place) for each of its `n` choices."""
    limit = _max_tokens(body) or sent
    return min(tokens, limit * int(body.get("n") or 1)) if limit else tokens


# Room kept, in request bytes, for the `"max_tokens": N` a refused caller is told to add.
_FIELD_BYTES = 32


@dataclass(frozen=True, slots=True)
class Extras:
    """What a request may cost beyond its tokens at their plain prices: the prompt-cache
    writes it asks for (`"5m"` or `"1h"`: the dearer write price then bounds each prompt
    byte) and the most web searches its server tools may run (priced per search)."""

    cache_writes: str | None = None
    web_searches: int = 0


NO_EXTRAS = Extras()


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~2x per field
class WorstCase:
    """An upper bound on a request's cost, reserved against budgets before the call, and
    what it is made of, so that a refusal can say which `max_tokens` would fit."""

    nano: int
    byte_pico: int  # a request byte's part (one token per byte, at the dearest input price)
    prompt_pico: int  # the prompt's part: every byte of the request body
    token_pico: int  # what one more max_tokens adds: `n` choices at the output price
    max_tokens: int  # 0 when the request has none (no budget applies then)
    assumed: bool = False  # max_tokens is the model's budget_max_tokens, not the caller's
    web_searches: int = 0  # the most its server tools may run
    searches_pico: int = 0  # what they may cost
    limit_field: str = "max_tokens"  # the output limit's name in the caller's protocol

    @property
    def fixed_pico(self) -> int:
        """What the request may cost whatever its max_tokens: prompt and searches."""
        return self.prompt_pico + self.searches_pico

    def fitting_max_tokens(self, available_nano: int) -> int:
        """The largest max_tokens whose worst case fits in `available_nano`; 0 when none
        does. A request without the field grows by it (`_FIELD_BYTES`); one that has it
        does not (a smaller value than the refused one has no more digits)."""
        added = _FIELD_BYTES * self.byte_pico if self.assumed else 0
        room = available_nano * 1000 - self.fixed_pico - added
        if room < self.token_pico:
            return 0
        return self.max_tokens if self.token_pico == 0 else room // self.token_pico


# Content an upstream bills by what it shows, not by its bytes here: an image or a
# document given by URL or file id is a few dozen bytes of request but a thousand
# tokens or more. Chat's parts, Anthropic's blocks and the Responses API's parts.
_ATTACHMENTS = frozenset(("image_url", "file", "image", "document", "input_image", "input_file"))


def prompt_bound(body_size: int, bodies: tuple[Any, ...], attachment_tokens: int) -> int:
    """An upper bound on the prompt's tokens: a token per byte of what the upstream is
    sent (`body_size`), plus `attachment_tokens` for each image or document, whose
    bytes here (a URL, a file id) say nothing of what it is billed. `bodies`: the
    request in each form an upstream may get it (chat, and the caller's own protocol),
    each searched whole: attachments sit in tool results and tool outputs too."""
    return body_size + max(map(_attachments, bodies)) * attachment_tokens


# What a provider adds to the prompt of a request with tools that its bytes do not show:
# a system prompt on tool use (Anthropic's is 313 to 530 tokens by model and tool_choice),
# and the definition of each built-in tool, which a request names alone (Anthropic's text
# editor is 700 tokens, its computer use 735; OpenAI's Responses tools likewise).
TOOL_USE_TOKENS = 600
BUILT_IN_TOOL_TOKENS = 1_000
_DECLARED_TOOLS = frozenset({"function", "custom"})  # defined in the request's own bytes


def tool_tokens(bodies: tuple[Any, ...]) -> int:
    """Prompt tokens a request's tools may add beyond its bytes, in the form an upstream
    may get it that adds the most (`bodies`, as for `prompt_bound`); 0 without tools."""
    most = 0
    for body in bodies:
        tools = body.get("tools")
        if type(tools) is list and tools:
            built_in = sum(
                1
                for tool in tools
                if type(tool) is dict
                and tool.get("type", "custom") not in _DECLARED_TOOLS
                and "input_schema" not in tool
            )
            most = max(most, TOOL_USE_TOKENS + built_in * BUILT_IN_TOOL_TOKENS)
    return most


def may_attach(raw: bytes) -> bool:
    """Whether a request body, as it came, may hold an attachment: any whose `type` is
    one of them spells "image", "file" or "document" in its bytes, or escapes a letter
    (`\\u0069mage`). A few scans in C spare the common text-only request the walk of
    `prompt_bound` (`find`, not `in`: bytes' `in` first tries its operand as an integer
    and formats a TypeError it then drops)."""
    return (
        raw.find(b"image") >= 0
        or raw.find(b"file") >= 0
        or raw.find(b"document") >= 0
        or raw.find(b"\\u") >= 0
    )


def _attachments(body: Any) -> int:
    count, stack = 0, [body]
    while stack:
        value = stack.pop()
        if value.__class__ is dict:
            if value.get("type") in _ATTACHMENTS:
                count += 1
            stack.extend(value.values())
        elif value.__class__ is list:
            stack.extend(value)
    return count


def worst_case(
    prompt_tokens: int,
    body: dict[str, Any],
    prices: UnitPrices,
    assumed: bool = False,
    extras: Extras = NO_EXTRAS,
    limit_field: str = "max_tokens",
) -> WorstCase:
    """`prompt_tokens` bounds the prompt (see `prompt_bound`: a token is at least one
    byte of the request), each at the dearest price it may be billed at, a cache write's
    when the request asks for them; the output is bounded by max_tokens for each of the
    `n` choices, and server-side web searches by the most the request's tools may run."""
    output = _max_tokens(body)
    byte = max(prices.input, prices.cached_input)
    searches = 0
    if extras is not NO_EXTRAS:
        if extras.cache_writes is not None:
            byte = max(byte, prices.cache_write)
            if extras.cache_writes == "1h":
                byte = max(byte, prices.cache_write_1h)
        searches = extras.web_searches * prices.web_search
    prompt = prompt_tokens * byte
    token = int(body.get("n") or 1) * prices.output
    nano = (prompt + searches + output * token + 999) // 1000
    return WorstCase(
        nano, byte, prompt, token, output, assumed, extras.web_searches, searches, limit_field
    )
