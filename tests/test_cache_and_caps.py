"""The response cache and max_tokens caps."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from metergate.cache import ResponseCache
from metergate.cache.response_cache import ENTRY_OVERHEAD
from metergate.config.model import CacheConfig
from metergate.providers.base import Usage
from tests.harness import eventually, simulated_config
from tests.upstreams import openai_server

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


def test_the_lru_holds_at_most_max_mb_of_answers():
    cache = ResponseCache(CacheConfig(enabled=True, max_mb=0.01))  # 10 KiB
    keys = [cache.key("chat", {"n": i}, "k") for i in range(5)]
    for key in keys[:3]:
        cache.put(key, b"x" * 3000, Usage(), "u", 1)
    assert len(cache) == 3
    cache.get(keys[0])  # used: the least recently used is now keys[1]
    cache.put(keys[3], b"y" * 3000, Usage(), "u", 1)
    assert cache.get(keys[1]) is None and len(cache) == 3
    assert cache.bytes <= cache.max_bytes
    cache.put(keys[3], b"z" * 3000, Usage(), "u", 1)  # stored again: counted once
    assert len(cache) == 3 and cache.get(keys[0]) is not None
    cache.put(keys[4], b"w" * 20_000, Usage(), "u", 1)  # bigger than the whole cache
    assert cache.get(keys[4]) is None and len(cache) == 3
    cache.put(keys[3], b"w" * 20_000, Usage(), "u", 1)  # a newer answer too big to keep:
    assert cache.get(keys[3]) is None and len(cache) == 2  # the older one goes too
    held = sum(len(entry.body) + ENTRY_OVERHEAD for entry in cache._entries.values())
    assert cache.bytes == held


def test_a_big_answer_is_served_but_not_stored(gateway_factory):
    config = simulated_config(output_tokens=8)
    config["cache"] = {"enabled": True, "max_entry_kb": 64}
    gateway = gateway_factory(config)
    client = gateway.client()

    def embed(dimensions: int) -> str | None:
        raw = client.embeddings.with_raw_response.create(
            model="sim", input=["a", "b", "c"], dimensions=dimensions, encoding_format="float"
        )
        assert len(raw.parse().data[0].embedding) == dimensions
        return raw.headers.get("x-metergate-cache")

    assert [embed(16), embed(16)] == [None, "hit"]
    assert [embed(4096), embed(4096)] == [None, None]  # three vectors of 4096: > 64 KiB
    assert gateway.metric("metergate_upstream_attempts_total", upstream="sim-up") == 3


def test_cache_control_directives_ignore_case(gateway):
    client = gateway.client()
    client.chat.completions.create(model="sim", messages=ASK)
    for control in ("No-Cache", "NO-STORE"):
        raw = client.chat.completions.with_raw_response.create(
            model="sim", messages=ASK, extra_headers={"Cache-Control": control}
        )
        assert "x-metergate-cache" not in raw.headers, control
    assert gateway.metric("metergate_upstream_attempts_total", upstream="sim-up") == 3


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


def test_a_reload_that_changes_a_models_upstreams_or_prices_serves_no_older_answer(
    gateway_factory,
):
    """Cached answers depend on the model's upstreams and prices: after a reload that
    changes either, the same request is answered fresh (by the new upstream, at the new
    price), not from an answer of the old config; a reload that changes nothing else of
    the model keeps its answers."""
    import httpx
    import yaml

    config = simulated_config(output_tokens=8)
    config["cache"] = {"enabled": True, "ttl_seconds": 300}
    config["admin"] = {"api_key": "admin-secret-0123456789abcdef"}
    config["upstreams"]["other-up"] = {"provider": "sim", "model": "other"}
    gateway = gateway_factory(config)
    client = gateway.client()
    base = gateway.base_url.removesuffix("/v1")

    def reload_with(change) -> None:
        source = Path(gateway.runtime.source)
        raw = yaml.safe_load(source.read_text())
        change(raw)
        source.write_text(yaml.safe_dump(raw, sort_keys=False))
        answer = httpx.post(
            f"{base}/admin/reload",
            headers={"Authorization": "Bearer admin-secret-0123456789abcdef"},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.json()["applied"], answer.text

    def ask():
        return client.chat.completions.with_raw_response.create(model="sim", messages=ASK)

    assert "x-metergate-cache" not in ask().headers
    assert ask().headers["x-metergate-cache"] == "hit"
    reload_with(lambda c: c["models"].update(other={"upstreams": ["other-up"]}))
    assert ask().headers["x-metergate-cache"] == "hit"  # nothing of `sim` changed
    reload_with(lambda c: c["models"]["sim"].update(upstreams=["other-up"]))
    moved = ask()
    assert "x-metergate-cache" not in moved.headers
    assert moved.headers["x-metergate-upstream"] == "other-up"
    reload_with(lambda c: c["upstreams"]["other-up"].update(price={"input": 7, "output": 9}))
    repriced = ask()
    assert "x-metergate-cache" not in repriced.headers
    assert float(repriced.headers["x-metergate-cost-usd"]) > 0


def test_both_output_limits_are_capped_and_held_by_the_larger(gateway_factory, openai_upstream):
    """A request may set `max_completion_tokens` and `max_tokens` together, and upstreams
    differ in which they read (DeepSeek reads `max_tokens` alone): the cap brings both
    down, `over_cap: reject` refuses by the larger, and a hard budget holds the larger."""
    server, state = openai_upstream
    provider = {"type": "openai", "base_url": f"{server.url}/v1", "api_key": openai_server.API_KEY}
    price = {"input": 1, "output": 10}
    config = {
        "providers": {"up": provider},
        "upstreams": {"up": {"provider": "up", "model": "gpt-x", "price": price}},
        "models": {
            "capped": {"upstreams": ["up"], "max_tokens_cap": 50},
            "strict": {"upstreams": ["up"], "max_tokens_cap": 50, "over_cap": "reject"},
            "held": {"upstreams": ["up"]},
        },
        # 5,000 output tokens at $10 a million are $0.05: over the limit, 10 are not
        "budgets": {"tight": {"scope": "model", "target": "held", "limit_usd": 0.01, "hard": True}},
    }
    client = gateway_factory(config).client()
    both = {"max_completion_tokens": 10, "max_tokens": 5000}
    client.chat.completions.create(model="capped", messages=ASK, **both)
    sent = state.requests[-1]
    assert (sent["max_completion_tokens"], sent["max_tokens"]) == (10, 50)
    with pytest.raises(openai.BadRequestError, match="max_tokens 5000 is above"):
        client.chat.completions.create(model="strict", messages=ASK, **both)
    client.chat.completions.create(model="held", messages=ASK, max_completion_tokens=10)
    with pytest.raises(openai.RateLimitError, match="budget 'tight'"):
        client.chat.completions.create(model="held", messages=ASK, **both)
