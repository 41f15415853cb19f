"""How an upstream SSE stream is cut into what the gateway sends: one item per network
read, but the first event with something to send goes out alone, so that a read holding
the whole stream (a fast upstream, a buffering proxy) does not hold the first token."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from contextlib import aclosing
from types import SimpleNamespace
from typing import Any

import orjson

from metergate.providers.base import StreamState
from metergate.providers.openai import _PassThrough, stream_failure
from metergate.providers.sse import Event, SSEDecoder
from metergate.providers.translation import relay


class Reads:
    """An upstream stream as its network reads."""

    def __init__(self, *reads: bytes) -> None:
        self.reads = reads
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read

    def close(self) -> None:
        self.closed = True

    def no_event_yet(self) -> None:
        """(The client's `first_byte` check: these reads all come at once.)"""


async def opened(response: Reads) -> Reads:
    return response


def event(n: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"tok%d "}}]}\n\n' % n


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
DONE = b"data: [DONE]\n\n"


async def items(*reads: bytes, include_usage: bool = True) -> tuple[list[bytes], StreamState]:
    state = StreamState()
    response = Reads(*reads)
    translator = _PassThrough(include_usage, state)
    transport: Any = SimpleNamespace(name="up")  # only used to name the upstream
    async with aclosing(relay(transport, opened(response), translator)) as chunks:  # type: ignore[arg-type]
        found = [chunk async for chunk in chunks]
    assert response.closed
    return found, state


async def test_a_read_holding_the_whole_stream_sends_its_first_event_alone() -> None:
    whole = event(0) + event(1) + event(2) + USAGE + DONE
    found, state = await items(whole)
    assert found == [event(0), event(1) + event(2) + USAGE + DONE]
    assert state.usage is not None and state.usage.output_tokens == 2


async def test_after_the_first_event_each_read_is_one_item() -> None:
    found, _ = await items(event(0) + event(1), event(2) + event(3), USAGE + DONE)
    assert found == [event(0), event(1), event(2) + event(3), USAGE + DONE]


async def test_the_first_item_is_the_first_event_with_something_to_send() -> None:
    # a keep-alive comment and a usage chunk the caller did not ask for send nothing
    found, _ = await items(
        b": keep-alive\n\n", USAGE + event(0) + event(1) + DONE, include_usage=False
    )
    assert found == [event(0), event(1) + DONE]


async def test_an_event_split_across_reads_is_sent_once_whole() -> None:
    first = event(0)
    found, _ = await items(first[:10], first[10:] + event(1), DONE)
    assert found == [first, event(1), DONE]


async def test_a_whole_answer_is_relayed_as_the_stream_it_would_have_been() -> None:
    """A server that ignored `stream: true`: each choice's message becomes its delta, tool
    calls numbered as a stream numbers them; the usage is read, and sent if asked for."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    body = orjson.dumps(answer)
    for include_usage in (True, False):
        found, state = await items(body[:20], body[20:], include_usage=include_usage)
        (sent,) = found
        chunks = [orjson.loads(line[6:]) for line in sent.split(b"\n\n")[:-2]]
        assert sent.endswith(DONE)
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert chunks[0]["choices"] == [
            {
                "index": 0,
                "delta": {"role": "assistant", "tool_calls": [{"index": 0, **call}]},
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ]
        assert [c["usage"]["completion_tokens"] for c in chunks[1:]] == [2] * include_usage
        assert state.usage is not None and state.usage.output_tokens == 2


async def test_a_whole_legacy_completion_is_its_own_chunk() -> None:
    choice = {"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None}
    answer = {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}
    found, _ = await items(orjson.dumps(answer))
    assert found == [b"data: " + orjson.dumps(answer) + b"\n\n" + DONE]


async def test_events_sent_without_data_are_relayed_as_events() -> None:
    bare = [e.removeprefix(b"data: ") for e in (event(0), event(1), USAGE, DONE)]
    found, state = await items(
        bare[0] + bare[1][:7], bare[1][7:].replace(b"\n", b"\r\n"), *bare[2:]
    )
    assert found == [event(0) + event(1) + USAGE + DONE]
    assert state.usage is not None and state.usage.output_tokens == 2


def test_sse_events_decode_by_their_fields() -> None:
    decoder = SSEDecoder()
    stream = (
        b"data: one\n\n"  # the usual: one data line
        b"data:two\n\n"  # no space after the colon
        b"event: ping\ndata: {}\n\n"
        b": a comment\n\n"  # nothing to relay
        b"data: a\r\ndata: b\r\n\r\n"  # several data lines, CRLF line ends
    )
    assert decoder.feed(stream[:7]) == []  # an event ends with a blank line
    assert decoder.feed(stream[7:]) == [
        Event("", b"one", b"data: one\n\n"),
        Event("", b"two", b"data:two\n\n"),
        Event("ping", b"{}", b"event: ping\ndata: {}\n\n"),
        Event("", b"a\nb", b"data: a\ndata: b\n\n"),
    ]


def test_a_crlf_split_between_two_reads_is_one_line_end() -> None:
    r"""`event: x\r` in one read and `\ndata: ...` in the next is one event with its
    name and data, not a name-only event followed by a nameless one."""
    stream = b"event: message_start\r\ndata: {}\r\n\r\nevent: ping\r\ndata: 1\r\n\r\n"
    for cut in range(len(stream) + 1):  # every place a read can end
        decoder = SSEDecoder()
        found = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert found == [
            Event("message_start", b"{}", b"event: message_start\ndata: {}\n\n"),
            Event("ping", b"1", b"event: ping\ndata: 1\n\n"),
        ], cut


def test_events_cut_anywhere_across_three_reads_decode_the_same() -> None:
    """Reads in which no event ends are held apart; a blank line may straddle them."""
    stream = b"data: one\n\nevent: ping\ndata: {}\n\ndata: a\r\ndata: b\r\n\r\ndata: end\n\n"
    whole = SSEDecoder().feed(stream)
    assert len(whole) == 4
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            decoder = SSEDecoder()
            found = [
                *decoder.feed(stream[:first]),
                *decoder.feed(stream[first:second]),
                *decoder.feed(stream[second:]),
                *decoder.flush(),
            ]
            assert found == whole, (first, second)


def test_an_event_that_has_not_ended_is_not_copied_again_with_each_read() -> None:
    """An upstream that never ends its event (a stream that is not SSE, one huge event)
    may send up to the answer's 64 MiB bound in 64 KiB reads: copying what is held on
    every read would be quadratic, seconds of a blocked event loop. A read that ends no
    event adds itself and copies nothing."""
    decoder = SSEDecoder()
    read = b"x" * 65536
    decoder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"')
    for _ in range(256):  # 16 MiB held
        assert decoder.feed(read) == []
    tracemalloc.start()
    try:
        for _ in range(16):
            assert decoder.feed(read) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak / 2**20:.1f} MiB allocated for 16 reads of 64 KiB"
    (event,) = decoder.feed(b'"}}]}\n\n')
    assert len(event.data) == 272 * 65536 + len(b'{"choices":[{"index":0,"delta":{"content":""}}]}')


def test_an_error_event_that_broke_off_still_fails_the_stream() -> None:
    """An OpenAI error event cut before its JSON ends is still the upstream's failure,
    its text quoted; other events that are not JSON are judged as any event."""
    failed = stream_failure(b'{"error": {"message": "overloaded, try ag')
    assert failed is not None and failed.outcome == "upstream_error"
    assert "overloaded" in failed.message
    assert stream_failure(b'{"choices": [{"delta": {"content": "an \\"error\\" here"}}') is None
