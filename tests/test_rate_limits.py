"""Rate limits in one process (no Redis): RPM and TPM per key and per model, OpenAI's
errors and `x-ratelimit-*` headers, and the GCRA arithmetic behind them."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from metergate.config import ConfigError, parse_config
from metergate.limits.rate import MINUTE_US, Bucket, judge, openai_duration
from metergate.metering.report import usage_summary
from tests.harness import simulated_config

ASK = [{"role": "user", "content": "limit me"}]


def limited_config(rate_limits: dict, **simulated: object) -> dict:
    config = simulated_config(**{"output_tokens": 10, **simulated})
    config["rate_limits"] = rate_limits
    return config


def seconds(duration: str) -> float:
    """Parse OpenAI's reset format ("120ms", "8.64s", "6m0s", "1h0m0s") back to seconds."""
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1000
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", duration)
    assert match and duration, duration
    hours, minutes, secs = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs or 0)


def test_rpm_per_key_headers_and_refusal(gateway_factory):
    gateway = gateway_factory(limited_config({"keys": {"*": {"rpm": 3}}}))
    client = gateway.client()
    seen = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="sim", messages=ASK)
        seen.append(raw.headers)
    assert [h["x-ratelimit-limit-requests"] for h in seen] == ["3", "3", "3"]
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    # 20 s refill per request: the bucket is full again 20 s after the first request,
    # 40 s after the second, 60 s after the third (less the time between them)
    resets = [seconds(h["x-ratelimit-reset-requests"]) for h in seen]
    for reset, full in zip(resets, (20, 40, 60), strict=True):
        assert full - 2 < reset <= full
    assert "x-ratelimit-limit-tokens" not in seen[0]  # no TPM configured
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="sim", messages=ASK)
    error = raised.value
    assert error.type == "rate_limit_error" and error.code == "rate_limit_exceeded"
    assert "key 'test'" in error.message and "requests per min (RPM): Limit 3" in error.message
    headers = error.response.headers
    retry_ms = int(headers["retry-after-ms"])
    assert 18_000 < retry_ms <= 20_000 and headers["retry-after"] == "20"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert gateway.metric("metergate_requests_total", outcome="rate_limited") == 1
    last = gateway.ledger_rows()[-1]
    assert (last["outcome"], last["status"], last["upstream"]) == ("rate_limited", 429, "none")


def test_stream_carries_the_headers(gateway_factory):
    gateway = gateway_factory(limited_config({"keys": {"*": {"rpm": 5, "tpm": 10_000}}}))
    with gateway.client().chat.completions.with_streaming_response.create(
        model="sim", messages=ASK, stream=True
    ) as raw:
        assert raw.headers["x-ratelimit-remaining-requests"] == "4"
        assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
        assert list(raw.iter_lines())


def test_named_keys_override_star_field_by_field(gateway_factory):
    rate_limits = {
        "keys": {
            "*": {"rpm": 2, "tpm": 100_000},
            "vip": {"rpm": None},  # lifts the RPM limit, keeps the TPM one
            "slow": {"rpm": 1},  # tighter RPM, TPM inherited
        }
    }
    gateway = gateway_factory(limited_config(rate_limits))
    vip = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.new_key("vip"), max_retries=0)
    for _ in range(5):
        raw = vip.chat.completions.with_raw_response.create(model="sim", messages=ASK)
        assert "x-ratelimit-limit-requests" not in raw.headers
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    slow = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.new_key("slow"), max_retries=0)
    raw = slow.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    with pytest.raises(openai.RateLimitError, match="key 'slow'"):
        slow.chat.completions.create(model="sim", messages=ASK)
    default = gateway.client()  # key "test": the `*` entry, each key on its own bucket
    for _ in range(2):
        default.chat.completions.create(model="sim", messages=ASK)
    with pytest.raises(openai.RateLimitError, match=r"key 'test'.*Limit 2"):
        default.chat.completions.create(model="sim", messages=ASK)


def test_model_limit_is_shared_by_all_keys(gateway_factory):
    gateway = gateway_factory(limited_config({"models": {"sim": {"rpm": 3}}}))
    first = gateway.client()
    other = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.new_key("b"), max_retries=0)
    first.chat.completions.create(model="sim", messages=ASK)
    first.chat.completions.create(model="sim", messages=ASK)
    raw = other.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    for client in (first, other):
        with pytest.raises(openai.RateLimitError, match="model 'sim' on requests per min"):
            client.chat.completions.create(model="sim", messages=ASK)


def test_tpm_debt_blocks_until_repaid(gateway_factory):
    # 6000 tokens a minute = 100 a second; one answer of ~6100 tokens puts the bucket
    # about a second into debt, which must block the next request for exactly that long
    gateway = gateway_factory(limited_config({"keys": {"*": {"tpm": 6000}}}, output_tokens=6100))
    client = gateway.client()
    first = client.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert first.headers["x-ratelimit-remaining-tokens"] == "6000"  # admitted on a full bucket
    used = first.parse().usage.total_tokens
    assert used > 6000
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="sim", messages=ASK)
    error = raised.value
    assert "tokens per min (TPM): Limit 6000" in error.message
    retry_ms = int(error.response.headers["retry-after-ms"])
    debt_ms = (used - 6000) * 10  # 10 ms per token
    assert debt_ms - 500 < retry_ms <= debt_ms + 20
    time.sleep(retry_ms / 1000 + 0.05)
    assert client.chat.completions.create(model="sim", messages=ASK).usage.total_tokens == used


def test_gcra_admits_a_full_burst_then_one_per_interval():
    rpm = Bucket("key", "k", "requests", 60)  # one a second, a burst of 60
    now, tat = 1_000_000_000.0, 0.0
    for i in range(60):
        verdict = judge(rpm, tat, now)
        assert verdict.admitted and verdict.remaining == 59 - i
        tat = verdict.tat
    refused = judge(rpm, tat, now)
    assert not refused.admitted and refused.retry_us == 1_000_000
    assert refused.reset_us == MINUTE_US  # empty: a full minute to refill completely
    assert judge(rpm, tat, now + 999_999).admitted is False
    assert judge(rpm, tat, now + 1_000_000).admitted is True


def test_gcra_tokens_admit_until_in_debt():
    tpm = Bucket("model", "m", "tokens", 600)  # 10 a second, 0.1 s per token
    now = 5_000_000.0
    assert judge(tpm, 0.0, now).remaining == 600
    in_debt = now + MINUTE_US + 50 * 100_000  # 50 tokens over
    refused = judge(tpm, in_debt, now)
    assert not refused.admitted and refused.retry_us == 50 * 100_000 + 1
    assert judge(tpm, in_debt, now + refused.retry_us).admitted


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (0, "0s"),
        (400, "1ms"),
        (120_000, "120ms"),
        (1_000_000, "1s"),
        (8_640_000, "8.64s"),
        (86_400_000, "1m26.4s"),
        (360_000_000, "6m0s"),
        (3_600_000_000, "1h0m0s"),
    ],
)
def test_durations_are_written_like_openai(us, text):
    assert openai_duration(us) == text
    assert seconds(text) == pytest.approx(max(us, 1000 if us else 0) / 1e6, abs=1e-3)


def test_rate_limits_config_is_checked():
    base = (
        "providers: {sim: {type: simulated}}\n"
        "upstreams: {u: {provider: sim, model: m}}\n"
        "models: {sim: {upstreams: [u]}}\n"
    )
    ok = parse_config(base + "rate_limits: {models: {'*': {rpm: 5}, sim: {tpm: 9}}}\n")
    assert ok.rate_limits.models["sim"].tpm == 9
    with pytest.raises(ConfigError, match=r"rate_limits\.models\.nope: unknown model 'nope'"):
        parse_config(base + "rate_limits: {models: {nope: {rpm: 5}}}\n")
    with pytest.raises(ConfigError, match=r"rate_limits\.keys\.a\.rpm: Input should be greater"):
        parse_config(base + "rate_limits: {keys: {a: {rpm: 0}}}\n")
    with pytest.raises(ConfigError, match=r"redis.url: .*must be redis://"):
        parse_config(base + "redis: {url: 'http://127.0.0.1:6379'}\n")


ADMIN = "admin-secret-0123456789abcdef"


def test_a_key_has_its_own_rpm_and_tpm(gateway_factory):
    """A key's own limits (its plan) replace `keys."*"` for it; a named entry in the
    config still wins; with no key limits in the config at all, a key's own still apply;
    clearing them gives the config's back."""
    config = limited_config({"keys": {"*": {"rpm": 2}, "pinned": {"rpm": 1}}})
    config["admin"] = {"api_key": ADMIN}
    gateway = gateway_factory(config)
    base = gateway.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {ADMIN}"}

    def create(name: str, **fields: object) -> tuple[str, openai.OpenAI]:
        made = httpx.post(f"{base}/admin/api/keys", headers=headers, json={"name": name, **fields})
        assert made.status_code == 201, made.text
        secret = made.json()["secret"]
        return made.json()["key"]["id"], openai.OpenAI(
            base_url=gateway.base_url, api_key=secret, max_retries=0
        )

    def admitted(client: openai.OpenAI, most: int = 10) -> int:
        for count in range(most):
            try:
                client.chat.completions.create(model="sim", messages=ASK)
            except openai.RateLimitError as error:
                assert error.code == "rate_limit_exceeded"
                return count
        return most

    pro_id, pro = create("pro", rpm=5)
    assert admitted(pro) == 5  # its own 5, not the default 2
    _, pinned = create("pinned", rpm=5)
    assert admitted(pinned) == 1  # the config names it: the config wins
    assert admitted(create("basic")[1]) == 2
    changed = httpx.patch(
        f"{base}/admin/api/keys/{pro_id}", headers=headers, json={"rpm": None, "tpm": 50}
    )
    assert changed.status_code == 200 and changed.json()["key"]["tpm"] == 50
    raw = pro.chat.completions.with_raw_response.create  # now the default rpm, its own tpm
    with pytest.raises(openai.RateLimitError):
        raw(model="sim", messages=ASK)  # its 5 of this minute are used; 2 is the limit
    for bad in ({"rpm": 0}, {"tpm": 1.5}, {"rpm": "10"}):
        refused = httpx.patch(f"{base}/admin/api/keys/{pro_id}", headers=headers, json=bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] in bad


def test_a_keys_own_rpm_applies_without_any_config_limit(gateway_factory):
    config = simulated_config(output_tokens=10)
    config["admin"] = {"api_key": ADMIN}
    gateway = gateway_factory(config)
    base = gateway.base_url.removesuffix("/v1")
    made = httpx.post(
        f"{base}/admin/api/keys",
        headers={"Authorization": f"Bearer {ADMIN}"},
        json={"name": "trial", "rpm": 1, "tpm": 1000},
    )
    client = openai.OpenAI(base_url=gateway.base_url, api_key=made.json()["secret"], max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
    with pytest.raises(openai.RateLimitError, match="key 'trial'"):
        client.chat.completions.create(model="sim", messages=ASK)
    for _ in range(3):  # other keys are not limited at all
        gateway.client().chat.completions.create(model="sim", messages=ASK)


def test_the_cli_sets_and_clears_a_keys_own_rates(gateway_factory):
    gateway = gateway_factory(simulated_config(output_tokens=10))
    keys = gateway.keys_cli

    secret = keys("create", "--name", "cli-trial", "--rpm", "1").split()[-1]
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    client.chat.completions.create(model="sim", messages=ASK)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="sim", messages=ASK)
    assert "rate limits 5 rpm 900 tpm" in keys("update", "cli-trial", "--rpm", "5", "--tpm", "900")
    assert "rate limits as configured" in keys("update", "cli-trial", "--rpm", "0", "--tpm", "0")


def test_a_providers_429_is_an_error_the_gateways_own_a_refusal(gateway_factory):
    """Both answer the caller 429. The gateway's own limit refuses the caller (`rate_limited`,
    left out of the error rate); a provider's 429 that retries could not get past is a
    failure of the service (`upstream_rejected`), which reports and alerts count."""
    config = limited_config({"keys": {"*": {"rpm": 1}}}, error_rate=1.0, error_kind="rate_limited")
    config["models"]["sim"]["retry"] = {"max_retries": 0}
    gateway = gateway_factory(config)
    client = gateway.client()
    with pytest.raises(openai.RateLimitError, match="simulated upstream rate limit"):
        client.chat.completions.create(model="sim", messages=ASK)
    with pytest.raises(openai.RateLimitError, match="key 'test'"):
        client.chat.completions.create(model="sim", messages=ASK)
    rows = gateway.ledger_rows()
    assert [(r["outcome"], r["status"]) for r in rows] == [
        ("upstream_rejected", 429),
        ("rate_limited", 429),
    ]
    assert gateway.runtime.database is not None
    *_, total = gateway.bg.run(
        usage_summary(gateway.runtime.database, "model", rows[0]["ts"] - 1, time.time() + 1)
    )
    assert (total.requests, total.errors, total.refused) == (2, 1, 1)
