"""Fault drills through the gateway with the official openai SDK (which never retries here).

Every drill sets faults on `tests/upstreams/fault_server.py` and checks what the caller
received, how many attempts were made (fault server count, `x-metergate-attempts`,
ledger), backoff timing, fallbacks, circuit state, attempt metrics and the ledger row.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import itertools
import logging
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.harness import BackgroundLoop, Gateway, UpstreamServer, free_port
from tests.upstreams.fault_server import Fault, FaultServer

FAST = {"connect": 1, "first_byte": 0.3, "total": 5, "stream_idle": 0.3}
RETRY = {"max_retries": 2, "backoff_base": 0.05, "backoff_max": 0.2}
PRICE = {"input": 1.0, "output": 2.0}
ASK = [{"role": "user", "content": "hi"}]
ATTEMPTS = "metergate_upstream_attempts_total"
FALLBACKS = "metergate_fallbacks_total"
CIRCUIT = "metergate_circuit_state"


@pytest.fixture
def fault_server(bg: BackgroundLoop) -> Iterator[Callable[[str], FaultServer]]:
    servers: list[FaultServer] = []

    def make(name: str = "p") -> FaultServer:
        server = FaultServer(bg, name)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def provider(url: str, **timeouts: float) -> dict[str, Any]:
    return {
        "type": "openai",
        "base_url": f"{url}/v1",
        "api_key": "sk-fault-drill",
        "timeouts": {**FAST, **timeouts},
    }


def config(
    primary_url: str,
    *,
    retry: dict[str, Any] | None = None,
    circuit: dict[str, Any] | None = None,
    fallback: bool = False,
    timeouts: dict[str, float] | None = None,
    retry_budget: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Model `primary` on upstream `p-up`; with `fallback`, model `backup` (simulated)."""
    cfg: dict[str, Any] = {
        "providers": {"p": provider(primary_url, **(timeouts or {}))},
        "upstreams": {
            "p-up": {
                "provider": "p",
                "model": "fault-model",
                "price": PRICE,
                "circuit": circuit or {},
            },
        },
        "models": {"primary": {"upstreams": ["p-up"], "retry": {**RETRY, **(retry or {})}}},
    }
    if fallback:
        cfg["providers"]["sim"] = {"type": "simulated", "simulated": {"output_tokens": 4}}
        cfg["upstreams"]["backup-up"] = {"provider": "sim", "model": "sim-model", "price": PRICE}
        cfg["models"]["backup"] = {"upstreams": ["backup-up"]}
        cfg["models"]["primary"]["fallbacks"] = ["backup"]
    if retry_budget:
        cfg["retry_budget"] = retry_budget
    return cfg


def create(gateway: Gateway, model: str = "primary", **options: Any):
    """A non-streamed call; returns (parsed completion, raw response)."""
    raw = gateway.client(timeout=10).chat.completions.with_raw_response.create(
        model=model, messages=ASK, **options
    )
    return raw.parse(), raw


def streamed_text(gateway: Gateway) -> str:
    """A streamed call to `primary`: the text of its chunks."""
    stream = gateway.client(timeout=10).chat.completions.create(
        model="primary", messages=ASK, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def broken_stream(gateway: Gateway) -> tuple[str, openai.APIError]:
    """A streamed call to `primary` that ends in an error event: the text before it, and
    the error."""
    stream = gateway.client(timeout=30).chat.completions.create(
        model="primary", messages=ASK, stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    return "".join(received), raised.value


def refused_stream(gateway: Gateway) -> openai.APIStatusError:
    """A streamed call to `primary` refused before its first chunk: the error status."""
    with pytest.raises(openai.APIStatusError) as raised:
        for _ in gateway.client(timeout=30).chat.completions.create(
            model="primary", messages=ASK, stream=True
        ):
            pass
    return raised.value


def last_row(gateway: Gateway) -> dict[str, Any]:
    return gateway.ledger_rows()[-1]


def gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(arrivals)]


# --- retried failures ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_then_success_are_retried(gateway_factory, fault_server, status):
    """Two 5xx, then a healthy answer: the caller gets it, after three attempts."""
    server = fault_server("p")
    server.plan.fail_next(2, Fault.error(status))
    gateway = gateway_factory(config(server.url, retry={"backoff_base": 0.2, "backoff_max": 0.3}))
    completion, raw = create(gateway)
    assert completion.choices[0].message.content == "Hello from p."
    assert raw.headers["x-metergate-attempts"] == "3"
    assert raw.headers["x-metergate-upstream"] == "p-up"
    assert server.plan.requests == 3
    # Full jitter: retry n waits at most min(backoff_max, base * 2**n): 0.2, then 0.3.
    first, second = gaps(server.plan.arrivals)
    assert first <= 0.2 + 0.1 and second <= 0.3 + 0.1
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="upstream_error") == 2
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="success") == 1
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"], row["upstream"]) == (
        "success",
        200,
        3,
        "p-up",
    )
    assert row["output_tokens"] == 4


@pytest.mark.parametrize(("status", "caller_status"), [(500, 502), (503, 503)])
def test_persistent_server_error_gives_up_after_max_retries(
    gateway_factory, fault_server, status, caller_status
):
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.error(status))
    gateway = gateway_factory(config(server.url))
    with pytest.raises(openai.InternalServerError) as raised:
        create(gateway)
    assert raised.value.status_code == caller_status
    assert f"says {status}" in raised.value.message  # the provider's message is kept
    assert server.plan.requests == 3  # 1 + max_retries
    said = raised.value.response.headers  # the failure says where, and how often, it was tried
    assert (said["x-metergate-upstream"], said["x-metergate-attempts"]) == ("p-up", "3")
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == (
        "upstream_error",
        caller_status,
        3,
    )
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="upstream_error") == 3


def test_rate_limit_retry_after_is_honoured(gateway_factory, fault_server):
    """429 with Retry-After: 1, then healthy: the retry waits the full second, no jitter."""
    server = fault_server("p")
    server.plan.then(Fault.rate_limited("1"))
    gateway = gateway_factory(config(server.url))
    started = time.monotonic()
    completion, raw = create(gateway)
    elapsed = time.monotonic() - started
    assert completion.choices[0].message.content == "Hello from p."
    assert raw.headers["x-metergate-attempts"] == "2"
    (gap,) = gaps(server.plan.arrivals)
    assert 1.0 <= gap < 1.3
    assert 1.0 <= elapsed < 2.0
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="rate_limited") == 1
    row = last_row(gateway)
    assert (row["outcome"], row["attempts"]) == ("success", 2)


def test_long_retry_after_is_not_waited_for_and_spends_no_budget(gateway_factory, fault_server):
    """Retry-After beyond max_retry_after: the caller gets the 429 at once, with the header."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.rate_limited("60"))
    gateway = gateway_factory(config(server.url, retry={"max_retry_after": 5}))
    budget = gateway.runtime.plan.dispatcher.retry_budget
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as raised:
        create(gateway)
    assert time.monotonic() - started < 0.5
    assert raised.value.status_code == 429
    assert raised.value.response.headers["retry-after"] == "60"
    assert server.plan.requests == 1
    assert budget.tokens == pytest.approx(budget.capacity)  # no retry made, none paid for
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("upstream_rejected", 429, 1)


@pytest.mark.parametrize("retry_after", ["inf", "1e400", "nan", "soon"])
def test_a_retry_after_that_is_no_number_is_no_advice(gateway_factory, fault_server, retry_after):
    """A 429 whose Retry-After is not a finite wait: backed off as without one, and the
    caller gets a 429 with a ledger row (an infinite wait once answered a 500, unmetered)."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.rate_limited(retry_after))
    gateway = gateway_factory(config(server.url))
    with pytest.raises(openai.RateLimitError) as raised:
        create(gateway)
    assert raised.value.status_code == 429
    assert "retry-after" not in raised.value.response.headers
    assert server.plan.requests == 3  # retried with backoff, not given up on
    row = last_row(gateway)
    # Each attempt was the upstream's rate limit; the request that ends is the provider's
    # refusal, an error of the service (not the caller refused by the gateway's limits).
    assert (row["outcome"], row["status"], row["attempts"]) == ("upstream_rejected", 429, 3)
    assert gateway.metric("metergate_requests_total", outcome="upstream_rejected") == 1
    assert gateway.metric("metergate_requests_total", outcome="rate_limited") == 0
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="rate_limited") == 3


def test_retry_after_as_an_http_date_is_honoured(gateway_factory, fault_server):
    """Retry-After in its other form, an HTTP-date, is a wait too: too long here, so the
    caller gets the 429 at once with the wait in seconds."""
    server = fault_server("p")
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    server.plan.fail_until_cleared(Fault.rate_limited(when))
    gateway = gateway_factory(config(server.url, retry={"max_retry_after": 5}))
    with pytest.raises(openai.RateLimitError) as raised:
        create(gateway)
    assert server.plan.requests == 1
    assert 100 <= int(raised.value.response.headers["retry-after"]) <= 121


def test_dropped_connection_is_retried(gateway_factory, fault_server):
    """The upstream closes the connection without a byte: safe to retry."""
    server = fault_server("p")
    server.plan.then(Fault.drop())
    gateway = gateway_factory(config(server.url))
    completion, raw = create(gateway)
    assert completion.choices[0].message.content == "Hello from p."
    assert raw.headers["x-metergate-attempts"] == "2"
    assert server.plan.requests == 2
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="connection_error") == 1


def test_connection_refused_is_retried_then_falls_back(gateway_factory):
    """Nothing listens on the primary's port: retried, then the fallback model serves."""
    gateway = gateway_factory(config(f"http://127.0.0.1:{free_port()}", fallback=True))
    completion, raw = create(gateway)
    assert completion.choices[0].message.content  # the simulated backup's answer
    assert raw.headers["x-metergate-upstream"] == "backup-up"
    assert raw.headers["x-metergate-attempts"] == "4"  # 3 refused + 1 served
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="connection_error") == 3
    assert gateway.metric(ATTEMPTS, upstream="backup-up", outcome="success") == 1
    assert (
        gateway.metric(FALLBACKS, model="primary", from_upstream="p-up", to_upstream="backup-up")
        == 1
    )
    row = last_row(gateway)
    assert (row["model"], row["upstream"], row["outcome"], row["attempts"]) == (
        "primary",
        "backup-up",
        "success",
        4,
    )


def test_hang_before_first_byte_times_out_and_is_retried(gateway_factory, fault_server):
    server = fault_server("p")
    server.plan.then(Fault.hang(3))
    gateway = gateway_factory(config(server.url))
    started = time.monotonic()
    completion, raw = create(gateway)
    elapsed = time.monotonic() - started
    assert completion.choices[0].message.content == "Hello from p."
    assert raw.headers["x-metergate-attempts"] == "2"
    (gap,) = gaps(server.plan.arrivals)
    assert 0.3 <= gap <= 0.3 + 0.05 + 0.15  # first_byte, then at most backoff_base
    assert elapsed < 1.5
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="timeout") == 1


def test_persistent_hang_is_a_504(gateway_factory, fault_server):
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.hang(3))
    gateway = gateway_factory(config(server.url, retry={"max_retries": 1}))
    with pytest.raises(openai.APIStatusError) as raised:
        create(gateway)
    assert raised.value.status_code == 504
    assert server.plan.requests == 2
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("timeout", 504, 2)


def test_stream_hang_before_first_chunk_is_retried(gateway_factory, fault_server):
    server = fault_server("p")
    server.plan.then(Fault.hang(3))
    gateway = gateway_factory(config(server.url))
    assert streamed_text(gateway) == "Hello from p."
    assert server.plan.requests == 2
    row = last_row(gateway)
    assert (row["outcome"], row["attempts"], row["stream"]) == ("success", 2, 1)


def test_malformed_json_is_an_upstream_error(gateway_factory, fault_server):
    """A 200 with broken JSON: nothing reached the caller, so retried; then a 502."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.malformed())
    gateway = gateway_factory(config(server.url, retry={"max_retries": 1}))
    with pytest.raises(openai.APIStatusError) as raised:
        create(gateway)
    assert raised.value.status_code == 502
    # how the body began, so that the operator sees what came instead
    assert 'malformed JSON: \'{"id": "chatcmpl-broken", "choices": [\'' in raised.value.message
    assert server.plan.requests == 2
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="upstream_error") == 2
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("upstream_error", 502, 2)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"[1, 2, 3]", "not a JSON object): '[1, 2, 3]'"),
        (  # a proxy's page, or a base_url that names a web site: quoted, so it is seen
            b"<html>\n  <body><h1>Sign in to the proxy</h1></body>\n</html>",
            "'<html> <body><h1>Sign in to the proxy</h1></body> </html>'",
        ),
        (  # a page that echoes the request's headers: quoted without the credential
            b"<pre>authorization: Bearer sk-fault-drill</pre>",
            "'<pre>authorization: ***</pre>'",
        ),
        (b'{"error": {"message": "engine overloaded"}}', "engine overloaded"),
        (b'{"id": "x", "usage": {"prompt_tokens": 3}}', "without `choices`"),
    ],
)
def test_a_200_that_is_no_completion_is_the_upstreams_fault_on_every_door(
    gateway_factory, fault_server, body, said
):
    """A 200 whose JSON is not a chat completion (an error object, a list, no choices):
    not relayed as a success, nor a 500 of the gateway on the doors that translate it,
    but a 502 held against the upstream, after its retries."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.answered(body))
    circuit = {"enabled": False}  # eight failures in a row: all four doors must get there
    gateway = gateway_factory(config(server.url, retry={"max_retries": 1}, circuit=circuit))
    with pytest.raises(openai.APIStatusError) as chat:
        create(gateway)
    with pytest.raises(openai.APIStatusError) as legacy:
        gateway.client().completions.create(model="primary", prompt="hi")
    with pytest.raises(openai.APIStatusError) as responses:
        gateway.client().responses.create(model="primary", input="hi")
    claude = anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"), api_key=gateway.key, max_retries=0
    )
    with pytest.raises(anthropic.APIStatusError) as messages:
        claude.messages.create(model="primary", max_tokens=50, messages=ASK)
    for raised in (chat, legacy, responses, messages):
        assert raised.value.status_code == 502
        assert said in raised.value.message
    rows = gateway.ledger_rows()
    assert [(r["api"], r["outcome"], r["status"], r["attempts"]) for r in rows] == [
        (api, "upstream_error", 502, 2) for api in ("chat", "completions", "responses", "messages")
    ]
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="upstream_error") == 8
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="gateway_error") == 0


# --- failures that must not be retried ----------------------------------------------------


def test_reset_mid_body_is_not_retried(gateway_factory, fault_server):
    """Headers and half the JSON arrived: the upstream did the work; no retry, a 502."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.reset())
    gateway = gateway_factory(config(server.url, fallback=True))
    with pytest.raises(openai.APIStatusError) as raised:
        create(gateway)
    assert raised.value.status_code == 502
    assert server.plan.requests == 1
    assert gateway.metric(ATTEMPTS, upstream="backup-up") == 0  # not sent elsewhere either
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="connection_error") == 1
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"], row["upstream"]) == (
        "connection_error",
        502,
        1,
        "p-up",
    )


# A CDN's error page as it comes: kilobytes of markup before anything a person reads.
_CDN_PAGE = (
    b'<!DOCTYPE html>\n<!--[if lt IE 7]> <html class="no-js ie6 oldie" lang="en-US"> '
    b'<![endif]-->\n<!--[if gt IE 8]><!--> <html class="no-js" lang="en-US"> <!--<![endif]-->'
    b'\n<head>\n<meta charset="UTF-8" />\n<style>' + b"body{margin:0} " * 300 + b"</style>\n"
    b"<title>api.example.com | 502: Bad gateway</title>\n</head><body>...</body></html>"
)


# nginx's own page for a body over its client_max_body_size, sent before it reads it.
_NGINX_413 = (
    b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>"
    b"\r\n</body>\r\n</html>\r\n"
)


def test_an_answer_past_max_response_bytes_names_the_setting(gateway_factory, fault_server):
    """The limit is the gateway's: the error says which setting to raise, not that the
    upstream broke the protocol."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.answered(b'{"choices": []' + b" " * 5000 + b"}"))
    settings = config(server.url, retry={"max_retries": 0})
    settings["providers"]["p"]["max_response_bytes"] = 4096
    gateway = gateway_factory(settings)
    with pytest.raises(openai.InternalServerError) as raised:
        create(gateway)
    message = raised.value.message
    assert "larger than 4,096 bytes (max_response_bytes of provider 'p')" in message, message
    assert "broke the HTTP protocol" not in message


@pytest.mark.parametrize(
    ("status", "page", "outcome", "caller_status", "message"),
    [
        (
            502,
            _CDN_PAGE,
            "upstream_error",
            502,
            "upstream error 502: an HTML page titled 'api.example.com | 502: Bad gateway'",
        ),
        (
            413,
            _NGINX_413,
            "upstream_rejected",
            413,
            "the upstream answered 413: an HTML page titled '413 Request Entity Too Large'",
        ),
        (409, b"", "upstream_rejected", 400, "the upstream answered 409 with an empty body"),
    ],
    ids=["cdn-502", "proxy-413", "empty-409"],
)
def test_an_error_page_from_a_proxy_is_told_by_its_title(
    gateway_factory, fault_server, status, page, outcome, caller_status, message
):
    """An error page from a CDN, load balancer or proxy in front of the upstream begins
    with markup (kilobytes of it, a CDN's): the caller is told its title, and that the
    upstream sent it, not its first bytes."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.page(status, page))
    gateway = gateway_factory(config(server.url, retry={"max_retries": 0}))
    with pytest.raises(openai.APIStatusError) as raised:
        create(gateway)
    assert raised.value.status_code == caller_status
    assert raised.value.body["message"] == message
    row = last_row(gateway)
    assert (row["outcome"], row["status"]) == (outcome, caller_status)


def test_caller_fault_400_is_neither_retried_nor_sent_to_the_fallback(
    gateway_factory, fault_server
):
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.error(400))
    gateway = gateway_factory(config(server.url, fallback=True))
    with pytest.raises(openai.BadRequestError) as raised:
        create(gateway)
    assert raised.value.status_code == 400
    assert server.plan.requests == 1
    assert gateway.metric(ATTEMPTS, upstream="backup-up") == 0
    assert gateway.metric(FALLBACKS) == 0
    assert gateway.metric(CIRCUIT, upstream="p-up") == 0
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("upstream_rejected", 400, 1)


def test_an_upstream_400_keeps_the_field_it_names(gateway_factory, fault_server):
    """The upstream's `param` reaches the caller, so its SDK says which field was refused."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.error(400, param="messages[0].content"))
    gateway = gateway_factory(config(server.url))
    with pytest.raises(openai.BadRequestError) as raised:
        create(gateway)
    assert raised.value.param == "messages[0].content"
    assert raised.value.body["message"] == "fault server p says 400"
    server.plan.fail_until_cleared(Fault.error(400, param="x" * 500))  # no field's name
    with pytest.raises(openai.BadRequestError) as raised:
        create(gateway)
    assert raised.value.param is None


@pytest.mark.parametrize(
    ("fault", "outcome", "status", "message"),
    [
        (Fault.stall(3, after=3), "timeout", 504, "nothing more for 0.3 s (timeouts.stream_idle)"),
        (Fault.cut(after=3), "upstream_error", 502, "ended before [DONE]"),
        (Fault.reset(after=3), "connection_error", 502, "closed the connection in the middle"),
    ],
    ids=["stall", "cut", "reset"],
)
def test_stream_failure_after_first_chunk_is_an_error_event(
    gateway_factory, fault_server, fault, outcome, status, message
):
    """Chunks reached the caller, then the upstream failed: an error event, no retry."""
    server = fault_server("p")
    server.plan.fail_until_cleared(fault)
    gateway = gateway_factory(config(server.url, fallback=True))
    received, error = broken_stream(gateway)
    assert received == "Hello from"  # role chunk, "Hello", " from"
    assert message in error.message
    assert server.plan.requests == 1
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome=outcome) == 1
    assert gateway.metric(ATTEMPTS, upstream="backup-up") == 0
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"], row["stream"]) == (
        outcome,
        status,
        1,
        1,
    )


def test_a_stream_whose_usage_came_is_whole_without_done(gateway_factory, fault_server):
    """Its finish reason and usage chunk arrived, then the server closed the stream
    without `[DONE]`: the answer is whole, and billed as reported, not estimated."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.cut(after=7))  # all but [DONE]
    gateway = gateway_factory(config(server.url))
    chunks = list(
        gateway.client().chat.completions.create(
            model="primary", messages=ASK, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "Hello from p."
    )
    assert chunks[-1].usage is not None
    row = last_row(gateway)
    assert (row["outcome"], row["usage_estimated"]) == ("success", 0)
    assert row["output_tokens"] == chunks[-1].usage.completion_tokens


def test_stream_idle_not_first_byte_bounds_the_gap_after_the_first_chunk(
    gateway_factory, fault_server
):
    """A patient first_byte (2 s) must not stretch the idle limit (0.3 s) of a started stream."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.stall(5, after=2))
    gateway = gateway_factory(config(server.url, timeouts={"first_byte": 2.0}))
    stream = gateway.client(timeout=10).chat.completions.create(
        model="primary", messages=ASK, stream=True
    )
    first_chunk_at = None
    with pytest.raises(openai.APIError):
        for _ in stream:
            first_chunk_at = first_chunk_at or time.monotonic()
    assert first_chunk_at is not None
    waited = time.monotonic() - first_chunk_at
    assert 0.25 <= waited < 1.0
    assert last_row(gateway)["outcome"] == "timeout"


@pytest.mark.parametrize("done", [True, False], ids=["then-done", "then-end"])
def test_an_error_event_after_the_200_fails_the_stream_with_its_message(
    gateway_factory, fault_server, done
):
    """An upstream that reports a failure as a stream event (OpenRouter's chunk with an
    `error` and `finish_reason: "error"`), even one followed by `[DONE]`, has failed:
    the caller gets the upstream's message and the row says so, where it passed as a
    complete stream (or as one that merely ended early)."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.failed_midway(after=3, done=done))
    gateway = gateway_factory(config(server.url))
    received, error = broken_stream(gateway)
    assert received == "Hello from"
    assert "Provider disconnected unexpectedly" in error.message
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("upstream_error", 502, 1)
    assert row["output_tokens"] > 0  # billed what was relayed
    claude = anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"), api_key=gateway.key, max_retries=0
    )
    with (
        pytest.raises(anthropic.APIStatusError, match="Provider disconnected") as broken,
        claude.messages.stream(model="primary", max_tokens=50, messages=ASK) as events,
    ):
        for _ in events:
            pass
    assert broken.value.body["error"]["type"] == "api_error"


def test_a_stream_kept_open_by_pings_alone_ends_at_stream_total(gateway_factory, fault_server):
    """Keep-alive comments are bytes, so `stream_idle` never fires on them: an upstream
    that stopped generating but pings on is cut by `stream_total`, the caller told which
    setting ended it, and the row billed for what was relayed."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.pings(60, after=3))
    gateway = gateway_factory(config(server.url, timeouts={"stream_total": 1.5}))
    received, error = broken_stream(gateway)
    assert received == "Hello from"
    assert "did not finish its stream within 1.5 s (timeouts.stream_total)" in error.message
    assert server.plan.requests == 1
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["stream"]) == ("timeout", 504, 1)
    assert row["output_tokens"] > 0


def test_a_stream_of_pings_before_any_event_ends_at_first_byte(gateway_factory, fault_server):
    """Headers, then keep-alive comments and no event: the caller has had nothing, not
    even a status, and no byte timer fires on comments. `first_byte` bounds the wait
    for the first event; the upstream may be generating, so it is not retried."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.pings(60, after=0))
    gateway = gateway_factory(config(server.url, timeouts={"first_byte": 1.0}))
    timed_out = refused_stream(gateway)
    assert timed_out.status_code == 504
    assert "no stream event within 1 s" in timed_out.message
    assert "(timeouts.first_byte)" in timed_out.message
    assert server.plan.requests == 1
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("timeout", 504, 1)


def test_a_stream_sent_for_a_whole_answer_is_assembled(gateway_factory, fault_server):
    """A server that streams what it is not asked to stream has generated (and billed)
    the answer: it is read back into the whole answer, metered by the usage it reported,
    not retried into a second generation."""
    base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def event(choices: list[Any], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    call = {"index": 0, "id": "call_1", "function": {"name": "look", "arguments": '{"q":'}}
    body = b"".join(
        [
            event([{"index": 0, "delta": {"role": "assistant", "content": "Hello"}}]),
            event([{"index": 0, "delta": {"content": " there"}}]),
            event([{"index": 0, "delta": {"tool_calls": [call]}}]),
            event(
                [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]},
                    }
                ]
            ),
            event([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
            event([], usage={"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}),
            b"data: [DONE]\n\n",
        ]
    )
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.answered(body))
    gateway = gateway_factory(config(server.url))
    reply = gateway.client().chat.completions.create(model="primary", messages=ASK)
    message = reply.choices[0].message
    assert message.content == "Hello there" and reply.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    assert (message.tool_calls[0].function.name, message.tool_calls[0].function.arguments) == (
        "look",
        '{"q":"x"}',
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    assert server.plan.requests == 1
    row = last_row(gateway)
    assert (row["outcome"], row["usage_estimated"], row["output_tokens"]) == ("success", 0, 6)


def test_a_stream_refused_as_too_large_is_not_kept(gateway_factory, bg):
    """A streamed answer over max_response_bytes whose event never ends: the relay held
    all of it, and the failure's traceback kept the relay's frame (and so that buffer)
    in a cycle the gateway's rare collections leave: ~max_response_bytes per refusal."""
    line = b"data: " + b"x" * (3 * 1024 * 1024)  # one event that never ends

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(line), 256 * 1024):
                await response.write(line[start : start + 256 * 1024])
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", huge)
    server = UpstreamServer(bg, app)
    try:
        cfg = config(server.url)
        cfg["providers"]["p"]["max_response_bytes"] = 2 * 1024 * 1024
        gateway = gateway_factory(cfg)
        client = gateway.client()
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(4):
                with pytest.raises(openai.APIStatusError, match="larger than 2 MiB"):
                    client.chat.completions.create(model="primary", messages=ASK, stream=True)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
    finally:
        server.close()
    assert held < 3 * 1024 * 1024, f"{held / 2**20:.0f} MiB still held after 4 refusals"


def test_a_deployments_timeouts_override_its_providers_key_by_key(gateway_factory, fault_server):
    """An upstream that sets only `first_byte` keeps its provider's `stream_idle` (0.3 s),
    not the 60 s default."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.stall(10, after=2))
    cfg = config(server.url)
    cfg["upstreams"]["p-up"]["timeouts"] = {"first_byte": 5.0}
    gateway = gateway_factory(cfg)
    received, error = broken_stream(gateway)
    assert received == "Hello"
    assert "sent nothing more for 0.3 s (timeouts.stream_idle)" in error.message
    assert last_row(gateway)["outcome"] == "timeout"


def test_a_stream_whose_first_event_is_not_json_is_retried(gateway_factory, fault_server):
    """Nothing reached the caller yet: an upstream stream that is not JSON is the
    upstream's failure, retried like any other before the first chunk."""
    server = fault_server("p")
    server.plan.then(Fault.garbage(after=0))
    gateway = gateway_factory(config(server.url))
    assert streamed_text(gateway) == "Hello from p."
    assert server.plan.requests == 2
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="upstream_error") == 1
    row = last_row(gateway)
    assert (row["outcome"], row["attempts"]) == ("success", 2)


def test_an_event_that_is_not_json_mid_stream_is_the_upstreams_fault_on_every_door(
    gateway_factory, fault_server
):
    """Messages, Responses and legacy completions read every event to translate it: one
    that is not JSON ends the stream with the door's error event, held against the
    upstream (the chat door relays events unparsed, as the upstream sent them)."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.garbage(after=2))
    gateway = gateway_factory(config(server.url))
    claude = anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"), api_key=gateway.key, max_retries=0
    )
    with (
        pytest.raises(anthropic.APIStatusError) as broken,
        claude.messages.stream(model="primary", max_tokens=50, messages=ASK) as events,
    ):
        for _ in events:
            pass
    assert broken.value.body["error"]["type"] == "api_error"
    assert "not a JSON object" in broken.value.body["error"]["message"]
    with gateway.client().responses.stream(model="primary", input="hi") as stream:
        kinds = [event.type for event in stream]
    assert kinds[-2:] == ["error", "response.failed"]
    with pytest.raises(openai.APIError, match="not a JSON object"):
        for _ in gateway.client().completions.create(model="primary", prompt="hi", stream=True):
            pass
    rows = gateway.ledger_rows()
    assert [(r["api"], r["outcome"], r["status"]) for r in rows] == [
        ("messages", "upstream_error", 502),
        ("responses", "upstream_error", 502),
        ("completions", "upstream_error", 502),
    ]
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="upstream_error") == 3
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="gateway_error") == 0


def test_a_stream_without_events_is_refused_as_such(gateway_factory, fault_server):
    """A 200 to a streamed request holding no event and no answer the gateway can read."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.answered(b'{"id": "chatcmpl-x"}'))
    gateway = gateway_factory(config(server.url, retry={"max_retries": 0}))
    refused = refused_stream(gateway)
    assert refused.status_code == 502
    assert "without a single stream event" in refused.message
    assert last_row(gateway)["outcome"] == "upstream_error"


@pytest.mark.parametrize("fault", [Fault.unstreamed(), Fault.bare()], ids=["whole", "bare"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_an_answer_that_did_not_stream_is_relayed_and_metered_once(
    gateway_factory, fault_server, fault, include_usage
):
    """A server that ignores `stream: true` (a whole JSON answer), or sends its events
    without `data: `: it generated and billed the answer, so the caller gets it as a
    stream, the ledger the usage it reported, and nothing is retried."""
    server = fault_server("p")
    server.plan.fail_until_cleared(fault)
    gateway = gateway_factory(config(server.url))
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(
        gateway.client(timeout=10).chat.completions.create(
            model="primary", messages=ASK, stream=True, **options
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from p."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = [c.usage for c in chunks if c.usage is not None]
    assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == (
        [(11, 4)] if include_usage else []
    )
    assert server.plan.requests == 1
    row = last_row(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("success", 200, 1)
    assert (row["input_tokens"], row["output_tokens"], row["usage_estimated"]) == (11, 4, 0)
    assert row["cost_nano"] == 11 * 1000 + 4 * 2000


def test_an_error_sent_with_200_to_a_stream_keeps_its_message(gateway_factory, fault_server):
    server = fault_server("p")
    overloaded = {"error": {"message": "The model is overloaded, try later", "code": "busy"}}
    server.plan.fail_until_cleared(Fault.answered(orjson.dumps(overloaded)))
    gateway = gateway_factory(config(server.url, retry={"max_retries": 0}))
    refused = refused_stream(gateway)
    assert refused.status_code == 502
    assert refused.body["message"] == (
        "the upstream answered 200 with an error instead of a stream: "
        "The model is overloaded, try later"
    )
    assert last_row(gateway)["outcome"] == "upstream_error"


# --- a caller that leaves before its answer ------------------------------------------------


def rows_when_written(
    gateway: Gateway, count: int = 1, seconds: float = 20
) -> list[dict[str, Any]]:
    """The ledger's rows once `count` are there (the handler writes one when it ends)."""
    deadline = time.monotonic() + seconds
    while len(rows := gateway.ledger_rows()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


def leave_early(gateway: Gateway, stream: bool = False) -> None:
    """A caller that gives up after 0.3 s (the SDK closes its connection on a timeout)."""
    with pytest.raises(openai.APITimeoutError):
        reply = gateway.client(timeout=0.3).chat.completions.create(
            model="primary", messages=ASK, stream=stream
        )
        for _ in reply if stream else ():
            pass


def test_no_retry_is_made_for_a_caller_that_left(gateway_factory, fault_server):
    """429 with Retry-After: 1; the caller leaves during the wait: no second attempt."""
    server = fault_server("p")
    server.plan.then(Fault.rate_limited("1"))
    gateway = gateway_factory(config(server.url))
    leave_early(gateway)
    (row,) = rows_when_written(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("cancelled", 499, 1)
    assert server.plan.requests == 1
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="rate_limited") == 1
    assert gateway.metric("metergate_active_requests", model="primary") == 0


def test_an_answer_nobody_waits_for_is_metered_as_the_upstream_billed_it(
    gateway_factory, fault_server
):
    """The caller leaves while the upstream works: that attempt finishes (providers bill
    it anyway) and its real usage is in the ledger, as cancelled; nothing is retried."""
    server = fault_server("p")
    server.plan.then(Fault.hang(1.5))  # answers, healthy, after 1.5 s
    gateway = gateway_factory(config(server.url, timeouts={"first_byte": 10}))
    leave_early(gateway)
    (row,) = rows_when_written(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("cancelled", 499, 1)
    assert (row["input_tokens"], row["output_tokens"], row["usage_estimated"]) == (11, 4, 0)
    assert row["cost_nano"] == 11 * 1000 + 4 * 2000  # $1 and $2 per million tokens
    assert server.plan.requests == 1 and server.plan.hung_up == 0
    assert gateway.metric("metergate_requests_total", model="primary", outcome="cancelled") == 1
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="success") == 1


def test_a_stream_whose_caller_leaves_before_its_first_chunk_is_closed_at_once(
    gateway_factory, fault_server
):
    """Closing a stream stops the upstream generating: it is closed when the caller
    leaves, not when the first chunk would have come (a minute here), and not retried."""
    server = fault_server("p")
    server.plan.then(Fault.hang(60))
    gateway = gateway_factory(config(server.url, timeouts={"first_byte": 60}))
    leave_early(gateway, stream=True)
    (row,) = rows_when_written(gateway)
    assert (row["outcome"], row["status"], row["attempts"]) == ("cancelled", 499, 1)
    assert row["stream"] == 1
    deadline = time.monotonic() + 20
    while server.plan.hung_up == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.plan.hung_up == 1 and server.plan.requests == 1
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="cancelled") == 1
    assert gateway.metric("metergate_active_requests", model="primary") == 0
    # the gateway is as it was: the next caller is served
    completion, _ = create(gateway)
    assert completion.choices[0].message.content == "Hello from p."


# --- balancing and circuits -----------------------------------------------------------------


def test_weights_split_traffic_and_an_open_circuit_is_skipped(gateway_factory, fault_server):
    a, b = fault_server("a"), fault_server("b")
    cfg = {
        "providers": {"a": provider(a.url), "b": provider(b.url)},
        "upstreams": {
            "a-up": {"provider": "a", "model": "m", "price": PRICE, "weight": 3},
            "b-up": {
                "provider": "b",
                "model": "m",
                "price": PRICE,
                "weight": 1,
                "circuit": {"failure_threshold": 1, "open_seconds": 30},
            },
        },
        "models": {"w": {"upstreams": ["a-up", "b-up"], "retry": RETRY}},
    }
    gateway = gateway_factory(cfg)
    client = gateway.client(timeout=10)

    def served_by(count: int) -> Counter[str]:
        raw = client.chat.completions.with_raw_response.create
        return Counter(
            raw(model="w", messages=ASK).headers["x-metergate-upstream"] for _ in range(count)
        )

    split = served_by(80)
    assert 50 <= split["a-up"] <= 70 and split["a-up"] + split["b-up"] == 80  # ~3:1
    assert (a.plan.requests, b.plan.requests) == (split["a-up"], split["b-up"])

    b.plan.fail_until_cleared(Fault.error(503))
    before = b.plan.requests
    for _ in range(10):  # until b's one failure opens its circuit (retried on a)
        _, raw = create(gateway, "w")
        assert raw.headers["x-metergate-upstream"] == "a-up"
        if b.plan.requests > before:
            break
    assert b.plan.requests == before + 1
    assert gateway.metric(CIRCUIT, upstream="b-up") == 2
    assert served_by(20) == {"a-up": 20}
    assert b.plan.requests == before + 1  # skipped while open


def test_refused_primary_opens_circuit_then_recovers(gateway_factory, fault_server, caplog):
    """Listener closed: fallback serves and the circuit opens; listener back: it closes."""
    server = fault_server("p")
    cfg = config(
        server.url,
        retry={"max_retries": 1},
        circuit={"failure_threshold": 2, "open_seconds": 0.4, "half_open_probes": 1},
        fallback=True,
    )
    cfg["models"]["solo"] = {"upstreams": ["p-up"]}  # no fallback
    gateway = gateway_factory(cfg)
    assert create(gateway)[1].headers["x-metergate-upstream"] == "p-up"
    server.stop_listening()
    with caplog.at_level(logging.WARNING, logger="metergate.circuit"):
        _, raw = create(gateway)
        assert raw.headers["x-metergate-upstream"] == "backup-up"
        assert raw.headers["x-metergate-attempts"] == "3"  # 2 refused (circuit opens), backup
        assert gateway.metric(CIRCUIT, upstream="p-up") == 2
        # Open: the primary is not even tried.
        _, raw = create(gateway)
        assert raw.headers["x-metergate-attempts"] == "1"
        assert raw.headers["x-metergate-upstream"] == "backup-up"
        with pytest.raises(openai.InternalServerError) as raised:
            create(gateway, "solo")
        assert raised.value.status_code == 503
        assert int(raised.value.response.headers["retry-after"]) >= 1
        assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="connection_error") == 2
        server.start_listening()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            _, raw = create(gateway)
            if raw.headers["x-metergate-upstream"] == "p-up":
                break
            time.sleep(0.05)
    assert raw.headers["x-metergate-upstream"] == "p-up"
    assert gateway.metric(CIRCUIT, upstream="p-up") == 0
    changes = [r.getMessage() for r in caplog.records if r.name == "metergate.circuit"]
    assert changes == [
        "circuit p-up: closed -> open",
        "circuit p-up: open -> half-open",
        "circuit p-up: half-open -> closed",
    ]


def test_an_open_circuit_shows_half_open_when_its_time_is_up_without_traffic(
    gateway_factory, fault_server
):
    """The state gauge follows the clock, not the next request: a quiet upstream's circuit
    must not read open (and MetergateCircuitOpen fire) long after it may be tried."""
    server = fault_server("p")
    cfg = config(
        server.url,
        circuit={"failure_threshold": 1, "open_seconds": 0.5, "half_open_probes": 1},
    )
    gateway = gateway_factory(cfg)
    server.plan.fail_until_cleared(Fault.error(503))
    with pytest.raises(openai.InternalServerError):
        create(gateway)
    assert gateway.metric(CIRCUIT, upstream="p-up") == 2
    requests = server.plan.requests
    deadline = time.monotonic() + 15  # the check runs every 2 s
    while gateway.metric(CIRCUIT, upstream="p-up") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.metric(CIRCUIT, upstream="p-up") == 1
    assert server.plan.requests == requests  # no request moved it
    server.plan.clear()
    assert create(gateway)[1].headers["x-metergate-upstream"] == "p-up"  # the probe
    assert gateway.metric(CIRCUIT, upstream="p-up") == 0


# --- the outage drills ---------------------------------------------------------------------


async def load(
    gateway: Gateway, workers: int, seconds: float, on_tick: Callable[[float], None]
) -> list[dict[str, Any]]:
    """`workers` callers in a loop for `seconds`; every call's start, end and result."""
    client = gateway.async_client(timeout=10)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    stop = started + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            call = {"start": time.monotonic() - started}
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="primary", messages=ASK
                )
                call["upstream"] = raw.headers["x-metergate-upstream"]
                call["attempts"] = int(raw.headers["x-metergate-attempts"])
            except openai.APIError as error:
                call["error"] = repr(error)
            call["end"] = time.monotonic() - started
            results.append(call)
            await asyncio.sleep(0.01)

    async def ticker() -> None:
        while time.monotonic() < stop:
            on_tick(time.monotonic() - started)
            await asyncio.sleep(0.01)

    await asyncio.gather(ticker(), *(worker() for _ in range(workers)))
    await client.close()
    return results


async def test_outage_opens_circuit_moves_traffic_and_recovers(
    gateway_factory, fault_server, caplog
):
    """8 callers for 3.2 s; the primary fails 100% from 0.5 s to 2.0 s."""
    server = fault_server("p")
    gateway = gateway_factory(
        config(
            server.url,
            retry={"max_retries": 2, "backoff_base": 0.02, "backoff_max": 0.05},
            circuit={
                "failure_threshold": 5,
                "failure_ratio": 0.5,
                "min_requests": 10,
                "window_seconds": 5,
                "open_seconds": 0.4,
                "half_open_probes": 2,
            },
            fallback=True,
            retry_budget={"ratio": 0.1, "min_per_second": 1},
        )
    )
    events: dict[str, float] = {}
    gauge: list[tuple[float, float]] = []

    def on_tick(t: float) -> None:
        if t >= 0.5 and "down" not in events:
            server.plan.fail_until_cleared(Fault.error(503))
            events["down"] = t
        if t >= 2.0 and "up" not in events:
            server.plan.clear()
            events["up"] = t
        state = gateway.metric(CIRCUIT, upstream="p-up")
        if not gauge or gauge[-1][1] != state:
            gauge.append((t, state))

    wall_start = time.time()
    with caplog.at_level(logging.WARNING, logger="metergate.circuit"):
        results = await load(gateway, workers=8, seconds=3.2, on_tick=on_tick)
    duration = max(r["end"] for r in results)

    # Every caller was answered: by the primary, or through the fallback.
    assert [r for r in results if "error" in r] == []
    by_upstream = Counter(r["upstream"] for r in results)
    assert set(by_upstream) == {"p-up", "backup-up"}

    # The circuit opened during the outage (gauge and log), and closed again after it.
    states = [s for _, s in gauge]
    assert states[0] == 0 and 2 in states and states[-1] == 0
    opened_at = next(t for t, s in gauge if s == 2)
    assert events["down"] <= opened_at < events["down"] + 0.5
    transitions = [
        (r.created - wall_start, r.getMessage())
        for r in caplog.records
        if r.name == "metergate.circuit"
    ]
    messages = [m for _, m in transitions]
    assert messages[0] == "circuit p-up: closed -> open"
    assert "circuit p-up: open -> half-open" in messages
    assert "circuit p-up: half-open -> open" in messages  # probes during the outage failed
    assert messages[-1] == "circuit p-up: half-open -> closed"
    closed_at = transitions[-1][0]
    assert events["up"] <= closed_at < events["up"] + 0.4 + 0.5  # open_seconds + margin

    # While it was open, every caller was served by the fallback.
    during = [r for r in results if opened_at + 0.05 <= r["start"] and r["end"] <= events["up"]]
    assert len(during) > 20
    assert {r["upstream"] for r in during} == {"backup-up"}
    # After it closed, traffic is back on the primary.
    after = [r for r in results if r["start"] > closed_at + 0.05]
    assert len(after) > 20
    assert {r["upstream"] for r in after} == {"p-up"}
    before = [r for r in results if r["end"] < events["down"]]
    assert {r["upstream"] for r in before} == {"p-up"}

    # The retry budget holds attempts against the primary to requests x (1 + ratio)
    # + min_per_second x duration, plus the bucket's initial burst (10).
    requests = len(results)
    assert server.plan.requests <= requests * 1.1 + 1 * duration + 10 + 2
    failed = server.plan.served["error"]
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="upstream_error") == failed
    assert gateway.metric(ATTEMPTS, upstream="p-up", outcome="success") == by_upstream["p-up"]
    assert (
        gateway.metric(FALLBACKS, model="primary", from_upstream="p-up", to_upstream="backup-up")
        == by_upstream["backup-up"]
    )
    rows = gateway.ledger_rows()
    assert len(rows) == requests
    assert Counter(r["upstream"] for r in rows) == by_upstream
    assert {r["outcome"] for r in rows} == {"success"}
    assert sum(r["attempts"] for r in rows) == sum(r["attempts"] for r in results)
    print(
        f"\noutage drill: {requests} requests in {duration:.2f}s, {by_upstream}, "
        f"primary attempts {server.plan.requests} ({failed} failed), "
        f"opened +{opened_at - events['down']:.2f}s after the outage, "
        f"closed +{closed_at - events['up']:.2f}s after recovery, transitions {messages}"
    )


async def test_retry_budget_caps_retries_when_the_circuit_cannot(gateway_factory, fault_server):
    """Circuit off, primary always failing, 3 retries allowed: the budget keeps retries
    to ratio x requests (+ floor and burst), instead of quadrupling the load."""
    server = fault_server("p")
    server.plan.fail_until_cleared(Fault.error(503))
    gateway = gateway_factory(
        config(
            server.url,
            retry={"max_retries": 3, "backoff_base": 0.001, "backoff_max": 0.002},
            circuit={"enabled": False},
            fallback=True,
            retry_budget={"ratio": 0.1, "min_per_second": 1},
        )
    )
    results = await load(gateway, workers=8, seconds=1.0, on_tick=lambda t: None)
    duration = max(r["end"] for r in results)
    requests = len(results)
    assert [r for r in results if "error" in r] == []
    assert {r["upstream"] for r in results} == {"backup-up"}
    attempts = server.plan.requests
    retries = attempts - requests
    assert requests >= 50
    assert retries >= 10  # the initial burst was used: retries did happen
    assert retries <= requests * 0.1 + 1 * duration + 10 + 1
    assert attempts < 1.5 * requests  # unbudgeted, it would be 4 x requests
    print(f"\nbudget drill: {requests} requests, {attempts} primary attempts in {duration:.2f}s")
