"""POST /v1/completions (legacy text completions) through a served gateway, driven by the
official `openai` SDK: passed through to an OpenAI server that has the API, translated
to chat for every other upstream, streamed or not."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.doors import Upstreams, ledger_row, upstreams  # noqa: F401 - fixture
from tests.harness import Gateway
from tests.upstreams import ANSWER, responses_api


@pytest.fixture
def gateway(gateway_factory: Any, upstreams: Upstreams) -> Gateway:  # noqa: F811
    return gateway_factory(upstreams.config())


def test_translated_for_chat_upstreams(gateway: Gateway, upstreams: Upstreams) -> None:  # noqa: F811
    client = gateway.client()
    raw = client.completions.with_raw_response.create(
        model="gpt", prompt="Say hello", max_tokens=20, temperature=0.2, stop=["\n"]
    )
    completion = raw.parse()
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == "Hello from the fake OpenAI upstream."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 7
    assert upstreams.openai_state.requests[-1] == {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_completion_tokens": 20,
        "temperature": 0.2,
        "stop": ["\n"],
    }
    row = ledger_row(gateway, f"request_id = '{raw.headers['x-request-id']}'")
    assert (row["api"], row["model"], row["output_tokens"]) == ("completions", "gpt", 7)
    claude = client.completions.create(model="claude", prompt="Say hello", max_tokens=50)
    assert claude.choices[0].text == ANSWER
    assert upstreams.claude_recorder.last.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Say hello"}]}
    ]


def test_max_tokens_defaults_to_16(gateway_factory: Any) -> None:
    gateway = gateway_factory(
        {
            "providers": {"sim": {"type": "simulated", "simulated": {"output_tokens": 40}}},
            "upstreams": {"sim-up": {"provider": "sim", "model": "m"}},
            "models": {"sim": {"upstreams": ["sim-up"]}},
        }
    )
    completion = gateway.client().completions.create(model="sim", prompt="Go on")
    assert completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"


def test_streamed_translation(gateway: Gateway) -> None:
    client = gateway.client()
    unary = client.completions.create(model="sim", prompt="Stream me")
    chunks = list(
        client.completions.create(
            model="sim", prompt="Stream me", stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == unary.choices[0].text and len(chunks) > 3
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}


def test_passed_through_to_an_openai_upstream(
    gateway: Gateway,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    client = gateway.client()
    body: dict[str, Any] = {"prompt": "Say hello", "max_tokens": 30, "echo": True, "suffix": "!"}
    completion = client.completions.create(model="gpt-native", **body)
    assert upstreams.openai_state.requests[-1] == {**body, "model": "gpt-4.1"}
    assert completion.choices[0].text == responses_api.COMPLETION
    chunks = list(client.completions.create(model="gpt-native", prompt="Say hello", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == responses_api.COMPLETION
    assert all(chunk.usage is None for chunk in chunks), "usage not asked for, not relayed"
    sent = upstreams.openai_state.requests[-1]
    assert sent["stream_options"] == {"include_usage": True}  # asked for the ledger's sake
    row = ledger_row(gateway, "stream = 1")
    assert (row["api"], row["input_tokens"], row["output_tokens"]) == ("completions", 5, 7)


def test_what_chat_cannot_express_is_refused(gateway: Gateway) -> None:
    client = gateway.client()
    for options in ({"echo": True}, {"suffix": "!"}, {"best_of": 2}, {"logprobs": 2}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="sim", prompt="hi", **options)
        assert next(iter(options)) in refused.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="sim", prompt=["one", "two"])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="sim", prompt=[1, 2, 3])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_integers_are_checked_as_the_chat_door_checks_them(
    gateway: Gateway, options: dict[str, Any], named: str
) -> None:
    """`n: 0` was answered 200 here while chat refuses it: the same 400, naming the field."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().completions.create(model="sim", prompt="hi", **options)
    assert refused.value.body["param"] == named
    assert f"`{named}` must be" in refused.value.message
