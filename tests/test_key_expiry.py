"""Keys that stop by themselves: `expires_at` (admin API), `--expires` (CLI), a date in
the console. An expired key gets a 401 that says so; it can be given a later expiry."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.harness import Gateway, simulated_config
from tests.test_console_api import ADMIN_KEY

ASK = [{"role": "user", "content": "still valid?"}]


@pytest.fixture
def gateway(gateway_factory) -> Gateway:
    config = simulated_config(output_tokens=3)
    config["admin"] = {"api_key": ADMIN_KEY}
    return gateway_factory(config)


def admin(gateway: Gateway, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(
        method,
        gateway.base_url.removesuffix("/v1") + path,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
        **kwargs,
    )


def ask(gateway: Gateway, secret: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    return client.chat.completions.create(model="sim", messages=ASK)


def expired_error(gateway: Gateway, secret: str) -> openai.AuthenticationError:
    with pytest.raises(openai.AuthenticationError) as raised:
        ask(gateway, secret)
    assert raised.value.code == "expired_api_key"
    return raised.value


def test_a_key_stops_at_its_expiry_and_can_be_given_a_later_one(gateway):
    soon = time.time() + 2
    made = admin(gateway, "POST", "/admin/api/keys", json={"name": "trial", "expires_at": soon})
    assert made.status_code == 201, made.text
    key, secret = made.json()["key"], made.json()["secret"]
    assert (key["expires_at"], key["state"]) == (soon, "active")
    assert ask(gateway, secret).usage.completion_tokens == 3
    deadline = time.monotonic() + 15
    while True:  # it expires by itself: nobody revokes it
        try:
            ask(gateway, secret)
        except openai.AuthenticationError as error:
            assert error.code == "expired_api_key"
            assert "API key 'trial'" in error.message and "expired at" in error.message
            break
        assert time.monotonic() < deadline, "the key did not expire"
        time.sleep(0.05)
    listed = admin(gateway, "GET", "/admin/api/keys", params={"state": "expired"}).json()
    assert [k["name"] for k in listed["keys"]] == ["trial"]
    assert listed["keys"][0]["state"] == "expired"
    active = admin(gateway, "GET", "/admin/api/keys", params={"state": "active"}).json()
    assert "trial" not in [k["name"] for k in active["keys"]]
    # unlike a revoked key, an expired one may be given more time, or none at all
    later = admin(gateway, "PATCH", f"/admin/api/keys/{key['id']}", json={"expires_at": None})
    assert later.status_code == 200 and later.json()["key"]["state"] == "active"
    assert ask(gateway, secret).usage.completion_tokens == 3
    past = admin(gateway, "PATCH", f"/admin/api/keys/{key['id']}", json={"expires_at": 0})
    assert past.json()["key"]["state"] == "expired"
    expired_error(gateway, secret)
    # counted as refused, like any key the gateway turns away (never in the ledger)
    assert gateway.metric("metergate_requests_total", outcome="unauthorized") == 2
    assert all(r["outcome"] == "success" for r in gateway.ledger_rows())


@pytest.mark.parametrize("value", ["tomorrow", True, -1, 1e20, [1]])
def test_a_malformed_expiry_is_refused_naming_the_field(gateway, value):
    answer = admin(gateway, "POST", "/admin/api/keys", json={"name": "x", "expires_at": value})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "expires_at" and "epoch seconds" in error["message"]
    assert admin(gateway, "GET", "/admin/api/keys", params={"search": "x"}).json()["keys"] == []


def test_the_cli_refuses_to_make_a_key_whose_expiry_is_past(gateway: Gateway):
    """A new key born expired never works: a past date typed is a slip (last year for
    this one), so the CLI refuses it and makes no key."""
    refused = gateway.keys_cli("create", "--name", "late", "--expires", "2020-01-01", code=2)
    assert "--expires is already past (2020-01-01T00:00:00Z)" in refused
    assert admin(gateway, "GET", "/admin/api/keys", params={"search": "late"}).json()["keys"] == []


def test_the_cli_sets_lists_and_clears_an_expiry(gateway: Gateway, tmp_path: Path):
    keys = gateway.keys_cli
    created = keys("create", "--name", "contractor", "--expires", "30d")
    secret = created.strip().splitlines()[-1]
    in_30_days = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 30 * 86_400))
    assert f"expires {in_30_days}" in created
    assert in_30_days in keys("list", "--state", "active")
    assert ask(gateway, secret).usage.completion_tokens == 3
    # the running gateway follows a change made by the CLI within seconds
    assert "expired 2020-01-01 00:00 UTC" in keys("update", "contractor", "--expires", "2020-01-01")
    deadline = time.monotonic() + 15
    while True:
        try:
            ask(gateway, secret)
        except openai.AuthenticationError as error:
            assert error.code == "expired_api_key" and "2020-01-01T00:00:00Z" in error.message
            break
        assert time.monotonic() < deadline, "the gateway did not follow the CLI's change"
        time.sleep(0.1)
    assert "contractor" in keys("list", "--state", "expired")
    assert "never expires" in keys("update", "contractor", "--no-expiry")
    assert "contractor" in keys("list", "--state", "active")
    wrong = keys("update", "contractor", "--expires", "soon", code=2)
    assert "--expires takes a duration from now (30d, 12h, 90m)" in wrong
    both = keys("update", "contractor", "--expires", "1d", "--no-expiry", code=2)
    assert "give --expires or --no-expiry, not both" in both
    # every pair of options that undo each other is refused, not one of them kept
    both = keys("update", "contractor", "--tag", "a=1", "--clear-tags", code=2)
    assert "give --tag or --clear-tags, not both" in both
    nothing = keys("update", "contractor", code=2)
    assert "nothing to change" in nothing


def test_a_stale_key_still_in_use_is_logged_by_name_once_a_minute(gateway, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="metergate.auth")
    made = admin(gateway, "POST", "/admin/api/keys", json={"name": "old-svc", "expires_at": 0})
    secret = made.json()["secret"]
    for _ in range(3):
        expired_error(gateway, secret)
    lines = [r.getMessage() for r in caplog.records if r.name == "metergate.auth"]
    hint = secret[-4:]
    assert lines == [
        f"key 'old-svc' (…{hint}, expired at 1970-01-01T00:00:00Z) is still in use: "
        "1 request refused since the last report"
    ]
    monkeypatch.setattr("metergate.auth.index._REFUSALS_LOGGED_EVERY", 0.0)  # a minute on
    expired_error(gateway, secret)
    lines = [r.getMessage() for r in caplog.records if r.name == "metergate.auth"]
    assert lines[1].endswith("is still in use: 3 requests refused since the last report")
    assert secret not in caplog.text  # the secret itself is never logged
