"""OpenTelemetry traces: spans decoded from the real OTLP protobuf payloads a local
collector receives, the trace context carried caller → gateway → upstream, content kept
out unless asked for, and requests unaffected by a collector that is down."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness import BackgroundLoop, Gateway, free_port
from tests.otlp import GrpcCollector, HttpCollector, SilentCollector
from tests.upstreams.openai_server import API_KEY

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
ASK = [{"role": "user", "content": "Where is my parcel? Mail me at kim@example.com"}]


@pytest.fixture
def collector(bg: BackgroundLoop) -> Iterator[HttpCollector]:
    receiver = HttpCollector(bg)
    yield receiver
    receiver.close()


def traced_config(upstream_url: str, endpoint: str, **tracing: Any) -> dict[str, Any]:
    return {
        "providers": {
            "up": {"type": "openai", "base_url": f"{upstream_url}/v1", "api_key": API_KEY},
            "broken": {"type": "simulated", "simulated": {"error_rate": 1.0}},
        },
        "upstreams": {
            "up-gpt": {
                "provider": "up",
                "model": "gpt-4.1-2025-04-14",
                "price": {"input": 2, "cached_input": 0.5, "output": 8},
            },
            "down-gpt": {
                "provider": "broken",
                "model": "gpt-broken",
                "price": {"input": 1, "output": 1},
                "circuit": {"enabled": False},
            },
        },
        "models": {
            "gpt-4.1": {"upstreams": ["up-gpt"]},
            "shaky": {
                "upstreams": ["down-gpt"],
                "retry": {"max_retries": 1, "backoff_base": 0.001, "backoff_max": 0.001},
                "fallbacks": ["gpt-4.1"],
            },
        },
        "tracing": {
            "enabled": True,
            "endpoint": endpoint,
            "export_interval_seconds": 0.05,
            "service_name": "gateway-under-test",
            **tracing,
        },
    }


def traceparent(sampled: bool = True) -> dict[str, str]:
    return {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-{'01' if sampled else '00'}"}


def by_kind(spans: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return sorted((s for s in spans if s["kind"] == kind), key=lambda s: s["start"])


def test_one_server_span_and_a_client_span_per_attempt_on_the_callers_trace(
    gateway_factory, openai_upstream, collector
):
    server, state = openai_upstream
    gateway: Gateway = gateway_factory(traced_config(server.url, collector.endpoint))
    headers = {**traceparent(), "tracestate": "vendor=abc", "x-metergate-tags": "feature=rerank"}
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=ASK, max_tokens=50, temperature=0.2, extra_headers=headers
    )
    reply = raw.parse()

    spans = collector.wait(lambda s: len(s) >= 2)
    assert {s["trace_id"] for s in spans} == {CALLER_TRACE}
    (root,) = by_kind(spans, "SERVER")
    (attempt,) = by_kind(spans, "CLIENT")
    # The server span continues the caller's trace; the attempt span is its child.
    assert root["parent_span_id"] == CALLER_SPAN
    assert attempt["parent_span_id"] == root["span_id"]
    assert root["name"] == "chat gpt-4.1" and attempt["name"] == "chat gpt-4.1-2025-04-14"
    attrs = root["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4.1"
    assert attrs["gen_ai.response.model"] == "gpt-4.1-2025-04-14"
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert attrs["gen_ai.request.max_tokens"] == 50 and attrs["gen_ai.request.temperature"] == 0.2
    assert attrs["metergate.cost_usd"] == pytest.approx(
        float(raw.headers["x-metergate-cost-usd"]), abs=1e-12
    )
    assert attrs["metergate.key"] == "test" and attrs["metergate.upstream"] == "up-gpt"
    assert attrs["metergate.outcome"] == "success" and attrs["metergate.attempts"] == 1
    assert attrs["metergate.tag.feature"] == "rerank"
    assert attrs["http.response.status_code"] == 200
    assert root["status"] == "UNSET" and root["scope"] == "metergate"
    assert root["resource"]["service.name"] == "gateway-under-test"
    # each worker of each replica is told apart (here the gateway runs in this process)
    assert root["resource"]["service.instance.id"] == f"{socket.gethostname()}:{os.getpid()}"
    assert attempt["attributes"]["metergate.upstream"] == "up-gpt"
    assert attempt["attributes"]["server.address"] == "127.0.0.1"
    assert root["start"] <= attempt["start"] <= attempt["end"] <= root["end"]
    # The upstream was called by the attempt span, on the same trace, with tracestate kept.
    sent = state.headers[-1]
    assert sent["traceparent"] == f"00-{CALLER_TRACE}-{attempt['span_id']}-01"
    assert sent["tracestate"] == "vendor=abc"
    # Content stays out by default: not the prompt, not the answer.
    flattened = str(spans)
    assert "kim@example.com" not in flattened and "fake OpenAI" not in flattened
    assert "gen_ai.input.messages" not in attrs and "gen_ai.output.messages" not in attrs


def test_retries_and_fallbacks_are_separate_child_spans(
    gateway_factory, openai_upstream, collector
):
    server, _ = openai_upstream
    gateway = gateway_factory(traced_config(server.url, collector.endpoint))
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="shaky", messages=ASK, extra_headers=traceparent()
    )
    assert raw.headers["x-metergate-attempts"] == "3"
    spans = collector.wait(lambda s: len(s) >= 4)
    (root,) = by_kind(spans, "SERVER")
    attempts = by_kind(spans, "CLIENT")
    assert [a["attributes"]["metergate.upstream"] for a in attempts] == [
        "down-gpt",
        "down-gpt",
        "up-gpt",
    ]
    assert [a["attributes"]["metergate.attempt"] for a in attempts] == [1, 2, 3]
    assert all(a["parent_span_id"] == root["span_id"] for a in attempts)
    for failed in attempts[:2]:
        assert failed["status"] == "ERROR"
        assert failed["attributes"]["error.type"] == "upstream_error"
        assert failed["attributes"]["gen_ai.provider.name"] == "metergate.simulated"
    assert attempts[2]["status"] == "UNSET"
    assert root["attributes"]["metergate.upstream"] == "up-gpt"
    assert root["attributes"]["metergate.attempts"] == 3
    # The attempts follow one another inside the request.
    assert attempts[0]["end"] <= attempts[1]["start"] and attempts[1]["end"] <= attempts[2]["start"]


def test_a_failed_request_is_an_error_span(gateway_factory, openai_upstream, collector):
    server, _ = openai_upstream
    gateway = gateway_factory(traced_config(server.url, collector.endpoint))
    with pytest.raises(openai.InternalServerError):
        gateway.client().chat.completions.create(
            model="gpt-4.1",
            messages=[{"role": "user", "content": "TRIGGER:500"}],
            extra_headers=traceparent(),
        )
    spans = collector.wait(lambda s: any(x["kind"] == "SERVER" for x in s))
    (root,) = by_kind(spans, "SERVER")
    assert root["status"] == "ERROR" and "upstream error 500" in root["status_message"]
    assert root["attributes"]["error.type"] == "upstream_error"
    assert root["attributes"]["metergate.outcome"] == "upstream_error"
    attempts = by_kind(spans, "CLIENT")
    assert attempts and attempts[0]["attributes"]["http.response.status_code"] == 500


def test_stream_has_a_first_token_event(gateway_factory, openai_upstream, collector):
    server, _ = openai_upstream
    gateway = gateway_factory(traced_config(server.url, collector.endpoint))
    stream = gateway.client().chat.completions.create(
        model="gpt-4.1",
        messages=ASK,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=traceparent(),
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    spans = collector.wait(lambda s: any(x["kind"] == "SERVER" for x in s))
    (root,) = by_kind(spans, "SERVER")
    (event,) = root["events"]
    assert event["name"] == "metergate.first_token"
    ttft = event["attributes"]["gen_ai.response.time_to_first_chunk"]
    assert root["attributes"]["gen_ai.response.time_to_first_chunk"] == ttft
    assert root["start"] < event["time"] <= root["end"]
    assert abs((event["time"] - root["start"]) / 1e9 - ttft) < 0.001
    assert root["attributes"]["gen_ai.request.stream"] is True
    assert root["attributes"]["gen_ai.response.model"] == "gpt-4.1-2025-04-14"
    assert root["attributes"]["gen_ai.usage.output_tokens"] == chunks[-1].usage.completion_tokens
    (attempt,) = by_kind(spans, "CLIENT")
    assert attempt["end"] <= root["end"]


def test_content_is_in_spans_only_when_enabled(gateway_factory, openai_upstream, collector):
    server, _ = openai_upstream
    gateway = gateway_factory(traced_config(server.url, collector.endpoint, capture_content=True))
    client = gateway.client()
    client.chat.completions.create(model="gpt-4.1", messages=ASK, extra_headers=traceparent())
    spans = collector.wait(lambda s: any(x["kind"] == "SERVER" for x in s))
    (root,) = by_kind(spans, "SERVER")
    sent = json.loads(root["attributes"]["gen_ai.input.messages"])
    assert sent == [{"role": "user", "parts": [{"type": "text", "content": ASK[0]["content"]}]}]
    answered = json.loads(root["attributes"]["gen_ai.output.messages"])
    assert answered[0]["role"] == "assistant" and answered[0]["finish_reason"] == "stop"
    assert answered[0]["parts"][0]["content"] == "Hello from the fake OpenAI upstream."
    # A stream's answer is assembled from its chunks.
    list(client.chat.completions.create(model="gpt-4.1", messages=ASK, stream=True))
    spans = collector.wait(lambda s: len(by_kind(s, "SERVER")) == 2)
    streamed = by_kind(spans, "SERVER")[1]
    output = json.loads(streamed["attributes"]["gen_ai.output.messages"])
    assert output[0]["parts"][0]["content"] == "Hello from the fake OpenAI upstream."


def test_captured_content_is_cut_at_max_content_bytes(gateway_factory, openai_upstream, collector):
    """A long prompt is cut inside its text, later texts are cut to nothing, and the
    attribute stays JSON that says how much is missing."""
    server, _ = openai_upstream
    config = traced_config(
        server.url, collector.endpoint, capture_content=True, max_content_bytes=1024
    )
    gateway = gateway_factory(config)
    long_ask = [
        {"role": "system", "content": "s" * 1000},
        {"role": "user", "content": "é" * 600},  # 1,200 bytes of UTF-8
        {"role": "user", "content": "and one more thing"},
    ]
    gateway.client().chat.completions.create(model="gpt-4.1", messages=long_ask)
    (root,) = by_kind(collector.wait(lambda s: any(x["kind"] == "SERVER" for x in s)), "SERVER")
    sent = json.loads(root["attributes"]["gen_ai.input.messages"])
    texts = [message["parts"][0]["content"] for message in sent]
    assert texts[0] == "s" * 1000
    assert texts[1] == "é" * 12 + "…[1176 more bytes cut]"
    assert texts[2] == "…[18 more bytes cut]"


def test_a_batch_too_big_for_the_collector_is_sent_in_parts(gateway_factory, openai_upstream):
    """Six requests with 1.2 MB prompts make one batch of 12 spans, over 7 MB with their
    content: a gRPC collector takes 4 MiB per message by default and would refuse it
    whole, the small spans with it. Sent in parts, every span arrives."""
    grpc_collector = GrpcCollector()
    try:
        server, _ = openai_upstream
        config = traced_config(
            server.url,
            grpc_collector.endpoint,
            protocol="grpc",
            capture_content=True,
            max_content_bytes=1024 * 1024,
            max_export_batch_size=12,
            export_interval_seconds=30,
        )
        # The simulated provider: the fake OpenAI server takes at most 1 MiB per body.
        config["providers"]["sim"] = {"type": "simulated"}
        config["upstreams"]["sim-gpt"] = {"provider": "sim", "model": "sim", "price": {}}
        config["models"]["big"] = {"upstreams": ["sim-gpt"]}
        gateway = gateway_factory(config)
        client = gateway.client()
        prompt = [{"role": "user", "content": "word " * 240_000}]
        for _ in range(6):
            client.chat.completions.create(model="big", messages=prompt)
        spans = grpc_collector.wait(lambda s: len(s) >= 12, timeout=60)
        assert len(by_kind(spans, "SERVER")) == 6
        cut = json.loads(by_kind(spans, "SERVER")[0]["attributes"]["gen_ai.input.messages"])
        assert cut[0]["parts"][0]["content"].endswith("…[151424 more bytes cut]")
        assert gateway.metric("metergate_trace_spans_dropped_total") == 0
    finally:
        grpc_collector.close()


def test_a_streamed_answer_is_cut_like_a_prompt() -> None:
    from metergate.tracing.answers import read_answer

    chunks = [{"choices": [{"index": 0, "delta": {"content": "abcd" * 100}}]}] * 3
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    answer = read_answer(raw + b"data: [DONE]\n\n", output_bytes=1000)
    (output,) = json.loads(answer.output or "")
    assert output["parts"][0]["content"] == ("abcd" * 250) + "…[200 more bytes cut]"
    assert output["finish_reason"] == "length" and answer.finish_reasons == ["length"]
    assert read_answer(raw, output_bytes=None).output is None


@pytest.mark.parametrize(
    ("kind", "preset", "named"),
    [
        ("openai", None, "openai"),
        ("anthropic", None, "anthropic"),
        ("gemini", None, "gcp.gemini"),
        ("vertex", None, "gcp.vertex_ai"),
        ("bedrock", None, "aws.bedrock"),
        ("azure", None, "azure.ai.openai"),
        ("openai", "mistral", "mistral_ai"),
        ("openai", "xai", "x_ai"),
        ("openai", "groq", "groq"),
        ("openai", "ollama", "ollama"),
    ],
)
def test_providers_are_named_as_the_genai_conventions_name_them(kind, preset, named) -> None:
    """A dashboard grouping by gen_ai.provider.name sees the same values as for any other
    instrumented client: `aws.bedrock`, not the config's `bedrock`; Groq, not `openai`."""
    from metergate.config.model import ProviderConfig
    from metergate.tracing.spans import provider_name

    assert provider_name(ProviderConfig.model_construct(type=kind, preset=preset)) == named


def test_export_parts_keep_order_and_bound_each_part() -> None:
    from opentelemetry.sdk.trace import ReadableSpan

    from metergate.tracing.pipeline import export_parts, span_bytes

    sizes = [10, 500, 10, 10, 2000, 10]
    spans = [ReadableSpan(name=str(i), attributes={"a": "x" * n}) for i, n in enumerate(sizes)]
    limit = span_bytes(spans[1]) + span_bytes(spans[2])
    parts = list(export_parts(spans, limit))
    assert [span.name for part in parts for span in part] == [str(i) for i in range(6)]
    assert [len(part) for part in parts] == [2, 2, 1, 1]  # 2000 is over the limit: alone
    assert all(sum(map(span_bytes, part)) <= limit for part in parts if len(part) > 1)
    assert list(export_parts(spans, 10**9)) == [spans]


def test_sampling_follows_the_caller_and_the_rate(gateway_factory, openai_upstream, collector):
    server, state = openai_upstream
    gateway = gateway_factory(traced_config(server.url, collector.endpoint, sample_rate=0.0))
    client = gateway.client()
    # The caller did not sample its trace: nothing is recorded, the flag travels upstream.
    client.chat.completions.create(
        model="gpt-4.1", messages=ASK, extra_headers=traceparent(sampled=False)
    )
    assert state.headers[-1]["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    assert state.headers[-1]["traceparent"].endswith("-00")
    # No caller context and a rate of 0: a new trace, not recorded, still propagated.
    client.chat.completions.create(model="gpt-4.1", messages=ASK)
    new_trace = state.headers[-1]["traceparent"].split("-")[1]
    assert new_trace != CALLER_TRACE and int(new_trace, 16) != 0
    # A sampled caller is recorded whatever the rate (parent-based sampling).
    client.chat.completions.create(model="gpt-4.1", messages=ASK, extra_headers=traceparent())
    spans = collector.wait(lambda s: len(s) >= 2)
    time.sleep(0.3)  # two export intervals more: nothing else may arrive
    assert {s["trace_id"] for s in collector.spans} == {CALLER_TRACE}
    assert len(collector.spans) == 2 == len(spans)


def test_a_malformed_traceparent_starts_a_new_trace(gateway_factory, openai_upstream, collector):
    server, state = openai_upstream
    gateway = gateway_factory(traced_config(server.url, collector.endpoint))
    bad = {"traceparent": f"00-{'0' * 32}-{CALLER_SPAN}-01", "tracestate": "kept=no"}
    gateway.client().chat.completions.create(model="gpt-4.1", messages=ASK, extra_headers=bad)
    spans = collector.wait(lambda s: len(s) >= 2)
    (root,) = by_kind(spans, "SERVER")
    assert root["parent_span_id"] is None and root["trace_id"] != "0" * 32
    assert state.headers[-1]["traceparent"].split("-")[1] == root["trace_id"]
    assert "tracestate" not in state.headers[-1]


def test_tracing_off_sends_nothing_upstream(gateway_factory, openai_upstream):
    server, state = openai_upstream
    config = traced_config(server.url, "http://127.0.0.1:9/v1/traces")
    config["tracing"]["enabled"] = False
    gateway = gateway_factory(config)
    gateway.client().chat.completions.create(
        model="gpt-4.1", messages=ASK, extra_headers=traceparent()
    )
    assert "traceparent" not in state.headers[-1]
    assert gateway.runtime.meter.tracing is None


def test_grpc_export(gateway_factory, openai_upstream):
    collector = GrpcCollector()
    try:
        server, _ = openai_upstream
        gateway = gateway_factory(traced_config(server.url, collector.endpoint, protocol="grpc"))
        gateway.client().chat.completions.create(
            model="gpt-4.1", messages=ASK, extra_headers=traceparent()
        )
        spans = collector.wait(lambda s: len(s) >= 2)
        (root,) = by_kind(spans, "SERVER")
        assert root["trace_id"] == CALLER_TRACE and root["name"] == "chat gpt-4.1"
    finally:
        collector.close()


def test_requests_do_not_wait_for_a_collector_that_is_down(gateway_factory, openai_upstream, bg):
    """The collector accepts connections and never answers; each export waits for its
    timeout (10 s). Requests go on at full speed, spans beyond the queue are dropped and
    counted, every request is metered, and the gateway still stops."""
    silent = SilentCollector(bg)
    server, _ = openai_upstream
    config = traced_config(
        server.url, silent.endpoint, max_queue_size=16, export_timeout_seconds=10
    )
    gateway = gateway_factory(config)
    client = gateway.client()
    started = time.monotonic()
    for _ in range(60):
        client.chat.completions.create(model="gpt-4.1", messages=ASK, extra_headers=traceparent())
    elapsed = time.monotonic() - started
    # Had a request waited for one export, the 60 would have taken at least 10 s.
    assert elapsed < 10, elapsed
    assert silent.connections >= 1
    dropped = gateway.metric("metergate_trace_spans_dropped_total")
    assert dropped >= 120 - 16 - 16  # 2 spans per request, queue 16 (one batch in flight)
    assert gateway.metric("metergate_requests_total", outcome="success") == 60
    assert len(gateway.ledger_rows()) == 60
    stop_started = time.monotonic()
    gateway.stop()
    assert time.monotonic() - stop_started < 25  # export timeout 10 s, then it gives up
    silent.close()


def test_a_collector_token_in_the_url_stays_out_of_the_log(
    gateway_factory, openai_upstream, caplog
):
    """The exporter's own warnings name the URL it failed to reach, query included."""
    server, _ = openai_upstream
    endpoint = f"http://otel:pw-canary@127.0.0.1:{free_port()}/v1/traces?token=tok-canary"
    caplog.set_level(logging.INFO)
    gateway = gateway_factory(traced_config(server.url, endpoint, export_timeout_seconds=2))
    gateway.client().chat.completions.create(model="gpt-4.1", messages=ASK)
    deadline = time.monotonic() + 20
    while not any(r.name.startswith("opentelemetry") for r in caplog.records):
        assert time.monotonic() < deadline, "the exporter never said it failed"
        time.sleep(0.05)
    said = caplog.text
    assert "canary" not in said
    assert "to http://otel:***@127.0.0.1:" in said and "/v1/traces?token=***" in said


def test_a_reload_turns_tracing_on_and_off(gateway_factory, openai_upstream, collector):
    import yaml

    server, state = openai_upstream
    config = traced_config(server.url, collector.endpoint)
    config["tracing"]["enabled"] = False
    gateway = gateway_factory(config)
    client = gateway.client()
    client.chat.completions.create(model="gpt-4.1", messages=ASK, extra_headers=traceparent())
    assert "traceparent" not in state.headers[-1]

    def apply(enabled: bool) -> None:
        config["tracing"]["enabled"] = enabled
        path = Path(gateway.runtime.source)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        assert gateway.bg.run(gateway.runtime.reload_from_source("test"))

    apply(True)
    client.chat.completions.create(model="gpt-4.1", messages=ASK, extra_headers=traceparent())
    assert state.headers[-1]["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    collector.wait(lambda s: len(s) == 2)
    apply(False)
    client.chat.completions.create(model="gpt-4.1", messages=ASK, extra_headers=traceparent())
    assert "traceparent" not in state.headers[-1]
    assert gateway.runtime.meter.tracing is None


@pytest.mark.parametrize(
    ("protocol", "extra"), [("http/protobuf", "tracing"), ("grpc", "tracing-grpc")]
)
def test_tracing_without_opentelemetry_says_what_to_install(monkeypatch, protocol, extra):
    import importlib.util

    from metergate.config import ConfigError, parse_config

    real = importlib.util.find_spec

    def without_otel(name: str, *args: Any) -> Any:
        return None if name.startswith("opentelemetry") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_otel)
    text = (
        "providers: {sim: {type: simulated}}\n"
        "upstreams: {s: {provider: sim, model: m}}\n"
        "models: {m: {upstreams: [s]}}\n"
        f"tracing: {{enabled: true, protocol: {protocol}}}\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    (problem,) = raised.value.problems
    assert problem.path == ("tracing", "enabled")
    assert f"pip install 'metergate[{extra}]'" in problem.render()
    assert parse_config(text.replace("enabled: true", "enabled: false"), "gw.yaml")
