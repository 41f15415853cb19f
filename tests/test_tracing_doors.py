"""Spans of the Anthropic Messages and OpenAI Responses doors read like a chat request's:
the prompt with its system text or instructions, and the answer's text, id (the one
its caller got), model and finish reason, whether the upstream was passed the request
as it came (and answered in its own shape) or was sent its chat translation, streamed
or not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.doors import Upstreams, anthropic_client, upstreams  # noqa: F401 - fixture
from tests.harness import BackgroundLoop, Gateway
from tests.otlp import HttpCollector

SYSTEM = "Answer in one short sentence."
ASK = "What is the capital of France?"


@pytest.fixture
def collector(bg: BackgroundLoop) -> Iterator[HttpCollector]:
    receiver = HttpCollector(bg)
    yield receiver
    receiver.close()


def traced(gateway_factory: Any, upstreams: Upstreams, endpoint: str, capture: bool) -> Gateway:  # noqa: F811
    tracing = (
        f"tracing: {{enabled: true, capture_content: {str(capture).lower()}, "
        f"export_interval_seconds: 0.05, endpoint: '{endpoint}'}}\n"
    )
    return gateway_factory(upstreams.config() + tracing)


@pytest.fixture
def gateway(gateway_factory: Any, upstreams: Upstreams, collector: HttpCollector) -> Gateway:  # noqa: F811
    return traced(gateway_factory, upstreams, collector.endpoint, capture=True)


def server_span(collector: HttpCollector) -> dict[str, Any]:
    spans = collector.wait(lambda s: any(x["kind"] == "SERVER" for x in s))
    (span,) = [s for s in spans if s["kind"] == "SERVER"]
    return span["attributes"]


def said(attributes: dict[str, Any], name: str) -> list[tuple[str, str]]:
    messages = json.loads(attributes[name])
    return [(m["role"], "".join(p["content"] for p in m["parts"])) for m in messages]


def read_alike(collector: HttpCollector, answered: str) -> dict[str, Any]:
    """The request's server span, after checking the prompt and answer it shows."""
    attributes = server_span(collector)
    assert said(attributes, "gen_ai.input.messages") == [("system", SYSTEM), ("user", ASK)]
    assert said(attributes, "gen_ai.output.messages") == [("assistant", answered)]
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]  # end_turn: chat's words
    return attributes


@pytest.mark.parametrize("stream", [False, True])
def test_a_messages_request_passed_through_to_anthropic(gateway, collector, stream):
    client = anthropic_client(gateway)
    request = {
        "model": "claude",
        "max_tokens": 64,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": ASK}],
    }
    if stream:
        with client.messages.stream(**request) as events:
            answer = events.get_final_message()
    else:
        answer = client.messages.create(**request)
    attributes = read_alike(collector, answer.content[0].text)
    assert attributes["gen_ai.response.id"] == answer.id
    assert attributes["gen_ai.response.model"] == answer.model == "claude-sonnet-4-5"
    assert attributes["gen_ai.request.max_tokens"] == 64


@pytest.mark.parametrize("model", ["gpt-native", "gpt"])  # passed through; translated
@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_request(gateway, collector, model, stream):
    client = gateway.client()
    request = {"model": model, "instructions": SYSTEM, "input": ASK, "max_output_tokens": 48}
    if stream:
        with client.responses.stream(**request) as events:
            answer = events.get_final_response()
    else:
        answer = client.responses.create(**request)
    attributes = read_alike(collector, answer.output_text)
    assert attributes["gen_ai.response.model"] == "gpt-4.1"
    assert attributes["gen_ai.request.max_tokens"] == 48
    assert attributes["gen_ai.response.id"] == answer.id  # the caller's, translated or not


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_without_content_a_stream_still_names_the_answer_its_caller_got(
    gateway_factory,
    upstreams,  # noqa: F811
    collector,
    model,
):
    """Only the first chunk is kept then: the door's, so the id is the caller's."""
    gateway = traced(gateway_factory, upstreams, collector.endpoint, capture=False)
    request = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": ASK}]}
    with anthropic_client(gateway).messages.stream(**request) as events:
        answer = events.get_final_message()
    attributes = server_span(collector)
    assert attributes["gen_ai.response.id"] == answer.id
    assert "gen_ai.output.messages" not in attributes
    assert "gen_ai.input.messages" not in attributes


@pytest.mark.parametrize(
    ("model", "upstream_operation"), [("gpt-native", "text_completion"), ("claude", "chat")]
)
def test_a_legacy_completion_is_a_text_completion(gateway, collector, model, upstream_operation):
    """The conventions' `text_completion` names the caller's request, and its attempt
    when the upstream is sent a completions request; one translated is a chat upstream."""
    gateway.client().completions.create(model=model, prompt=ASK, max_tokens=16)
    spans = collector.wait(lambda s: {x["kind"] for x in s} >= {"SERVER", "CLIENT"})
    (server,) = [s for s in spans if s["kind"] == "SERVER"]
    (client,) = [s for s in spans if s["kind"] == "CLIENT"]
    assert server["name"] == f"text_completion {model}"
    assert server["attributes"]["gen_ai.operation.name"] == "text_completion"
    assert client["attributes"]["gen_ai.operation.name"] == upstream_operation
    assert client["name"].startswith(f"{upstream_operation} ")
