"""The response cache and max_tokens caps."""

from __future__ import annotations

import openai
import pytest

from metergate.cache import ResponseCache
from metergate.config.model import CacheConfig
from metergate.providers.base import Usage
from tests.harness import eventually, simulated_config

ASK = [{"role": "user", "content": "cache me"}]


@pytest.fixture
def gateway(gateway_factory):
    config = simulated_config(output_tokens=8)
    config["cache"] = {"enabled": True, "ttl_seconds": 60}
    config["upstreams"]["nocache-up"] = {"provider": "sim", "model": "n"}
    config["models"]["uncached"] = {"upstreams": ["nocache-up"], "cache": False}
    return gateway_factory(config)


def test_hit_costs_nothing_and_records_the_saving(gateway):
    client = gateway.client()
    first = client.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    second = client.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert second.headers["x-metergate-cache"] == "hit"
    assert second.headers["x-metergate-cost-usd"] == "0.000000000"
    assert float(first.headers["x-metergate-cost-usd"]) > 0
    miss, hit = gateway.ledger_rows()[-2:]
    assert (miss["cache_hit"], hit["cache_hit"]) == (0, 1)
    assert hit["cost_nano"] == 0 and hit["saved_nano"] == miss["cost_nano"] > 0
    assert hit["attempts"] == 0 and hit["upstream"] == "sim-up"
    assert gateway.metric("metergate_cache_requests_total", model="sim", result="hit") == 1
    assert gateway.metric("metergate_cache_requests_total", model="sim", result="miss") == 1
    assert gateway.metric("metergate_upstream_attempts_total", upstream="sim-up") == 1


def test_no_cache_header_refreshes_and_streams_bypass(gateway):
    client = gateway.client()
    client.chat.completions.create(model="sim", messages=ASK)
    fresh = client.chat.completions.with_raw_response.create(
        model="sim", messages=ASK, extra_headers={"Cache-Control": "no-cache"}
    )
    assert "x-metergate-cache" not in fresh.headers
    list(client.chat.completions.create(model="sim", messages=ASK, stream=True))

    def attempts() -> float:
        return gateway.metric("metergate_upstream_attempts_total", upstream="sim-up")

    # a stream is metered once its last byte is sent, which the client may read first
    assert gateway.bg.run(eventually(lambda: attempts() == 3)), attempts()
    assert gateway.metric("metergate_cache_requests_total", model="sim", result="hit") == 0


def test_answers_are_not_shared_between_keys_or_uncached_models(gateway):
    client = gateway.client()
    client.chat.completions.create(model="sim", messages=ASK)
    other = openai.OpenAI(
        base_url=gateway.base_url, api_key=gateway.new_key("other"), max_retries=0
    )
    reply = other.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert "x-metergate-cache" not in reply.headers
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model="uncached", messages=ASK)
        assert "x-metergate-cache" not in raw.headers


def test_lru_and_ttl():
    cache = ResponseCache(CacheConfig(enabled=True, ttl_seconds=60, max_entries=2))
    keys = [cache.key("chat", {"n": i}, "k") for i in range(3)]
    for key in keys:
        cache.put(key, b"{}", Usage(), "u", 1)
    assert cache.get(keys[0]) is None and cache.get(keys[2]) is not None
    expired = ResponseCache(CacheConfig(enabled=True, ttl_seconds=1e-9))
    expired.put(keys[0], b"{}", Usage(), "u", 1)
    assert expired.get(keys[0]) is None
    assert cache.key("chat", {"a": 1, "b": 2}, "k") == cache.key("chat", {"b": 2, "a": 1}, "k")


@pytest.mark.parametrize(("over_cap", "asked"), [("clamp", 50), ("clamp", None)])
def test_model_cap_clamps(gateway_factory, over_cap, asked):
    config = simulated_config(output_tokens=40)
    config["models"]["sim"].update(max_tokens_cap=5, over_cap=over_cap)
    gateway = gateway_factory(config)
    options = {} if asked is None else {"max_tokens": asked}
    reply = gateway.client().chat.completions.create(model="sim", messages=ASK, **options)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"


def test_model_cap_rejects_when_configured(gateway_factory):
    config = simulated_config(output_tokens=40)
    config["models"]["sim"].update(max_tokens_cap=5, over_cap="reject")
    gateway = gateway_factory(config)
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().chat.completions.create(model="sim", messages=ASK, max_tokens=6)
    assert raised.value.code == "max_tokens_over_cap" and "at most 5" in raised.value.message
    ok = gateway.client().chat.completions.create(
        model="sim", messages=ASK, max_completion_tokens=4
    )
    assert ok.usage.completion_tokens == 4


def test_key_cap_is_the_tighter_one(gateway_factory):
    config = simulated_config(output_tokens=40)
    config["models"]["sim"]["max_tokens_cap"] = 10
    gateway = gateway_factory(config)
    assert gateway.runtime.database is not None
    from metergate.storage.keys import create_key

    secret, _ = gateway.bg.run(create_key(gateway.runtime.database, "tight", None, 3))
    gateway.bg.run(gateway.runtime.keys.reload())
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    reply = client.chat.completions.create(model="sim", messages=ASK, max_tokens=8)
    assert reply.usage.completion_tokens == 3
