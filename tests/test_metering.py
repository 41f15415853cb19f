"""Tokens, cost, ledger rows and metrics agree for every kind of request."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import pytest

from metergate.metering.pricing import UnitPrices, shipped_price_lists
from metergate.providers.base import Usage
from tests.upstreams.openai_server import API_KEY

PRICE = {"input": 2, "cached_input": 0.5, "output": 8}  # USD per million tokens


@pytest.fixture
def gateway(gateway_factory, openai_upstream):
    server, _ = openai_upstream
    return gateway_factory(
        {
            "providers": {
                "up": {"type": "openai", "base_url": f"{server.url}/v1", "api_key": API_KEY}
            },
            "upstreams": {
                "up-priced": {"provider": "up", "model": "gpt-x", "price": PRICE},
                "up-listed": {"provider": "up", "model": "gpt-4.1"},
            },
            "models": {
                "priced": {"upstreams": ["up-priced"]},
                "listed": {"upstreams": ["up-listed"]},
            },
        }
    )


def expected_nano(prompt: int, cached: int, completion: int, price: dict) -> int:
    pico = (
        (prompt - cached) * Decimal(str(price["input"]))
        + cached * Decimal(str(price["cached_input"]))
        + completion * Decimal(str(price["output"]))
    ) * 10**6
    return int((pico / 1000).to_integral_value(rounding="ROUND_HALF_UP"))


def snapshot(gateway, model: str) -> dict[str, float]:
    return {
        kind: gateway.metric("metergate_tokens_total", model=model, type=kind)
        for kind in ("input", "cached_input", "output")
    } | {"cost": gateway.metric("metergate_cost_usd_total", model=model)}


def assert_agree(gateway, model: str, before: dict, row: dict, usage, header: str | None):
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    nano = expected_nano(usage.prompt_tokens, cached, usage.completion_tokens, PRICE)
    assert row["cost_nano"] == nano
    assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]) == (
        usage.prompt_tokens - cached,
        cached,
        usage.completion_tokens,
    )
    if header is not None:
        assert header == f"{nano / 1e9:.9f}"
    after = snapshot(gateway, model)
    assert after["input"] - before["input"] == usage.prompt_tokens - cached
    assert after["cached_input"] - before["cached_input"] == cached
    assert after["output"] - before["output"] == usage.completion_tokens
    assert after["cost"] - before["cost"] == pytest.approx(nano / 1e9, abs=1e-12)


def test_non_streaming_with_cached_tokens(gateway):
    before = snapshot(gateway, "priced")
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="priced", messages=[{"role": "user", "content": "TRIGGER:cached"}]
    )
    reply = raw.parse()
    assert reply.usage.prompt_tokens_details.cached_tokens == 1024
    row = gateway.ledger_rows()[-1]
    assert row["request_id"] == raw.headers["x-request-id"]
    assert (
        row["key_name"],
        row["model"],
        row["upstream"],
        row["attempts"],
        row["outcome"],
        row["status"],
    ) == ("test", "priced", "up-priced", 1, "success", 200)
    assert_agree(gateway, "priced", before, row, reply.usage, raw.headers["x-metergate-cost-usd"])


@pytest.mark.parametrize("caller_asks", [True, False])
def test_streaming_usage_is_metered_either_way(gateway, caller_asks):
    before = snapshot(gateway, "priced")
    options = {"stream_options": {"include_usage": True}} if caller_asks else {}
    stream = gateway.client().chat.completions.create(
        model="priced",
        messages=[{"role": "user", "content": "TRIGGER:cached"}],
        stream=True,
        **options,
    )
    seen = [chunk.usage for chunk in stream if chunk.usage]
    row = gateway.ledger_rows()[-1]
    assert row["stream"] == 1 and row["ttft_ms"] is not None
    assert row["ttft_ms"] <= row["duration_ms"]
    assert len(seen) == (1 if caller_asks else 0)
    usage = openai.types.CompletionUsage(
        prompt_tokens=2000,
        completion_tokens=7,
        total_tokens=2007,
        prompt_tokens_details={"cached_tokens": 1024},
    )
    assert_agree(gateway, "priced", before, row, usage, None)
    assert gateway.metric("metergate_time_to_first_token_seconds_count", model="priced") >= 1


@pytest.mark.parametrize("door", ["chat", "chat-stream", "responses"])
def test_openai_cache_writes_are_priced_as_writes(gateway_factory, openai_upstream, door):
    """GPT-5.6 reports prompt-cache writes (`cache_write_tokens`) and bills them above
    the input price: 1,500 of 2,000 prompt tokens written cost the write rate (its
    default, 1.25x input, or the configured `cache_write`), not the plain input rate.
    Chat answers, chat streams and the Responses door (passed through) alike."""
    server, _ = openai_upstream
    provider = {"type": "openai", "base_url": f"{server.url}/v1", "api_key": API_KEY}
    gateway = gateway_factory(
        {
            "providers": {"up": {**provider, "apis": ["responses"]}},
            "upstreams": {
                "default": {"provider": "up", "model": "gpt-x", "price": PRICE},
                "set": {"provider": "up", "model": "gpt-x", "price": {**PRICE, "cache_write": 3}},
            },
            "models": {"default": {"upstreams": ["default"]}, "set": {"upstreams": ["set"]}},
        }
    )
    client = gateway.client()
    for model, write in (("default", Decimal("2.5")), ("set", Decimal(3))):
        ask = "TRIGGER:cache_write"
        if door == "responses":
            reported = client.responses.create(model=model, input=ask).usage
            assert reported.input_tokens_details.cache_write_tokens == 1500
        else:
            messages = [{"role": "user", "content": ask}]
            if door == "chat":
                client.chat.completions.create(model=model, messages=messages)
            else:
                list(client.chat.completions.create(model=model, messages=messages, stream=True))
        row = gateway.ledger_rows()[-1]
        assert (row["input_tokens"], row["cached_input_tokens"]) == (2000, 0)
        pico = 500 * Decimal(PRICE["input"]) + 1500 * write + row["output_tokens"] * PRICE["output"]
        assert row["cost_nano"] == int(pico * 10**6 / 1000)


def test_upstream_error_costs_nothing_and_is_classified(gateway):
    before = snapshot(gateway, "priced")
    with pytest.raises(openai.APIStatusError):
        gateway.client().chat.completions.create(
            model="priced", messages=[{"role": "user", "content": "TRIGGER:500"}]
        )
    row = gateway.ledger_rows()[-1]
    assert (row["outcome"], row["status"], row["cost_nano"]) == ("upstream_error", 502, 0)
    assert row["attempts"] == 3  # the default retry policy tries a 500 twice more
    assert snapshot(gateway, "priced") == before
    assert gateway.metric("metergate_requests_total", model="priced", outcome="upstream_error") == 1
    attempts = gateway.metric(
        "metergate_upstream_attempts_total", upstream="up-priced", outcome="upstream_error"
    )
    assert attempts == 3


def test_shipped_price_list_prices_an_upstream_without_price(gateway):
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="listed", messages=[{"role": "user", "content": "hi"}]
    )
    official = shipped_price_lists()["official"]["gpt-4.1"]
    nano = UnitPrices.from_price(official).cost_nano(Usage(11, 0, 7))
    assert nano == (11 * 2_000_000 + 7 * 8_000_000 + 500) // 1000
    assert raw.headers["x-metergate-cost-usd"] == f"{nano / 1e9:.9f}"
    assert (
        gateway.metric(
            "metergate_model_price_usd_per_million_tokens", upstream="up-listed", type="output"
        )
        == 8.0
    )
    assert (
        gateway.metric(
            "metergate_model_price_usd_per_million_tokens",
            upstream="up-priced",
            type="cached_input",
        )
        == 0.5
    )


def test_seed_price_lists_cover_the_write_up_models():
    lists = shipped_price_lists()
    for model in ("gpt-4.1", "claude-sonnet-4-5", "gemini-2.5-flash", "deepseek-v3.2"):
        assert model in lists["official"] and model in lists["seed-direct"]
        assert model in lists["holysheep"]
    ten_million = Usage(input_tokens=10_000_000)
    direct = UnitPrices.from_price(lists["seed-direct"]["gpt-4.1"]).cost_nano(ten_million)
    holysheep = UnitPrices.from_price(lists["holysheep"]["gpt-4.1"]).cost_nano(ten_million)
    assert (direct, holysheep) == (150 * 10**9, 80 * 10**9)


def test_cost_is_exact_integer_arithmetic():
    prices = UnitPrices.from_price(
        shipped_price_lists()["official"]["gpt-4o-mini"]
    )  # 0.15 / 0.075 / 0.60
    # 0.075 USD per million is 75_000 pico-USD per token: no float error anywhere
    assert prices.cached_input == 75_000
    assert prices.cost_nano(Usage(1, 1, 1)) == (150_000 + 75_000 + 600_000 + 500) // 1000
    total = sum(prices.cost_nano(Usage(3, 0, 0)) for _ in range(1_000_000))
    assert total == 1_000_000 * 450  # 3 tokens x 150_000 pico = 450 nano, exactly


def fallback_config(url: str, backup: str, backup_price: dict[str, Any]) -> dict[str, Any]:
    """Model `primary` on an upstream that always fails, falling back to model `backup`
    on upstream `backup` of the OpenAI test server at `url`."""
    return {
        "providers": {
            "broken": {"type": "simulated", "simulated": {"error_rate": 1.0}},
            "up": {"type": "openai", "base_url": f"{url}/v1", "api_key": API_KEY},
        },
        "upstreams": {
            "broken-up": {"provider": "broken", "model": "b", "price": {"input": 100}},
            backup: {"provider": "up", "model": "gpt-x", "price": backup_price},
        },
        "models": {
            "primary": {
                "upstreams": ["broken-up"],
                "fallbacks": ["backup"],
                "retry": {"max_retries": 0},
            },
            "backup": {"upstreams": [backup]},
        },
    }


def test_fallback_is_metered_at_the_fallback_price(gateway_factory, openai_upstream):
    server, _ = openai_upstream
    gateway = gateway_factory(fallback_config(server.url, "up-priced", PRICE))
    before = snapshot(gateway, "primary")
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-metergate-upstream"] == "up-priced"
    assert raw.headers["x-metergate-attempts"] == "2"
    row = gateway.ledger_rows()[-1]
    assert (row["model"], row["upstream"], row["attempts"]) == ("primary", "up-priced", 2)
    assert_agree(
        gateway, "primary", before, row, raw.parse().usage, raw.headers["x-metergate-cost-usd"]
    )
    assert (
        gateway.metric(
            "metergate_fallbacks_total",
            model="primary",
            from_upstream="broken-up",
            to_upstream="up-priced",
        )
        == 1
    )
    assert (
        gateway.metric(
            "metergate_upstream_attempts_total", upstream="broken-up", outcome="upstream_error"
        )
        == 1
    )


def test_a_key_is_served_by_no_fallback_outside_its_allow_list(gateway_factory, openai_upstream):
    """A key limited to `primary` is not answered by `backup`, which it may not ask for
    by name (another price, another provider); a key that may use both is."""
    server, _ = openai_upstream
    gateway = gateway_factory(fallback_config(server.url, "dear", {"input": 1000}))
    messages = [{"role": "user", "content": "hi"}]
    limited = gateway.client(api_key=gateway.new_key("limited", ["primary"]))
    with pytest.raises(openai.APIStatusError) as refused:
        limited.chat.completions.create(model="primary", messages=messages)
    assert refused.value.response.headers["x-metergate-upstream"] == "broken-up"
    assert refused.value.response.headers["x-metergate-attempts"] == "1"
    both = gateway.client(api_key=gateway.new_key("both", ["primary", "backup"]))
    raw = both.chat.completions.with_raw_response.create(model="primary", messages=messages)
    assert raw.headers["x-metergate-upstream"] == "dear"
    rows = gateway.ledger_rows()
    assert [(row["upstream"], row["outcome"]) for row in rows[-2:]] == [
        ("broken-up", "upstream_error"),
        ("dear", "success"),
    ]


TIERS = {
    "flex": {"input": 1, "output": 4},
    "priority": {"input": 4, "cached_input": 1, "output": 16},
}


@pytest.mark.parametrize("door", ["chat", "chat-stream", "responses"])
def test_a_request_is_priced_on_the_tier_the_upstream_served_it_on(
    gateway_factory, openai_upstream, door, caplog
):
    """OpenAI says in each answer which processing tier served it (`service_tier`), and
    prices flex at about half the standard rate and priority at about twice: a request is
    billed at its tier's price when the config lists one, else at the standard price,
    said once in the log."""
    server, _ = openai_upstream
    provider = {"type": "openai", "base_url": f"{server.url}/v1", "api_key": API_KEY}
    gateway = gateway_factory(
        {
            "providers": {"up": {**provider, "apis": ["responses"]}},
            "upstreams": {
                "tiered": {"provider": "up", "model": "gpt-x", "price": {**PRICE, **TIERS}},
                "plain": {"provider": "up", "model": "gpt-x", "price": PRICE},
            },
            "models": {"tiered": {"upstreams": ["tiered"]}, "plain": {"upstreams": ["plain"]}},
        }
    )
    client = gateway.client()

    def ask(model: str, tier: str | None) -> dict:
        extra = {} if tier is None else {"service_tier": tier}
        if door == "responses":
            client.responses.create(model=model, input="hi", **extra)
        else:
            messages = [{"role": "user", "content": "hi"}]
            stream = door == "chat-stream"
            answer = client.chat.completions.create(
                model=model, messages=messages, stream=stream, **extra
            )
            if stream:
                list(answer)
        return gateway.ledger_rows()[-1]

    for tier, price in ((None, PRICE), ("auto", PRICE), *TIERS.items()):
        row = ask("tiered", tier)
        pico = row["input_tokens"] * Decimal(str(price["input"])) + row["output_tokens"] * Decimal(
            str(price["output"])
        )
        assert row["cost_nano"] == int(pico * 10**6 / 1000), tier
        assert row["cost_nano"] > 0
    row = ask("plain", "priority")  # no priority price: the standard one, and a warning
    standard = row["input_tokens"] * PRICE["input"] + row["output_tokens"] * PRICE["output"]
    assert row["cost_nano"] == standard * 10**3
    ask("plain", "priority")
    warned = [r.getMessage() for r in caplog.records if "'priority' tier" in r.getMessage()]
    assert warned == [
        "upstream 'plain' served a request on its 'priority' tier, which its price does not "
        "list: billed at the standard price; set its price.priority"
    ]


def test_budgets_hold_a_requests_worst_case_at_its_dearest_tier(gateway_factory, openai_upstream):
    """A deployment whose price lists a priority tier may bill at it (a project can make
    priority its default): a hard budget holds the worst case at that price."""
    server, _ = openai_upstream
    provider = {"type": "openai", "base_url": f"{server.url}/v1", "api_key": API_KEY}
    budget = {"limit_usd": 0.012, "scope": "model", "hard": True}
    gateway = gateway_factory(
        {
            "providers": {"up": provider},
            "upstreams": {
                "tiered": {"provider": "up", "model": "gpt-x", "price": {**PRICE, **TIERS}},
                "plain": {"provider": "up", "model": "gpt-x", "price": PRICE},
            },
            "models": {"tiered": {"upstreams": ["tiered"]}, "plain": {"upstreams": ["plain"]}},
            "budgets": {
                "tiered-cap": {**budget, "target": "tiered"},
                "plain-cap": {**budget, "target": "plain"},
            },
        }
    )
    client = gateway.client()
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    assert client.chat.completions.create(model="plain", **ask).usage  # worst case < $0.009
    with pytest.raises(openai.RateLimitError, match=r"may cost up to \$0\.016"):
        client.chat.completions.create(model="tiered", **ask)  # worst case > $0.016


def test_a_stream_cut_before_its_usage_is_estimated_on_the_tier_its_chunks_named(
    gateway_factory, openai_upstream
):
    """A stream that ends before its usage chunk is billed an estimate; OpenAI names the
    tier in every chunk, so the estimate is priced on it (priority here costs exactly
    twice the standard price per token)."""
    server, _ = openai_upstream
    provider = {"type": "openai", "base_url": f"{server.url}/v1", "api_key": API_KEY}
    gateway = gateway_factory(
        {
            "providers": {"up": provider},
            "upstreams": {"up": {"provider": "up", "model": "gpt-x", "price": {**PRICE, **TIERS}}},
            "models": {"m": {"upstreams": ["up"], "retry": {"max_retries": 0}}},
        }
    )
    client = gateway.client()
    costs = {}
    for tier in (None, "priority"):
        extra = {} if tier is None else {"service_tier": tier}
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "TRIGGER:cut"}], stream=True, **extra
        )
        with pytest.raises(openai.APIError, match="ended before"):
            list(stream)
        row = gateway.ledger_rows()[-1]
        assert (row["usage_estimated"], row["outcome"]) == (1, "upstream_error")
        costs[tier] = row["cost_nano"]
    assert costs[None] > 0
    assert abs(costs["priority"] - 2 * costs[None]) <= 1
