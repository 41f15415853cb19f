"""One accounting path: budgets, rate limits, rollouts, fallbacks, caps and the cache apply
to /v1/messages and /v1/responses exactly as to chat completions, because every door
goes through the same pipeline."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import openai
import pytest
import yaml

from metergate.rollout import transitions
from tests.doors import Upstreams, anthropic_client, async_anthropic_client, upstreams  # noqa: F401
from tests.harness import Gateway, free_port, simulated_config

DOORS = ("messages", "responses")
REFUSED = (anthropic.RateLimitError, openai.RateLimitError)


def ask(gateway: Gateway, door: str, model: str = "sim", text: str = "guard me") -> Any:
    """One non-streamed request by `door`; the raw answer (headers and parsed body)."""
    if door == "messages":
        return anthropic_client(gateway).messages.with_raw_response.create(
            model=model, max_tokens=10, messages=[{"role": "user", "content": text}]
        )
    return gateway.client().responses.with_raw_response.create(
        model=model, input=text, max_output_tokens=10
    )


def text_of(door: str, answer: Any) -> str:
    parsed = answer.parse()
    return parsed.content[-1].text if door == "messages" else parsed.output_text


def budget_config(limit_usd: float) -> dict[str, Any]:
    config = simulated_config(output_tokens=10)
    # 1 USD per token makes every cost easy to reason about
    config["upstreams"]["sim-up"]["price"] = {"input": 1_000_000, "output": 1_000_000}
    config["budgets"] = {"cap": {"limit_usd": limit_usd, "period": "day"}}
    return config


@pytest.mark.parametrize("door", DOORS)
def test_budget(gateway_factory: Any, door: str) -> None:
    """Spend by the door counts against the budget, which then refuses every door."""
    gateway = gateway_factory(budget_config(150))
    with pytest.raises(REFUSED) as refused:
        for _ in range(30):
            ask(gateway, door)
    if door == "messages":
        assert refused.value.body["error"]["type"] == "rate_limit_error"
    else:
        assert refused.value.code == "budget_exceeded"
    assert "budget 'cap'" in refused.value.message
    assert int(refused.value.response.headers["retry-after"]) > 0
    rows = gateway.ledger_rows()
    spent = sum(row["cost_nano"] for row in rows)
    assert 0 < spent <= 150 * 10**9
    assert {row["api"] for row in rows} == {door}
    assert rows[-1]["outcome"] == "budget_exceeded" and rows[-1]["status"] == 429
    assert gateway.metric("metergate_budget_spent_usd", budget="cap") == spent / 1e9
    with pytest.raises(openai.RateLimitError):  # the same budget: chat is refused too
        gateway.client().chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}], max_tokens=100
        )


@pytest.mark.parametrize("door", DOORS)
def test_rate_limit(gateway_factory: Any, door: str) -> None:
    config = simulated_config(output_tokens=5)
    config["rate_limits"] = {"keys": {"*": {"rpm": 3}}}
    gateway = gateway_factory(config)
    gateway.client().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "x"}]
    )
    seen = [ask(gateway, door).headers for _ in range(2)]
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["1", "0"]
    with pytest.raises(REFUSED) as refused:
        ask(gateway, door)
    assert "requests per min (RPM): Limit 3" in refused.value.message
    assert refused.value.response.headers["retry-after"] == "20"
    labels = {"api": door, "outcome": "rate_limited"}
    assert gateway.metric("metergate_requests_total", **labels) == 1


def rollout_config() -> dict[str, Any]:
    return {
        "providers": {
            "good": {"type": "simulated", "simulated": {"output_tokens": 3}},
            "bad": {"type": "simulated", "simulated": {"error_rate": 1.0}},
        },
        "upstreams": {
            "base": {"provider": "good", "model": "m", "price": {"input": 1}},
            "cand": {
                "provider": "bad",
                "model": "m",
                "price": {"input": 1},
                "circuit": {"enabled": False},
            },
        },
        "models": {"m": {"upstreams": ["base"], "retry": {"max_retries": 1, "backoff_base": 0}}},
        "retry_budget": {"ratio": 1.0, "min_per_second": 100},
        "rollouts": {
            "move": {
                "model": "m",
                "baseline": ["base"],
                "candidate": ["cand"],
                "stages": [50, 100],
                "interval_seconds": 0.4,
                "failure_threshold": 2,
                "min_requests": 5,
            }
        },
    }


@pytest.mark.parametrize("door", DOORS)
async def test_rollout_judges_and_rolls_back_on_the_doors_traffic(
    gateway_factory: Any, door: str
) -> None:
    """A failing candidate, fed only this door's requests, fails its gates and is rolled
    back; its failed attempts are retried on the baseline, so no caller notices."""
    gateway = gateway_factory(rollout_config())
    rollout = gateway.runtime.plan.rollouts.rollouts["move"]
    gateway.bg.run(transitions.start(gateway.runtime.database, rollout))
    messages = async_anthropic_client(gateway)
    responses = gateway.async_client()
    served: list[str] = []
    deadline = time.monotonic() + 15

    async def caller() -> None:
        while rollout.state != "rolled_back" and time.monotonic() < deadline:
            if door == "messages":
                raw = await messages.messages.with_raw_response.create(
                    model="m", max_tokens=5, messages=[{"role": "user", "content": "go"}]
                )
            else:
                raw = await responses.responses.with_raw_response.create(model="m", input="go")
            served.append(raw.headers["x-metergate-upstream"])
            await asyncio.sleep(0.005)

    await asyncio.gather(*(caller() for _ in range(4)))
    assert rollout.state == "rolled_back"
    assert set(served) == {"base"}  # every answer: the candidate's failures were retried
    rows = gateway.ledger_rows("model = 'm'")
    assert {row["api"] for row in rows} == {door}
    assert all(row["outcome"] == "success" for row in rows)
    assert any(row["attempts"] == 2 for row in rows)
    assert (
        gateway.metric(
            "metergate_upstream_attempts_total", upstream="cand", outcome="upstream_error"
        )
        >= 5
    )


def fallback_config(upstreams: Upstreams) -> dict[str, Any]:  # noqa: F811
    """Two models whose only upstream is unreachable, falling back to translated ones."""
    config = yaml.safe_load(upstreams.config())
    dead = f"http://127.0.0.1:{free_port()}"
    config["providers"]["dead-claude"] = {"type": "anthropic", "base_url": dead, "api_key": "k"}
    config["providers"]["dead-openai"] = {
        "type": "openai",
        "base_url": f"{dead}/v1",
        "api_key": "k",
        "apis": ["responses"],
    }
    config["upstreams"]["dead-claude-up"] = {"provider": "dead-claude", "model": "claude-x"}
    config["upstreams"]["dead-gpt-up"] = {"provider": "dead-openai", "model": "gpt-4.1"}
    once = {"max_retries": 0}
    config["models"]["claude-first"] = {
        "upstreams": ["dead-claude-up"],
        "retry": once,
        "fallbacks": ["gpt"],
    }
    config["models"]["gpt-first"] = {
        "upstreams": ["dead-gpt-up"],
        "retry": once,
        "fallbacks": ["sim"],
    }
    return config


@pytest.mark.parametrize(
    ("door", "model", "backup"),
    [
        ("messages", "claude-first", "gpt-up"),
        ("responses", "gpt-first", "sim-up"),
    ],
)
def test_fallback(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
    door: str,
    model: str,
    backup: str,
) -> None:
    """The primary would get the request as it came (it speaks the door's protocol) but
    cannot be reached; the fallback model gets the chat translation, and the caller an
    answer in the door's protocol all the same."""
    gateway = gateway_factory(fallback_config(upstreams))
    answer = ask(gateway, door, model)
    assert text_of(door, answer)
    assert answer.headers["x-metergate-upstream"] == backup
    assert answer.headers["x-metergate-attempts"] == "2"
    primary = "dead-claude-up" if door == "messages" else "dead-gpt-up"
    assert (
        gateway.metric(
            "metergate_fallbacks_total", model=model, from_upstream=primary, to_upstream=backup
        )
        == 1
    )
    row = gateway.ledger_rows()[-1]
    assert (row["api"], row["model"], row["upstream"], row["attempts"]) == (door, model, backup, 2)


def test_caps_and_budget_bound_reach_native_requests(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """A model's max_tokens cap clamps a Messages request on its way to Anthropic, and a
    hard budget bounds a Responses request that named no limit (budget_max_tokens)."""
    config = (
        upstreams.config().replace(
            "  claude: {upstreams: [claude-up], retry: {max_retries: 0}}",
            "  claude: {upstreams: [claude-up], retry: {max_retries: 0}, max_tokens_cap: 7}",
        )
        + "budgets: {all: {limit_usd: 1000, period: day}}\n"
    )
    gateway = gateway_factory(config)
    anthropic_client(gateway).messages.create(
        model="claude", max_tokens=5000, messages=[{"role": "user", "content": "hi"}]
    )
    assert upstreams.claude_recorder.last.body["max_tokens"] == 7
    gateway.client().responses.create(model="gpt-native", input="hi")
    assert upstreams.openai_state.requests[-1]["max_output_tokens"] == 4096


@pytest.mark.parametrize("door", DOORS)
def test_cache(gateway_factory: Any, door: str) -> None:
    config = simulated_config(output_tokens=5)
    config["cache"] = {"enabled": True}
    gateway = gateway_factory(config)
    first, second = ask(gateway, door), ask(gateway, door)
    assert "x-metergate-cache" not in first.headers
    assert second.headers["x-metergate-cache"] == "hit"
    assert text_of(door, second) == text_of(door, first)
    rows = gateway.ledger_rows()
    assert [row["cache_hit"] for row in rows] == [0, 1]
    assert rows[1]["saved_nano"] == rows[0]["cost_nano"] > 0
    if door == "responses":  # a hit is a new response, stored as such
        hit = second.parse()
        assert hit.id != first.parse().id
        assert gateway.client().responses.retrieve(hit.id).output_text == hit.output_text
