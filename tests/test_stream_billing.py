"""A stream that does not complete, or an answer without usage, is billed at least
what the caller received (and no more than its max_tokens allows).

The fake upstreams cut or stall a stream after N content chunks; the caller reads what
arrives with the openai SDK. Every word is at least one token for any real tokenizer,
so the words received are a floor the billed output must reach; the ledger row says the
figure is an estimate, and its cost is that figure at the configured prices.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import openai
import orjson
import pytest

from metergate.metering import estimate
from metergate.metering.estimate import RelayedText
from tests.harness import (
    BackgroundLoop,
    Gateway,
    UpstreamServer,
    cancel_requests,
    simulated_config,
)
from tests.upstreams import ANSWER, RECORDER, anthropic_server, openai_server, responses_api

PRICE = {"input": 1, "output": 10}  # USD per million tokens
PICO = {"input": 1_000_000, "output": 10_000_000}  # the same, per token


@pytest.fixture
def upstreams(bg: BackgroundLoop) -> Iterator[dict[str, UpstreamServer]]:
    app, _ = openai_server.create_app()
    servers = {
        "gpt": UpstreamServer(bg, app),
        "claude": UpstreamServer(bg, anthropic_server.create_app()),
    }
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture
def gateway(
    gateway_factory: Callable[..., Gateway], upstreams: dict[str, UpstreamServer]
) -> Gateway:
    """Models `gpt` and `claude`, and `gpt-stall` and `claude-stall` on the same fake
    upstreams, whose streams end after a second of silence (the others wait 60 s). The
    OpenAI upstream serves the Responses and legacy completions APIs too, and the
    Anthropic one the Messages API: those doors pass through to them as they are."""
    config: dict[str, Any] = {"providers": {}, "upstreams": {}, "models": {}}
    for name, kind, url, key in (
        ("gpt", "openai", f"{upstreams['gpt'].url}/v1", openai_server.API_KEY),
        ("claude", "anthropic", upstreams["claude"].url, anthropic_server.API_KEY),
    ):
        for model, timeouts in ((name, {}), (f"{name}-stall", {"stream_idle": 1.0})):
            config["providers"][model] = {
                "type": kind,
                "base_url": url,
                "api_key": key,
                "timeouts": timeouts,
            }
            if kind == "openai":  # the Responses and completions doors pass through
                config["providers"][model]["apis"] = ["responses", "completions"]
            config["upstreams"][f"{model}-up"] = {
                "provider": model,
                "model": f"{name}-test",
                "price": PRICE,
            }
            config["models"][model] = {"upstreams": [f"{model}-up"], "retry": {"max_retries": 0}}
    return gateway_factory(config)


def relay(
    gateway: Gateway, model: str, trigger: str, request_id: str, **options: Any
) -> tuple[str, int, bool]:
    """Stream with the openai SDK: (text received, content chunks, ended by an error)."""
    text, chunks = "", 0
    stream = gateway.client(timeout=30).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Tell me. TRIGGER:{trigger}"}],
        stream=True,
        extra_headers={"x-request-id": request_id},
        **options,
    )
    try:
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    text += choice.delta.content
                    chunks += 1
    except openai.APIError:
        return text, chunks, True
    return text, chunks, False


def ledger_row(gateway: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        rows = gateway.ledger_rows(f"request_id = '{request_id}'")
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(rows) == 1, rows
    return rows[0]


def cost_nano(row: dict[str, Any]) -> int:
    pico = row["input_tokens"] * PICO["input"] + row["output_tokens"] * PICO["output"]
    return (pico + 500) // 1000


@pytest.mark.parametrize(
    ("model", "trigger", "chunks"),
    [
        ("gpt", "cut_after_4", 4),
        ("gpt-stall", "stall_after_3", 3),
        ("claude", "stream_cut_after_4", 4),
        ("claude-stall", "stream_stall_after_3", 3),
    ],
)
def test_a_cut_or_stalled_stream_is_billed_at_least_what_was_relayed(
    gateway: Gateway, model: str, trigger: str, chunks: int
) -> None:
    request_id = f"billing-{model}-{trigger}"
    text, received, failed = relay(gateway, model, trigger, request_id)
    # The caller saw N chunks, then an error event (a stall timer could, on a very
    # loaded machine, fire before the N-th: what is billed must cover what came anyway).
    assert failed and 0 < received <= chunks
    assert received == chunks or "stall" in trigger
    row = ledger_row(gateway, request_id)
    assert row["outcome"] in ("upstream_error", "timeout"), row
    assert row["output_tokens"] >= len(text.split()) >= received, (row, text)
    assert row["usage_estimated"] == 1
    assert row["input_tokens"] > 0 and row["cost_nano"] == cost_nano(row)


def test_a_cut_stream_keeps_the_cache_writes_its_first_event_reported(gateway: Gateway) -> None:
    """Anthropic reports the prompt's cache writes (256 tokens here, and 1,024 read) in
    its first event. A stream cut after it still bills those writes at the write price
    (1.25x input by default), in the chat door's translation and the Messages door's
    own events alike: the upstream charged them whether or not the answer ended."""
    system = "Be brief. TRIGGER:cached"
    ask = [{"role": "user", "content": "Tell me. TRIGGER:stream_cut_after_4"}]
    with pytest.raises(openai.APIError):
        for _ in gateway.client().chat.completions.create(
            model="claude",
            messages=[{"role": "system", "content": system}, *ask],
            stream=True,
            extra_headers={"x-request-id": "cut-cached-chat"},
        ):
            pass
    with (
        pytest.raises(anthropic.APIError),
        _anthropic(gateway).messages.stream(
            model="claude",
            max_tokens=200,
            system=system,
            messages=ask,
            extra_headers={"x-request-id": "cut-cached-messages"},
        ) as stream,
    ):
        for _ in stream:
            pass
    for request_id in ("cut-cached-chat", "cut-cached-messages"):
        row = ledger_row(gateway, request_id)
        assert (row["usage_estimated"], row["cached_input_tokens"]) == (1, 1024)
        assert row["input_tokens"] > 256
        # In nano-USD a token: input and cache reads 1,000 (the reads at the input price,
        # as configured), cache writes 1,250, output 10,000.
        expected = cost_nano(row) + 1024 * 1000 + 256 * (1250 - 1000)
        assert row["cost_nano"] == expected, row


def test_a_cut_stream_is_billed_no_more_than_the_limit_sent_for_the_caller(
    gateway: Gateway,
) -> None:
    """Anthropic requires max_tokens: a caller that set none is sent 4,096, which the
    upstream bills no more than. A stream cut after 5,279 bytes of text (counted one
    token a byte when cut) is billed at most those 4,096 tokens, as if the caller had
    set them."""
    text, _, failed = relay(gateway, "claude", "stream_cut_long", "cut-long-no-limit")
    assert failed and len(text.encode()) > 5000
    row = ledger_row(gateway, "cut-long-no-limit")
    assert (row["usage_estimated"], row["output_tokens"]) == (1, 4096)
    assert row["cost_nano"] == cost_nano(row)


def test_a_caller_that_hangs_up_on_done_had_the_whole_answer(gateway: Gateway) -> None:
    """The openai SDK closes its connection as soon as it reads `[DONE]`. An upstream
    whose body ends a moment later (its terminating chunk in a later packet) must not
    make that whole answer a cancelled one, billed by the relayed-text bound."""
    chunks = list(
        gateway.client(timeout=30).chat.completions.create(
            model="gpt",
            messages=[{"role": "user", "content": "Tell me. TRIGGER:slow_end"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": "billing-done-hangup"},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    row = ledger_row(gateway, "billing-done-hangup")
    assert (row["outcome"], row["status"], row["usage_estimated"]) == ("success", 200, 0)
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def test_a_cut_stream_is_billed_no_more_than_its_max_tokens_allows(gateway: Gateway) -> None:
    """The relayed-text bound is ~4x the real count for English; an upstream cannot
    bill more than max_tokens, nor can the estimate pass the worst case held for it."""
    text, received, failed = relay(gateway, "gpt", "cut_after_4", "billing-capped", max_tokens=5)
    assert failed and received == 4 and len(text.encode()) > 5
    row = ledger_row(gateway, "billing-capped")
    assert (row["output_tokens"], row["usage_estimated"]) == (5, 1)
    assert row["cost_nano"] == cost_nano(row)


def test_an_answer_without_usage_is_billed_at_least_what_it_answered(gateway: Gateway) -> None:
    """Some compatible servers send no `usage`: the answer is billed like a stream's
    relayed text (one token per byte, up to max_tokens), not at $0, and says so."""
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt",
        messages=[{"role": "user", "content": "Tell me. TRIGGER:nousage"}],
        extra_headers={"x-request-id": "billing-nousage"},
    )
    answer = raw.parse()
    assert answer.usage is None  # relayed as the upstream sent it
    text = answer.choices[0].message.content or ""
    row = ledger_row(gateway, "billing-nousage")
    assert (row["outcome"], row["usage_estimated"]) == ("success", 1)
    assert row["output_tokens"] == len(text.encode()) > 0 and row["input_tokens"] > 0
    assert row["cost_nano"] == cost_nano(row)
    assert raw.headers["x-metergate-cost-usd"] == f"{row['cost_nano'] / 1e9:.9f}"
    capped = gateway.client().chat.completions.create(
        model="gpt",
        messages=[{"role": "user", "content": "Again. TRIGGER:nousage"}],
        max_tokens=3,
        n=2,
        extra_headers={"x-request-id": "billing-nousage-capped"},
    )
    assert len(capped.choices) == 2
    assert ledger_row(gateway, "billing-nousage-capped")["output_tokens"] == 3 * 2


def test_a_translated_answer_without_usage_is_billed_what_it_answered(gateway: Gateway) -> None:
    """An Anthropic answer without `usage` (as an Anthropic-compatible server might send)
    is translated with `usage: null`, not zeros, and billed like any answer without it;
    a door that builds its own answer (Responses) reports the tokens it is billed."""
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="claude",
        messages=[{"role": "user", "content": "Tell me. TRIGGER:nousage"}],
        extra_headers={"x-request-id": "billing-translated-nousage"},
    )
    answer = raw.parse()
    assert answer.usage is None
    text = answer.choices[0].message.content or ""
    row = ledger_row(gateway, "billing-translated-nousage")
    assert (row["outcome"], row["usage_estimated"]) == ("success", 1)
    assert row["output_tokens"] == len(text.encode()) > 0 and row["input_tokens"] > 0
    assert raw.headers["x-metergate-cost-usd"] == f"{row['cost_nano'] / 1e9:.9f}"
    response = gateway.client().responses.create(
        model="claude",
        input="Tell me. TRIGGER:nousage",
        extra_headers={"x-request-id": "billing-translated-nousage-responses"},
    )
    row = ledger_row(gateway, "billing-translated-nousage-responses")
    assert (row["api"], row["usage_estimated"]) == ("responses", 1)
    assert response.usage is not None
    assert (
        response.usage.output_tokens == row["output_tokens"] == len(response.output_text.encode())
    )


def test_a_translated_stream_without_usage_is_billed_what_it_relayed(gateway: Gateway) -> None:
    """An Anthropic stream that reports no usage (neither in `message_start` nor in
    `message_delta`, as a compatible server may) is billed its relayed text as an
    estimate, like any stream without usage: not read as a report of zero tokens. The
    caller asked for usage and gets no usage chunk rather than zeros."""
    stream = gateway.client(timeout=30).chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "Tell me. TRIGGER:nousage"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "billing-translated-stream-nousage"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and all(chunk.usage is None for chunk in chunks)
    row = ledger_row(gateway, "billing-translated-stream-nousage")
    assert (row["outcome"], row["usage_estimated"]) == ("success", 1)
    assert row["output_tokens"] == len(text.encode()) and row["input_tokens"] > 0
    assert row["cost_nano"] == cost_nano(row) > 0


def test_a_door_stream_without_upstream_usage_reports_what_it_is_billed(
    gateway_factory: Callable[..., Gateway], upstreams: dict[str, UpstreamServer]
) -> None:
    """A chat stream without usage from the upstream, translated into the Messages and
    Responses doors (which build their own last events): those events carry the
    estimate the ledger bills, as their whole answers do, not zeros or null."""
    provider = {"type": "openai", "base_url": f"{upstreams['gpt'].url}/v1"}
    gateway = gateway_factory(
        {
            "providers": {"chat-only": {**provider, "api_key": openai_server.API_KEY}},
            "upstreams": {"gpt-up": {"provider": "chat-only", "model": "m", "price": PRICE}},
            "models": {"gpt": {"upstreams": ["gpt-up"]}},
        }
    )
    claude = anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"), api_key=gateway.key, max_retries=0
    )
    with claude.messages.stream(
        model="gpt",
        max_tokens=200,
        messages=[{"role": "user", "content": "Tell me. TRIGGER:nousage"}],
        extra_headers={"x-request-id": "billing-messages-stream-nousage"},
    ) as stream:
        message = stream.get_final_message()
    row = ledger_row(gateway, "billing-messages-stream-nousage")
    assert (row["api"], row["outcome"], row["usage_estimated"]) == ("messages", "success", 1)
    assert message.usage.output_tokens == row["output_tokens"] > 0
    with gateway.client().responses.stream(
        model="gpt",
        input="Tell me. TRIGGER:nousage",
        extra_headers={"x-request-id": "billing-responses-stream-nousage"},
    ) as events:
        response = events.get_final_response()
    row = ledger_row(gateway, "billing-responses-stream-nousage")
    assert (row["api"], row["outcome"], row["usage_estimated"]) == ("responses", "success", 1)
    assert response.usage is not None
    assert response.usage.output_tokens == row["output_tokens"] > 0
    assert response.usage.input_tokens == row["input_tokens"] > 0


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_a_complete_stream_is_billed_as_the_upstream_reported(gateway: Gateway, model: str) -> None:
    request_id = f"billing-{model}-complete"
    text, received, failed = relay(gateway, model, "none", request_id)
    assert not failed and received > 3
    row = ledger_row(gateway, request_id)
    assert row["outcome"] == "success" and row["usage_estimated"] == 0
    reported = 7 if model == "gpt" else len(text.split())  # what each fake reports
    assert row["output_tokens"] == reported and row["cost_nano"] == cost_nano(row)


def test_relayed_text_is_counted_across_batches_and_split_events() -> None:
    """The relay's counter reads kept chunks in batches; an event split between two
    chunks, multibyte text, tool call arguments and non-JSON data all count."""
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hello wörld"}}]},  # 12 bytes
        {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]},  # 3
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "function": {"name": "f", "arguments": '{"a":1}'}}
                        ]
                    },
                }
            ]
        },  # 1 + 7
        {"choices": [], "usage": {"completion_tokens": 3}},
    ]
    stream = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    stream += b"data: not json\n\ndata: [DONE]\n\n"  # 8 bytes of garbage, relayed as is
    for batch in (1, 7, 64, 1 << 20):
        relayed = RelayedText(batch_bytes=batch)
        for start in range(0, len(stream), 13):  # events split anywhere
            relayed.add(stream[start : start + 13])
        assert relayed.tokens() == 12 + 3 + 8 + 8, batch


def _chat_event(text: str, id_: str = "chatcmpl-1") -> dict[str, Any]:
    delta = {"content": text}
    return {"id": id_, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


# Events of every form a relayed stream holds, with texts that are plain and texts
# that are not (escapes, quotes, non-ASCII, control characters, empty).
TEXTS = [" word", " hello", "", "é", 'say "hi"', "tab\t", "x" * 300, "\\n", "日本語", "🙂", " z"]
STREAM_FORMS: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "chat": lambda text, n: _chat_event(text),
    "tool arguments": lambda text, n: {
        "choices": [
            {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}}
        ]
    },
    "legacy completions": lambda text, n: {"choices": [{"index": 0, "text": text}]},
    "anthropic text": lambda text, n: {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    },
    "anthropic thinking": lambda text, n: {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "thinking_delta", "thinking": text},
    },
    "responses": lambda text, n: {
        "type": "response.output_text.delta",
        "sequence_number": n,
        "delta": text,
    },
    "a text field and a fixed one": lambda text, n: {
        "choices": [{"index": 0, "delta": {"refusal": "no", "content": text}}]
    },
    "an uncounted field": lambda text, n: {"choices": [{"index": 0, "delta": {"role": text}}]},
}


@pytest.mark.parametrize("form", list(STREAM_FORMS))
def test_relayed_text_is_counted_exactly_as_each_event_reads(form: str) -> None:
    """A long stream's events are measured by their length once their shape is known
    (they differ only in their text); the count must be exactly what reading each event
    gives, whatever the texts hold, however the stream is cut into chunks and batches,
    and when events of another shape come between."""
    rng = random.Random(form)
    make = STREAM_FORMS[form]
    for trial in range(60):
        events = [make(rng.choice(TEXTS), n) for n in range(rng.randint(1, 80))]
        if trial % 3 == 0:  # another form in the middle, then this one again
            events.insert(len(events) // 2, STREAM_FORMS["chat"](" other", 0))
        lines = [b"data: " + orjson.dumps(event) for event in events]
        if trial % 5 == 0:
            lines.insert(len(lines) // 3, b"data: not json")
        stream = b"".join(line + b"\n\n" for line in lines) + b"data: [DONE]\n\n"
        expected = sum(estimate._delta_text_bytes(line[6:]) for line in lines)
        relayed = RelayedText(batch_bytes=rng.choice([1, 100, 4096]))
        step = rng.choice([7, 64, len(stream)])
        for start in range(0, len(stream), step):
            relayed.add(stream[start : start + step])
        assert relayed.tokens() == expected, (form, trial)


def test_a_long_stream_holds_a_bounded_amount_of_relayed_text() -> None:
    """The relay keeps at most one batch (4 KiB) of a stream's events however long it
    runs, so 1,000 open streams cost megabytes, not their whole answers."""
    relayed = RelayedText()
    event = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "tok "}}]})
    for _ in range(10_000):  # ~1 MiB of events
        relayed.add(event + b"\n\n")
        assert relayed._pending_size < 4 * 1024 + len(event) + 2
    assert relayed.tokens() == 4 * 10_000


def test_a_cut_stream_relayed_in_its_own_protocol_is_billed_what_was_relayed(
    gateway: Gateway,
) -> None:
    """`/v1/messages` to an Anthropic upstream is relayed as Anthropic's own events (no
    translation): a cut stream is still billed at least the text the caller received."""
    import anthropic

    client = anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"), api_key=gateway.key, max_retries=0
    )
    request_id = "billing-messages-native-cut"
    text = ""
    with (
        pytest.raises(anthropic.APIError),  # the stream ends with an error event
        client.messages.stream(
            model="claude",
            max_tokens=200,
            messages=[{"role": "user", "content": "Tell me. TRIGGER:stream_cut_after_4"}],
            extra_headers={"x-request-id": request_id},
        ) as stream,
    ):
        for piece in stream.text_stream:
            text += piece
    assert len(text.split()) >= 4
    row = ledger_row(gateway, request_id)
    assert row["api"] == "messages" and row["usage_estimated"] == 1
    assert row["output_tokens"] >= len(text.split()), (row, text)


def _anthropic(gateway: Gateway) -> Any:
    import anthropic

    return anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"), api_key=gateway.key, max_retries=0
    )


# Each helper makes one call through a door that passes through, with its official SDK,
# and returns (the answer's text, the output tokens the caller was told of, or None when
# none were, the answer's headers, or None for a stream).
Answered = tuple[str, int | None, Any]


def _responses_unary(gateway: Gateway, request_id: str, trigger: str) -> Answered:
    raw = gateway.client().responses.with_raw_response.create(
        model="gpt", input=f"Tell me. TRIGGER:{trigger}", extra_headers={"x-request-id": request_id}
    )
    answer = raw.parse()
    return answer.output_text, answer.usage and answer.usage.output_tokens, raw.headers


def _responses_stream(gateway: Gateway, request_id: str, trigger: str) -> Answered:
    text, told = "", None
    with gateway.client().responses.create(
        model="gpt",
        input=f"Tell me. TRIGGER:{trigger}",
        stream=True,
        extra_headers={"x-request-id": request_id},
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.completed" and event.response.usage:
                told = event.response.usage.output_tokens
    return text, told, None


def _completions_unary(gateway: Gateway, request_id: str, trigger: str) -> Answered:
    raw = gateway.client().completions.with_raw_response.create(
        model="gpt",
        prompt=f"Tell me. TRIGGER:{trigger}",
        max_tokens=100,
        extra_headers={"x-request-id": request_id},
    )
    answer = raw.parse()
    return answer.choices[0].text, answer.usage and answer.usage.completion_tokens, raw.headers


def _completions_stream(gateway: Gateway, request_id: str, trigger: str) -> Answered:
    text, told = "", None
    for chunk in gateway.client().completions.create(
        model="gpt",
        prompt=f"Tell me. TRIGGER:{trigger}",
        max_tokens=100,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": request_id},
    ):
        text += "".join(choice.text for choice in chunk.choices)
        told = chunk.usage.completion_tokens if chunk.usage else told
    return text, told, None


def _messages_unary(gateway: Gateway, request_id: str, trigger: str) -> Answered:
    raw = _anthropic(gateway).messages.with_raw_response.create(
        model="claude",
        max_tokens=1000,
        messages=[{"role": "user", "content": f"Tell me. TRIGGER:{trigger}"}],
        extra_headers={"x-request-id": request_id},
    )
    answer = raw.http_response.json()
    text = "".join(block["text"] for block in answer["content"])
    return text, (answer.get("usage") or {}).get("output_tokens"), raw.headers


@pytest.mark.parametrize(
    ("call", "api", "expected"),
    [
        (_responses_unary, "responses", responses_api.TEXT),
        (_responses_stream, "responses", responses_api.TEXT),
        (_completions_unary, "completions", responses_api.COMPLETION),
        (_completions_stream, "completions", responses_api.COMPLETION),
        (_messages_unary, "messages", None),
    ],
    ids=["responses", "responses-stream", "completions", "completions-stream", "messages"],
)
def test_an_answer_passed_through_without_usage_is_billed_what_it_answered(
    gateway: Gateway, call: Callable[..., Answered], api: str, expected: str | None
) -> None:
    """The Responses, completions and Messages doors relay an upstream serving their
    protocol as it answers; one that reports no usage is billed its answer's text (one
    token per byte), not $0, whatever the protocol."""
    request_id = f"billing-native-nousage-{call.__name__}"
    text, told, headers = call(gateway, request_id, "nousage")
    assert told is None  # relayed as the upstream sent it
    assert text == (expected or text) and text
    row = ledger_row(gateway, request_id)
    assert (row["api"], row["outcome"], row["usage_estimated"]) == (api, "success", 1)
    assert row["output_tokens"] == len(text.encode()) and row["input_tokens"] > 0
    assert row["cost_nano"] == cost_nano(row)
    if headers is not None:
        assert headers["x-metergate-cost-usd"] == f"{row['cost_nano'] / 1e9:.9f}"


@pytest.mark.parametrize(
    "call",
    [_responses_unary, _responses_stream, _completions_unary, _completions_stream, _messages_unary],
)
def test_an_answer_passed_through_with_usage_is_billed_as_reported(
    gateway: Gateway, call: Callable[..., Answered]
) -> None:
    request_id = f"billing-native-usage-{call.__name__}"
    _, told, _ = call(gateway, request_id, "none")
    row = ledger_row(gateway, request_id)
    assert (row["outcome"], row["usage_estimated"]) == ("success", 0)
    assert row["output_tokens"] == told and row["cost_nano"] == cost_nano(row)


def test_a_whole_answer_to_a_door_stream_is_relayed_in_its_own_events(
    gateway: Gateway, upstreams: dict[str, UpstreamServer]
) -> None:
    """A server that ignores `stream: true` sends the whole answer, which it made and
    billed: the Messages and Responses doors relay it as the events their SDKs read
    (text deltas, the final answer and its usage), metered once as reported, not failed
    and retried."""
    claude = upstreams["claude"].app[RECORDER]
    sent = len(claude.requests)
    with _anthropic(gateway).messages.stream(
        model="claude",
        max_tokens=1000,
        messages=[{"role": "user", "content": "Tell me. TRIGGER:unstreamed"}],
        extra_headers={"x-request-id": "whole-messages"},
    ) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == ANSWER and message.content[0].type == "text"
    assert message.content[0].text == text and message.stop_reason == "end_turn"
    assert len(claude.requests) == sent + 1
    told = (message.usage.input_tokens, message.usage.output_tokens)
    with gateway.client().responses.stream(
        model="gpt",
        input="Tell me. TRIGGER:unstreamed",
        extra_headers={"x-request-id": "whole-responses"},
    ) as events:
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events.get_final_response()
    assert text == final.output_text == responses_api.TEXT
    assert final.usage is not None
    for request_id, api, usage in (
        ("whole-messages", "messages", told),
        ("whole-responses", "responses", (final.usage.input_tokens, final.usage.output_tokens)),
    ):
        row = ledger_row(gateway, request_id)
        assert (row["api"], row["outcome"], row["attempts"]) == (api, "success", 1)
        assert (row["input_tokens"], row["output_tokens"], row["usage_estimated"]) == (*usage, 0)


def test_a_cut_legacy_completions_stream_is_billed_what_was_relayed(gateway: Gateway) -> None:
    """Legacy completions chunks carry `text`, not a delta: counted all the same."""
    text = ""
    with pytest.raises(openai.APIError):  # the gateway ends the stream with an error event
        for chunk in gateway.client().completions.create(
            model="gpt",
            prompt="Tell me. TRIGGER:cut",
            max_tokens=100,
            stream=True,
            extra_headers={"x-request-id": "billing-completions-cut"},
        ):
            text += "".join(choice.text for choice in chunk.choices)
    assert text == responses_api.COMPLETION
    row = ledger_row(gateway, "billing-completions-cut")
    assert (row["api"], row["usage_estimated"]) == ("completions", 1)
    assert row["output_tokens"] == len(text.encode()), row


def test_a_whole_answer_counts_its_text_in_each_protocol() -> None:
    """Tool calls' names and arguments, reasoning summaries and refusals are output the
    upstream bills; ids, types, signatures and statuses are not."""
    body = {"messages": [{"role": "user", "content": "hi"}]}
    responses = {
        "output": [
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "ab"}],
            },
            {"type": "function_call", "id": "fc_1", "call_id": "c", "name": "f", "arguments": "{}"},
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "content": [
                    {"type": "output_text", "text": "wörld", "annotations": []},
                    {"type": "refusal", "refusal": "no"},
                ],
            },
        ]
    }
    messages = {
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "x" * 40},
            {"type": "text", "text": "ok"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ]
    }
    legacy = {"choices": [{"text": "abc", "index": 0}, {"text": "de", "index": 1}]}
    for answer, size in ((responses, 2 + 1 + 2 + 6 + 2), (messages, 3 + 2 + 1 + 7), (legacy, 5)):
        usage = estimate.answer_usage(body, orjson.dumps(answer))
        assert usage.output_tokens == size, answer


def only_row(gateway: Gateway) -> dict[str, Any]:
    """The ledger's one row, once written (a cancelled request is metered as it unwinds)."""
    deadline = time.monotonic() + 10
    rows = gateway.ledger_rows()
    while not rows and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = gateway.ledger_rows()
    (row,) = rows
    return row


def test_a_stream_the_gateway_cancels_is_billed_what_it_relayed(gateway_factory: Any) -> None:
    """A stream cut by the gateway itself (a shutdown whose grace period ran out cancels
    the requests still running) ends with an error event the SDK raises, and is billed
    like one whose caller left: at least what it relayed, marked estimated, never $0."""
    gateway = gateway_factory(simulated_config(tokens_per_second=20, output_tokens=400))
    stream = gateway.client().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "go on"}], stream=True
    )
    words = 0
    for chunk in stream:
        words += len((chunk.choices[0].delta.content or "").split()) if chunk.choices else 0
        if words >= 5:
            break

    assert gateway.bg.run(cancel_requests()) == 1
    with pytest.raises(openai.APIError, match="the gateway shut down before request"):
        for _ in stream:
            pass
    row = only_row(gateway)
    assert (row["outcome"], row["status"], row["usage_estimated"]) == ("gateway_error", 503, 1)
    assert row["output_tokens"] >= 5 and row["input_tokens"] > 0
    assert row["cost_nano"] > 0


def test_a_stream_its_caller_leaves_before_the_first_chunk_is_billed_its_prompt(
    gateway_factory: Any,
) -> None:
    """The caller gave up while the upstream worked on the prompt, which it bills: the
    ledger and the budget count the prompt (four characters a token, estimated), not $0
    marked exact."""
    gateway = gateway_factory(simulated_config(latency_ms=60_000))
    prompt = "x" * 4000
    with pytest.raises(openai.APITimeoutError):
        gateway.client(timeout=0.5).chat.completions.create(
            model="sim", messages=[{"role": "user", "content": prompt}], stream=True
        )
    row = only_row(gateway)
    assert (row["outcome"], row["status"], row["usage_estimated"]) == ("cancelled", 499, 1)
    assert row["input_tokens"] >= 1000 and row["output_tokens"] == 0
    assert row["cost_nano"] > 0


def test_an_answer_the_gateway_cancels_gets_a_json_error(gateway_factory: Any) -> None:
    """A request still waiting for its upstream when a shutdown's grace period runs out
    gets a 503 in the OpenAI error shape with its request id, as every other failure
    does, not the HTTP server's plain-text 500; the ledger says what the caller got."""
    gateway = gateway_factory(simulated_config(latency_ms=60_000))
    client = gateway.client()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            client.chat.completions.with_raw_response.create,
            model="sim",
            messages=[{"role": "user", "content": "slow"}],
        )
        deadline = time.monotonic() + 10  # until it waits for its upstream
        while not gateway.metric("metergate_active_requests") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gateway.bg.run(cancel_requests()) == 1
        with pytest.raises(openai.InternalServerError) as raised:
            answer.result(timeout=30)
    error = raised.value
    assert error.status_code == 503 and error.code == "shutting_down"
    request_id = error.response.headers["x-request-id"]
    assert f"request {request_id} was answered" in error.message
    assert error.response.headers["retry-after"] == "1"
    row = only_row(gateway)
    assert (row["outcome"], row["status"]) == ("gateway_error", 503)
    # its upstream had the prompt, and bills it: so does the ledger (an estimate)
    assert row["input_tokens"] > 0 and (row["output_tokens"], row["usage_estimated"]) == (0, 1)
    assert row["cost_nano"] > 0
