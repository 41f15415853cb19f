"""The admin API behind the console: auth, sign-in limits, headers, every endpoint's data.

Numbers are checked against the ledger rows themselves (or against rows the test wrote
with known values), never against the code that computes them.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema_rs
import openai
import pytest
from openapi_spec_validator import validate
from prometheus_client import Gauge, Histogram

from metergate.console import mcp as mcp_page
from metergate.console import upstreams as upstreams_page
from metergate.console.mcp import McpView, quantile
from metergate.console.security import FailedSignIns
from metergate.metering.hourly import sum_statements
from metergate.metering.ledger import COLUMNS as LEDGER_COLUMNS
from metergate.metering.ledger import LedgerRow, LedgerWriter
from metergate.metering.report import month_forecast
from metergate.storage.database import open_database
from tests.harness import Gateway

ADMIN_KEY = "console-admin-key-0123456789abcdef"
ASK = [{"role": "user", "content": "console"}]
GET_ENDPOINTS = (
    "/admin/api/session",
    "/admin/api/overview",
    "/admin/api/upstreams",
    "/admin/api/keys",
    "/admin/api/rollouts",
    "/admin/api/mcp",
    "/admin/api/requests",
    "/admin/api/requests.csv",
)


def console_config(**extra: Any) -> dict[str, Any]:
    """Four simulated upstreams: a healthy one, a flaky one (half its calls fail), one
    that always fails (its circuit opens after two), and two for a rollout."""
    sim = {"latency_ms": 5, "tokens_per_second": 0, "output_tokens": 12}
    config: dict[str, Any] = {
        "providers": {
            "sim": {"type": "simulated", "simulated": sim},
            "sim-next": {"type": "simulated", "simulated": {**sim, "latency_ms": 8}},
            "flaky": {"type": "simulated", "simulated": {**sim, "error_rate": 0.5, "seed": 7}},
            "down": {"type": "simulated", "simulated": {**sim, "error_rate": 1.0}},
        },
        "upstreams": {
            "fast": {"provider": "sim", "model": "fast-1", "price": {"input": 2, "output": 8}},
            "shaky": {
                "provider": "flaky",
                "model": "shaky-1",
                "price": {"input": 1, "output": 4},
                "circuit": {"enabled": False},
            },
            "broken": {
                "provider": "down",
                "model": "broken-1",
                "price": {"input": 1, "output": 4},
                "circuit": {"failure_threshold": 2, "open_seconds": 60},
            },
            "old": {"provider": "sim", "model": "old-1", "price": {"input": 1, "output": 2}},
            "new": {"provider": "sim-next", "model": "new-1", "price": {"input": 1, "output": 2}},
        },
        "models": {
            "chat": {"upstreams": ["fast"]},
            "flaky": {
                "upstreams": ["shaky"],
                "retry": {"max_retries": 1, "backoff_base": 0.001, "backoff_max": 0.001},
            },
            "resilient": {
                "upstreams": ["shaky"],
                "retry": {"max_retries": 0},
                "fallbacks": ["chat"],
            },
            "broken": {"upstreams": ["broken"], "retry": {"max_retries": 0}},
            "moving": {"upstreams": ["old"]},
        },
        "retry_budget": {"ratio": 1.0, "min_per_second": 100},
        "rollouts": {
            "move": {
                "model": "moving",
                "baseline": ["old"],
                "candidate": ["new"],
                "stages": [10, 50, 100],
                "interval_seconds": 300,
                "min_requests": 5,
            }
        },
        "budgets": {
            "everything": {"limit_usd": 1000, "hard": False},
            "test-daily": {
                "scope": "key",
                "target": "test",
                "period": "day",
                "limit_usd": 0.0002,
                "hard": False,
            },
        },
        "admin": {"api_key": ADMIN_KEY},
    }
    config.update(extra)
    return config


def base(gateway: Gateway) -> str:
    return gateway.base_url.removesuffix("/v1")


def admin(
    gateway: Gateway, path: str, method: str = "GET", key: str = ADMIN_KEY, **kwargs: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, base(gateway) + path, headers=headers, timeout=10, **kwargs)


def send_traffic(gateway: Gateway, chat: int = 8, streams: int = 4, flaky: int = 12) -> None:
    """Successes, streams (for time to first token), failures, retries, fallbacks and an
    opened circuit, all through the openai SDK."""
    client = gateway.client()
    for i in range(chat):
        client.chat.completions.create(
            model="chat", messages=[*ASK, {"role": "user", "content": str(i)}]
        )
    for _ in range(streams):
        for _chunk in client.chat.completions.create(model="chat", messages=ASK, stream=True):
            pass
    for i in range(flaky):
        for model in ("flaky", "resilient"):
            with contextlib.suppress(openai.APIStatusError):  # half of them fail
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": str(i)}]
                )
    for _ in range(3):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="broken", messages=ASK)
    for _ in range(3):
        client.chat.completions.create(model="moving", messages=ASK)
    gateway.flush_ledger()


def insert_rows(gateway: Gateway, rows: list[dict[str, Any]]) -> None:
    """Write ledger rows with chosen values (defaults for the rest)."""
    defaults = {
        "request_id": "req",
        "key_name": "test",
        "model": "chat",
        "upstream": "fast",
        "attempts": 1,
        "input_tokens": 1,
        "cached_input_tokens": 0,
        "output_tokens": 1,
        "cost_nano": 0,
        "saved_nano": 0,
        "duration_ms": 10.0,
        "ttft_ms": None,
        "outcome": "success",
        "status": 200,
        "cache_hit": 0,
        "stream": 0,
        "usage_estimated": 0,
        "api": "chat",
        "team": None,
        "tags": None,
    }
    values = [LedgerRow(*({**defaults, **row}[c] for c in LEDGER_COLUMNS)) for row in rows]
    sql = (
        f"INSERT INTO requests ({', '.join(LEDGER_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in LEDGER_COLUMNS)})"
    )
    assert gateway.runtime.database is not None  # as the ledger writer writes a batch:
    database = gateway.runtime.database
    batch = [(sql, values), *sum_statements(database.dialect, values)]  # and sums by hour
    gateway.bg.run(database.write(batch))


def lenient(gateway: Gateway) -> None:
    """Lift the sign-in limit for tests that present wrong keys on purpose."""
    gateway.app._admin_api.guard.failures = FailedSignIns(limit=10_000)


@pytest.fixture
def gateway(gateway_factory) -> Gateway:
    return gateway_factory(console_config())


# -- auth -------------------------------------------------------------------------------


def test_every_admin_endpoint_takes_only_the_admin_key(gateway):
    lenient(gateway)
    for path in GET_ENDPOINTS:
        missing = admin(gateway, path, key="")
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert admin(gateway, path, key="not-the-admin-key").status_code == 401, path
        refused = admin(gateway, path, key=gateway.key)
        assert refused.status_code == 403, path
        assert "caller key" in refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "caller_key_on_admin_api"
        assert admin(gateway, path).status_code == 200, path
    for method, path in (
        ("POST", "/admin/api/keys"),
        ("PATCH", "/admin/api/keys/key_x"),
        ("POST", "/admin/api/keys/key_x/revoke"),
        ("POST", "/admin/api/rollouts/move/rollback"),
    ):
        assert admin(gateway, path, method, key=gateway.key, json={}).status_code == 403
        assert admin(gateway, path, method, key="wrong", json={}).status_code == 401
    assert admin(gateway, "/admin/api/session").json()["models"] == list(console_config()["models"])


def test_admin_api_is_off_without_an_admin_key(gateway_factory):
    config = console_config()
    del config["admin"]
    gateway = gateway_factory(config)
    answer = admin(gateway, "/admin/api/overview")
    assert answer.status_code == 404
    assert "admin API is off" in answer.json()["error"]["message"]
    # the page itself holds no data; its sign-in then says the API is off
    assert httpx.get(base(gateway) + "/console").status_code == 200
    document = httpx.get(base(gateway) + "/admin/openapi.json")  # it names the models
    assert document.status_code == 404 and document.json()["error"]["code"] == "admin_disabled"


def test_wrong_admin_keys_are_rate_limited_per_address(gateway):
    for _ in range(3):  # no key at all is not a guess and does not count
        assert admin(gateway, "/admin/api/session", key="").status_code == 401
    for attempt in range(5):
        wrong = gateway.key if attempt == 0 else f"guess-{attempt}"  # caller keys count too
        assert admin(gateway, "/admin/api/session", key=wrong).status_code in (401, 403)
    limited = admin(gateway, "/admin/api/session", key="guess-6")
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["error"]["code"] == "too_many_sign_in_failures"
    # while limited, even the right key is refused: otherwise guessing would go on
    assert admin(gateway, "/admin/api/session").status_code == 429
    assert admin(gateway, "/admin/reload", "POST").status_code == 429
    assert "content-security-policy" in limited.headers


def test_sign_in_limit_expires_after_its_window():
    now = [1000.0]
    limiter = FailedSignIns(limit=5, window=60, clock=lambda: now[0])
    for _ in range(5):
        now[0] += 1
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.fail("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == pytest.approx(56)  # oldest failure at 1001
    assert limiter.retry_after("10.0.0.2") == 0  # other addresses are not affected
    now[0] = 1061.5
    assert limiter.retry_after("10.0.0.1") == 0  # oldest expired: 4 failures left
    limiter.fail("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") > 0


def test_sign_in_limiter_memory_is_bounded():
    limiter = FailedSignIns(limit=2, window=60, max_addresses=100)
    for i in range(1000):
        limiter.fail(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._failures) <= 100


# -- headers ----------------------------------------------------------------------------


def _check_secure(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_console_and_admin_responses_carry_security_headers(gateway):
    page = httpx.get(base(gateway) + "/console")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    _check_secure(page)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert "<script" in page.text and "<script>" not in page.text  # no inline script
    asset = httpx.get(base(gateway) + "/console/js/main.js")
    _check_secure(asset)
    assert asset.headers["content-type"].startswith("text/javascript")
    assert asset.headers["cache-control"] == "no-cache"
    again = httpx.get(
        base(gateway) + "/console/js/main.js", headers={"If-None-Match": asset.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
    lenient(gateway)
    for response in (
        admin(gateway, "/admin/api/overview"),
        admin(gateway, "/admin/api/keys", "POST", json={"name": "secret-holder"}),
        admin(gateway, "/admin/api/overview", key="wrong"),
        admin(gateway, "/admin/api/overview", key=gateway.key),
        admin(gateway, "/admin/api/nope"),
        admin(gateway, "/admin/api/overview", "DELETE"),
        admin(gateway, "/admin/reload", "POST", key="wrong"),
        admin(gateway, "/admin/api/requests.csv"),
        httpx.get(base(gateway) + "/admin/openapi.json"),
    ):
        _check_secure(response)
        assert response.headers["cache-control"] == "no-store", response.url
        assert "script-src" not in response.headers["content-security-policy"]


def test_unknown_admin_paths_and_methods(gateway):
    assert admin(gateway, "/admin/api/nope").status_code == 404
    assert admin(gateway, "/console/nope.js").status_code == 404
    wrong_method = admin(gateway, "/admin/api/overview", "DELETE")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "GET"
    patch_only = admin(gateway, "/admin/api/keys/key_x", "GET")
    assert patch_only.status_code == 405 and patch_only.headers["allow"] == "PATCH"
    keys = admin(gateway, "/admin/api/keys", "TRACE")
    assert keys.status_code == 405 and keys.headers["allow"] == "GET, POST"
    reload = admin(gateway, "/admin/reload", "GET")
    assert reload.status_code == 405 and reload.headers["allow"] == "POST"
    assert admin(gateway, "/admin/api/overview?window=2h").status_code == 400


# -- OpenAPI ----------------------------------------------------------------------------


def test_openapi_document_is_valid_and_covers_every_admin_route(gateway):
    answer = httpx.get(base(gateway) + "/admin/openapi.json")  # public: no key needed
    assert answer.status_code == 200
    document = answer.json()
    validate(document)
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    served = {(m, p) for m, p in gateway.app.routes if p.startswith("/admin/")}
    served |= {
        ("PATCH", "/admin/api/keys/{id}"),
        ("POST", "/admin/api/keys/{id}/revoke"),
        ("POST", "/admin/api/rollouts/{name}/{action}"),
        ("PATCH", "/admin/api/teams/{name}"),
        ("DELETE", "/admin/api/teams/{name}"),
        ("GET", "/admin/api/requests/{id}"),
    }
    assert documented == served


# -- overview ---------------------------------------------------------------------------


def test_overview_spend_and_totals_match_the_ledger(gateway):
    send_traffic(gateway)
    rows = gateway.ledger_rows()
    data = admin(gateway, "/admin/api/overview?window=1h").json()
    total_cost = sum(r["cost_nano"] for r in rows)
    assert total_cost > 0
    assert data["spend"]["today_nano"] == total_cost
    assert data["spend"]["month_nano"] == total_cost
    assert data["spend"]["forecast_nano"] >= total_cost
    assert data["totals"]["requests"] == len(rows)
    errors = sum(
        r["outcome"] in ("upstream_error", "timeout", "connection_error", "upstream_rejected")
        for r in rows
    )
    assert data["totals"]["errors"] == errors > 0
    by_model = {m["model"]: m for m in data["models"]}
    assert by_model["chat"]["requests"] == sum(r["model"] == "chat" for r in rows)
    series = data["series"]
    assert series["step"] == 60 and len(series["timestamps"]) == 60
    for model, lines in series["models"].items():
        counted = sum(round(v * 60) for v in lines["requests_per_second"])
        assert counted == sum(r["model"] == model for r in rows), model
    flaky = series["models"]["flaky"]["error_percent"]
    assert any(v for v in flaky if v)
    assert any(v is not None for v in series["models"]["chat"]["ttft_p95_ms"])
    assert all(v is None for v in series["models"]["flaky"]["ttft_p95_ms"])  # no streams
    budgets = {b["name"]: b for b in data["budgets"]}
    key_spend = sum(r["cost_nano"] for r in rows if r["key_name"] == "test")
    assert budgets["test-daily"]["spent_nano"] == key_spend
    assert budgets["everything"]["spent_nano"] == total_cost
    assert budgets["everything"]["state"] == "ok"


def test_overview_series_percentiles_and_budget_states(gateway_factory):
    config = console_config(
        budgets={
            "amber": {
                "scope": "model",
                "target": "chat",
                "limit_usd": 1,
                "alert_at_percent": [50, 90, 100],
            },
            "red": {"scope": "key", "target": "test", "limit_usd": 1, "hard": False},
            "green": {"limit_usd": 100},
        }
    )
    gateway = gateway_factory(config)
    now = time.time()
    rows = [
        {"ts": now - 30, "duration_ms": float(d), "cost_nano": 10_000_000}
        for d in range(10, 210, 10)
    ]  # 20 rows: p95 nearest rank = 19th = 190
    rows += [
        {
            "ts": now - 30,
            "model": "flaky",
            "key_name": "other",
            "outcome": o,
            "cost_nano": 0,
            "ttft_ms": t,
        }
        for o, t in (
            ("upstream_error", None),
            ("success", 40.0),
            ("success", 60.0),
            ("invalid_request", None),
        )
    ]
    rows += [{"ts": now - 20, "key_name": "test", "model": "moving", "cost_nano": 1_100_000_000}]
    rows += [{"ts": now - 7200, "duration_ms": 9999.0}]  # outside the 1h window
    insert_rows(gateway, rows)
    data = admin(gateway, "/admin/api/overview?window=1h").json()
    last = -1  # rows 20-30 s old are in the last one-minute bucket
    chat = data["series"]["models"]["chat"]
    assert chat["p95_ms"][last] == 190.0
    assert chat["requests_per_second"][last] == pytest.approx(20 / 60, abs=1e-6)
    assert chat["error_percent"][last] == 0
    flaky = data["series"]["models"]["flaky"]
    assert flaky["error_percent"][last] == pytest.approx(100 / 3, abs=0.01)  # refused left out
    assert flaky["ttft_p95_ms"][last] == 60.0
    assert data["models"][0]["model"] == "moving"  # costliest first
    states = {b["name"]: (b["state"], b["soft_percent"]) for b in data["budgets"]}
    # chat spent 20 x $0.01 = $0.20 of $1 (20%): ok; 95% would be amber
    assert states["amber"] == ("ok", 90)
    assert states["red"] == ("exceeded", 80)
    assert states["green"] == ("ok", 80)
    insert_rows(gateway, [{"ts": now - 10, "cost_nano": 750_000_000}])  # chat now at 95%
    budgets = {
        b["name"]: b for b in admin(gateway, "/admin/api/overview?window=1h").json()["budgets"]
    }
    assert budgets["amber"]["state"] == "warning"
    assert budgets["amber"]["percent"] == pytest.approx(95)
    week = admin(gateway, "/admin/api/overview?window=7d").json()["series"]
    assert week["step"] == 3600 and len(week["timestamps"]) == 168
    # the 2-hour-old row, two whole hours before the one under way; a week's p95 is
    # read from the hours' latency bins: the middle of its bin, within 4.5 %
    assert week["models"]["chat"]["p95_ms"][-3] == pytest.approx(9999.0, rel=0.045)


# -- upstreams --------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["1h", "30d"])  # 30 d: from the sums by hour
def test_upstreams_show_circuits_errors_retries_and_fallbacks(gateway, window):
    send_traffic(gateway)
    old = {"ts": time.time() - 7200, "model": "flaky", "upstream": "shaky", "attempts": 3}
    insert_rows(gateway, [{**old, "outcome": "upstream_error", "duration_ms": 50.0}])
    rows = gateway.ledger_rows()
    if window == "1h":
        rows = [r for r in rows if r["ts"] > old["ts"]]
    data = admin(gateway, f"/admin/api/upstreams?window={window}").json()
    ups = {u["name"]: u for u in data["upstreams"]}
    assert set(ups) == {"fast", "shaky", "broken", "old", "new"}
    assert ups["broken"]["circuit"] == "open"
    assert 0 < ups["broken"]["circuit_retry_in"] <= 60
    assert ups["fast"]["circuit"] == "closed"
    shaky_rows = [r for r in rows if r["upstream"] == "shaky"]
    outcomes = ups["shaky"]["window"]["outcomes"]
    assert sum(outcomes.values()) == len(shaky_rows)
    assert outcomes["upstream_error"] == sum(r["outcome"] == "upstream_error" for r in shaky_rows)
    assert ups["shaky"]["window"]["retries"] == sum(r["attempts"] - 1 for r in shaky_rows) > 0
    fell_back = [r for r in rows if r["model"] == "resilient" and r["upstream"] == "fast"]
    assert ups["fast"]["window"]["fallbacks_served"] == len(fell_back) > 0
    assert ups["fast"]["window"]["retries"] == 0  # a fallback's failed first try was not here
    assert ups["fast"]["since_start"]["fallbacks_to"] == len(fell_back)
    assert ups["shaky"]["since_start"]["fallbacks_from"] == len(fell_back)
    attempts = ups["shaky"]["since_start"]["attempts"]
    assert attempts["upstream_error"] == gateway.metric(
        "metergate_upstream_attempts_total", upstream="shaky", outcome="upstream_error"
    )
    assert ups["fast"]["serves"] == ["chat"] and ups["new"]["serves"] == ["moving"]
    assert ups["shaky"]["window"]["requests"] == len(shaky_rows)
    assert ups["shaky"]["window"]["errors"] == outcomes["upstream_error"]


# -- keys -------------------------------------------------------------------------------


def test_keys_create_list_edit_and_revoke(gateway):
    send_traffic(gateway, chat=2, streams=0, flaky=0)
    created = admin(
        gateway,
        "/admin/api/keys",
        "POST",
        json={"name": "search-mcp", "models": ["chat"], "max_tokens_cap": 64},
    )
    assert created.status_code == 201
    secret, key = created.json()["secret"], created.json()["key"]
    assert secret.startswith("mgk_") and key["hint"] == secret[-4:]
    assert key["models"] == ["chat"] and key["max_tokens_cap"] == 64
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    client.chat.completions.create(model="chat", messages=ASK)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="moving", messages=ASK)

    listed = {k["name"]: k for k in admin(gateway, "/admin/api/keys").json()["keys"]}
    assert secret not in admin(gateway, "/admin/api/keys").text
    rows = gateway.ledger_rows()
    assert (
        listed["test"]["spend_month_nano"]
        == sum(r["cost_nano"] for r in rows if r["key_name"] == "test")
        > 0
    )
    assert listed["search-mcp"]["requests_month"] == 2  # the success and the refused call
    assert [b["name"] for b in listed["test"]["budgets"]] == ["test-daily"]

    patched = admin(gateway, f"/admin/api/keys/{key['id']}", "PATCH", json={"models": None})
    assert patched.status_code == 200 and patched.json()["key"]["models"] is None
    assert patched.json()["key"]["max_tokens_cap"] == 64  # left out: unchanged
    client.chat.completions.create(model="moving", messages=ASK)  # allowed now, at once
    capped = admin(gateway, f"/admin/api/keys/{key['id']}", "PATCH", json={"max_tokens_cap": 3})
    assert capped.json()["key"]["max_tokens_cap"] == 3
    assert client.chat.completions.create(model="chat", messages=ASK).usage.completion_tokens == 3

    revoked = admin(gateway, f"/admin/api/keys/{key['id']}/revoke", "POST")
    assert revoked.status_code == 200 and revoked.json()["key"]["state"] == "revoked"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="chat", messages=ASK)
    again = admin(gateway, f"/admin/api/keys/{key['id']}/revoke", "POST")  # changes nothing
    assert again.status_code == 200 and again.json()["key"] == revoked.json()["key"]
    frozen = admin(gateway, f"/admin/api/keys/{key['id']}", "PATCH", json={"models": None})
    assert frozen.status_code == 409 and frozen.json()["error"]["code"] == "key_revoked"
    assert admin(gateway, "/admin/api/keys/key_none/revoke", "POST").status_code == 404


def test_key_requests_are_validated(gateway):
    def create(body: Any) -> httpx.Response:
        return admin(gateway, "/admin/api/keys", "POST", json=body)

    assert create({"name": "test"}).status_code == 409  # the harness's active key
    assert create({"name": "bad name!"}).status_code == 400
    assert create({}).status_code == 400
    unknown = create({"name": "x", "models": ["gpt-9"]})
    assert unknown.status_code == 400 and "gpt-9" in unknown.json()["error"]["message"]
    # An empty list (a script's list filtered down to nothing) is no unrestricted key.
    empty = create({"name": "x", "models": []})
    assert empty.status_code == 400 and "give null for every model" in empty.text
    blank = create({"name": "x", "models": ["chat", ""]})
    assert blank.status_code == 400 and "an empty model name" in blank.text
    assert create({"name": "x", "max_tokens_cap": 0}).status_code == 400
    assert create({"name": "x", "max_tokens_cap": True}).status_code == 400
    bad_json = admin(gateway, "/admin/api/keys", "POST", content=b"{nope")
    assert bad_json.status_code == 400
    huge = create({"name": "x", "max_tokens_cap": 2**64 - 1})  # was SQLite's overflow, a 500
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "max_tokens_cap"
    assert create({"name": "x", "max_tokens_cap": 2**31}).status_code == 400
    assert create({"name": "x\n"}).status_code == 400  # a name is the whole string
    extra = create({"name": "x", "budget": 5})
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "budget"
    key = next(k for k in admin(gateway, "/admin/api/keys").json()["keys"])
    unchanged = admin(gateway, f"/admin/api/keys/{key['id']}", "PATCH", json={})
    assert unchanged.status_code == 200  # an empty patch changes nothing
    assert unchanged.json()["key"] == {k: v for k, v in key.items() if k in unchanged.json()["key"]}
    emptied = admin(gateway, f"/admin/api/keys/{key['id']}", "PATCH", json={"models": []})
    assert emptied.status_code == 400 and emptied.json()["error"]["param"] == "models"
    assert (
        admin(gateway, f"/admin/api/keys/{key['id']}", "PATCH", json={"name": "rename"}).status_code
        == 400
    )


def test_a_key_may_keep_models_that_left_the_config(gateway):
    """A change that keeps a key's model no longer configured is taken (the console sends
    them back); a model that is neither configured nor the key's is still refused."""
    gateway.new_key("restricted", models=["retired"])
    keys = {k["name"]: k for k in admin(gateway, "/admin/api/keys").json()["keys"]}
    restricted, other = keys["restricted"]["id"], keys["test"]["id"]

    def patch(key_id: str, models: Any) -> httpx.Response:
        return admin(gateway, f"/admin/api/keys/{key_id}", "PATCH", json={"models": models})

    kept = patch(restricted, ["chat", "retired"])
    assert kept.status_code == 200 and kept.json()["key"]["models"] == ["chat", "retired"]
    for key_id, models in ((restricted, ["chat", "gpt-9"]), (other, ["retired"])):
        refused = patch(key_id, models)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "models"
    assert patch(restricted, ["chat"]).json()["key"]["models"] == ["chat"]
    assert patch(restricted, ["retired"]).status_code == 400  # once dropped, it is gone


@pytest.mark.parametrize(
    "query",
    [
        "overview?window=",  # empty is not "left out"
        "requests?outcome=",
        "requests?key=",
        "requests?team=",
        "requests?limit[x]=5",  # an object, as a form-encoded query spells one
        "requests?limit=5&limit=6",
        "requests?limit=5.0",
        "requests?limit=1_0",
        "requests?before=0",
        "requests?linit=5",
        "usage?team=",
        "usage?tag=",
        "usage?tag=feature",  # NAME:VALUE
        "usage?by=tag:a%0A",  # a tag name is the whole string
        "usage?by=cost",
        "usage?p95=no",  # true or false
        "usage?p95=",
        "request-log.jsonl?since=",
        "request-log.jsonl?since=0h",
        "request-log.jsonl?since=%C2%B2h",  # a digit to str.isdigit, not to int()
    ],
)
def test_query_parameters_are_validated(gateway, query):
    answer = admin(gateway, f"/admin/api/{query}")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"]


def test_the_document_says_which_tag_values_are_printable(gateway):
    """The server checks `str.isprintable()`; the document's pattern says the same of
    every character, read by a JSON Schema validator's own regex engine."""
    document = httpx.get(base(gateway) + "/admin/openapi.json").json()
    value = document["components"]["schemas"]["DefaultTags"]["additionalProperties"]
    validator = jsonschema_rs.Draft202012Validator({"pattern": value["pattern"]})
    disagree = [
        hex(point)
        for point in range(0x110000)
        if not 0xD800 <= point <= 0xDFFF  # never in JSON text
        and validator.is_valid(chr(point)) != chr(point).isprintable()
    ]
    assert disagree == []


def test_before_has_no_upper_bound(gateway):
    assert admin(gateway, f"/admin/api/requests?before={10**40}").status_code == 200
    assert admin(gateway, f"/admin/api/requests.csv?before={2**63}&limit=5").status_code == 200


# -- rollouts ---------------------------------------------------------------------------


def test_rollout_actions_follow_the_state_machine(gateway):
    def act(action: str) -> httpx.Response:
        return admin(gateway, f"/admin/api/rollouts/move/{action}", "POST")

    listed = admin(gateway, "/admin/api/rollouts").json()["rollouts"]
    assert [(r["name"], r["state"], r["actions"]) for r in listed] == [
        ("move", "pending", ["start"])
    ]
    started = act("start").json()["rollout"]
    assert started["state"] == "running"
    assert started["weights"]["candidate"] == {"upstreams": ["new"], "share": 0.1}
    assert started["actions"] == ["pause", "promote", "rollback"]
    assert gateway.runtime.plan.rollouts.rollouts["move"].state == "running"  # live at once
    gateway.client().chat.completions.create(model="moving", messages=ASK)
    live = admin(gateway, "/admin/api/rollouts").json()["rollouts"][0]["live"]
    assert live["candidate"]["attempts"] + live["baseline"]["attempts"] == 1
    assert act("pause").json()["rollout"]["state"] == "paused"
    refused = act("pause")
    assert refused.status_code == 409 and "paused" in refused.json()["error"]["message"]
    assert act("resume").json()["rollout"]["state"] == "running"
    promoted = act("promote").json()["rollout"]
    assert (promoted["stage"], promoted["weights"]["candidate"]["share"]) == (1, 0.5)
    rolled = act("rollback").json()["rollout"]
    assert rolled["state"] == "rolled_back" and rolled["weights"]["candidate"]["share"] == 0
    assert [e["event"] for e in rolled["history"]] == [
        "started",
        "paused",
        "resumed",
        "promoted",
        "rolled_back",
    ]
    assert {e["by"] for e in rolled["history"]} == {"admin API"}
    assert admin(gateway, "/admin/api/rollouts/nope/start", "POST").status_code == 404
    assert act("explode").status_code == 404
    assert admin(gateway, "/admin/api/rollouts/move/start", "GET").status_code == 405


# -- MCP --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("page", "reader"), [("/admin/api/mcp", mcp_page), ("/admin/api/upstreams", upstreams_page)]
)
def test_reading_metrics_for_a_page_does_not_hold_requests(
    gateway, monkeypatch: pytest.MonkeyPatch, page: str, reader: Any
) -> None:
    """With several workers a page's metric read merges every worker's files (~15 ms,
    most of a second the first time): chat requests arriving meanwhile are answered."""
    read, reading, finish = reader.samples, threading.Event(), threading.Event()

    def slow_samples(registry: Any, names: set[str]) -> Any:
        reading.set()
        finish.wait(20)
        return read(registry, names)

    monkeypatch.setattr(reader, "samples", slow_samples)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(admin, gateway, page)
        assert reading.wait(20)
        try:
            answer = gateway.client(timeout=10).chat.completions.create(model="chat", messages=ASK)
            assert answer.choices[0].message.content
            assert not loading.done()  # the page was still reading meanwhile
        finally:
            finish.set()
        assert loading.result(60).status_code == 200


def test_mcp_page_reads_the_contract_metrics(gateway):
    assert admin(gateway, "/admin/api/mcp").json()["servers"] == []
    registry = gateway.runtime.metrics.registry
    up = Gauge("metergate_mcp_server_up", "up", ["mcp_server_name"], registry=registry)
    calls = Histogram(
        "mcp_client_operation_duration_seconds",
        "calls",
        ["mcp_server_name", "mcp_method_name", "gen_ai_tool_name", "error_type"],
        buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        registry=registry,
    )
    up.labels("search").set(1)
    up.labels("files").set(0)
    for _ in range(8):
        calls.labels("search", "tools/call", "lookup", "").observe(0.015)
    calls.labels("search", "tools/call", "lookup", "tool_error").observe(0.015)
    calls.labels("search", "tools/call", "crawl", "timeout").observe(4.0)
    calls.labels("search", "tools/call", "lookup", "cancelled").observe(0.015)  # not an error
    calls.labels("search", "tools/list", "", "").observe(0.005)
    servers = {s["name"]: s for s in admin(gateway, "/admin/api/mcp").json()["servers"]}
    assert servers["files"]["up"] is False and servers["files"]["tool_calls"] == 0
    search = servers["search"]
    assert search["up"] is True
    assert search["tool_calls"] == 11
    assert search["tool_error_rate"] == pytest.approx(2 / 11)
    assert search["errors_by_type"] == {"timeout": 1, "tool_error": 1}
    assert search["requests_by_method"] == {"tools/call": 11, "tools/list": 1}
    assert [t["tool"] for t in search["slow_tools"]] == ["crawl", "lookup"]
    assert 2 <= search["slow_tools"][0]["p95_seconds"] <= 5
    assert search["tool_calls_per_second"] > 0


def test_mcp_rates_are_over_the_last_minute_whenever_the_page_is_read():
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    now = [100.0]
    view = McpView(clock=lambda: now[0])
    calls = Histogram(
        "mcp_client_operation_duration_seconds",
        "calls",
        ["mcp_server_name", "mcp_method_name", "gen_ai_tool_name", "error_type"],
        registry=registry,
    )
    up = Gauge("metergate_mcp_server_up", "up", ["mcp_server_name"], registry=registry)
    up.labels("a").set(1)  # as the gateway has for every server it is configured with

    def call(n: int) -> None:
        for _ in range(n):
            calls.labels("a", "tools/call", "t", "").observe(0.1)

    now[0] = 110.0
    call(20)
    first = view.read(registry)  # no minute of samples yet: since the process started
    assert first["rate_window_seconds"] == pytest.approx(10)
    assert first["servers"][0]["tool_calls_per_second"] == pytest.approx(2.0)
    for second in range(115, 300, 5):  # the view's own samples, every 5 s
        now[0] = float(second)
        call(5)  # 1 call/s
        view.sample(registry)
    call(300)  # a burst in the last 5 seconds: 60 calls/s on top, over one minute
    for gap in (300.0, 301.0, 359.0):  # a page read at any time after the last one
        now[0] = gap
        read = view.read(registry)
        assert 60 <= read["rate_window_seconds"] < 65, gap
        if gap == 300.0:
            assert read["servers"][0]["tool_calls_per_second"] == pytest.approx(
                (60 + 300) / read["rate_window_seconds"], rel=0.1
            )


def test_histogram_quantile_interpolates_within_a_bucket():
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.95, {1.0: 0.0, float("inf"): 10.0}) == 1.0  # beyond the last bound
    assert quantile(0.95, {}) is None


async def test_forecast_of_a_ledger_younger_than_its_basis(tmp_path):
    noon = dt.datetime(2025, 6, 10, 12, tzinfo=dt.UTC).timestamp()
    blank = LedgerRow(
        ts=noon, request_id="r", key_name="k", model="m", upstream="u", attempts=1,
        input_tokens=0, cached_input_tokens=0, output_tokens=0, cost_nano=0, saved_nano=0,
        duration_ms=1.0, ttft_ms=None, outcome="success", status=200, cache_hit=0, stream=0,
    )  # fmt: skip
    database = await open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        writer = LedgerWriter(database)
        for i in range(357):  # $357 between 10:00 and 12:00, the ledger's first rows
            writer.append(
                blank._replace(ts=noon - 7200 + i * 20, request_id=f"r{i}", cost_nano=10**9)
            )
        await writer.flush()
        forecast = await month_forecast(database, noon)
        assert forecast.so_far_nano == 357 * 10**9
        assert forecast.basis_days == pytest.approx(2 / 24, rel=0.01)
        assert forecast.daily_nano == pytest.approx(357 * 12 * 10**9, rel=0.01)  # not $0/day
        assert forecast.projected_nano == pytest.approx(
            forecast.so_far_nano + forecast.daily_nano * forecast.remaining_days, rel=1e-6
        )
        # ten minutes of data are extrapolated as if from an hour
        early = await month_forecast(database, noon - 7200 + 600)
        assert early.basis_days == pytest.approx(1 / 24)
    finally:
        await database.close()


# -- PostgreSQL -------------------------------------------------------------------------


def test_console_queries_run_on_postgresql(gateway_factory, fresh_postgres_url):
    """The same SQL on PostgreSQL: window functions, FLOOR buckets, BIGINT sums."""
    gateway = gateway_factory(console_config(ledger={"url": fresh_postgres_url}))
    send_traffic(gateway)
    rows = gateway.ledger_rows()
    for window, step in (("1h", 60), ("30d", 14_400)):
        data = admin(gateway, f"/admin/api/overview?window={window}").json()
        assert data["spend"]["today_nano"] == sum(r["cost_nano"] for r in rows) > 0
        assert data["totals"]["requests"] == len(rows)
        series = data["series"]
        chat = series["models"]["chat"]
        # the last bucket of a long window is the one under way: its rate is over its time
        last = data["now"] - series["timestamps"][-1] if window == "30d" else step
        rates = chat["requests_per_second"]
        counted = sum(round(v * step) for v in rates[:-1]) + round(rates[-1] * last)
        assert counted == sum(r["model"] == "chat" for r in rows)
        assert max(v or 0 for v in chat["p95_ms"]) > 0
        assert any(v is not None for v in chat["ttft_p95_ms"])
    ups = {u["name"]: u for u in admin(gateway, "/admin/api/upstreams").json()["upstreams"]}
    assert ups["shaky"]["window"]["retries"] > 0 and ups["broken"]["circuit"] == "open"
    keys = admin(gateway, "/admin/api/keys").json()["keys"]
    assert keys[0]["spend_month_nano"] == sum(r["cost_nano"] for r in rows)
    created = admin(gateway, "/admin/api/keys", "POST", json={"name": "pg-key"}).json()["key"]
    patched = admin(
        gateway, f"/admin/api/keys/{created['id']}", "PATCH", json={"models": ["chat"]}
    ).json()
    assert patched["key"]["models"] == ["chat"]
    assert admin(gateway, f"/admin/api/keys/{created['id']}/revoke", "POST").status_code == 200
    failed = admin(gateway, "/admin/api/requests?outcome=upstream_error&limit=3").json()
    assert len(failed["requests"]) == 3 and failed["next_before"] is not None
    csv_rows = list(csv.DictReader(io.StringIO(admin(gateway, "/admin/api/requests.csv").text)))
    assert len(csv_rows) == len(rows)
    assert admin(gateway, "/admin/api/rollouts/move/start", "POST").status_code == 200


# -- requests and CSV -------------------------------------------------------------------


def test_requests_are_filtered_paged_and_exported(gateway):
    send_traffic(gateway)
    evil = '=HYPERLINK("http://x")'
    gateway.client().chat.completions.create(
        model="chat", messages=ASK, extra_headers={"x-request-id": evil}
    )
    gateway.flush_ledger()
    rows = gateway.ledger_rows()
    everything = admin(gateway, "/admin/api/requests?limit=1000").json()
    assert gateway.runtime.database is not None
    ids = gateway.bg.run(gateway.runtime.database.fetch("SELECT id FROM requests ORDER BY id"))
    assert [r["id"] for r in everything["requests"]] == [i for (i,) in reversed(ids)]
    assert everything["next_before"] is None
    assert "upstream_error" in everything["filters"]["outcomes"]
    failed = admin(gateway, "/admin/api/requests?outcome=upstream_error").json()["requests"]
    assert failed and {r["outcome"] for r in failed} == {"upstream_error"}
    assert len(failed) == sum(r["outcome"] == "upstream_error" for r in rows)
    chat = admin(gateway, "/admin/api/requests?model=chat&key=test").json()["requests"]
    assert len(chat) == sum(r["model"] == "chat" for r in rows)
    assert admin(gateway, "/admin/api/requests?key=nobody").json()["requests"] == []
    page = admin(gateway, "/admin/api/requests?limit=5").json()
    assert len(page["requests"]) == 5 and page["next_before"] == page["requests"][-1]["id"]
    older = admin(gateway, f"/admin/api/requests?limit=5&before={page['next_before']}").json()
    assert older["requests"][0]["id"] == page["next_before"] - 1
    assert admin(gateway, "/admin/api/requests?outcome=exploded").status_code == 400
    assert admin(gateway, "/admin/api/requests?limit=0").status_code == 400
    assert admin(gateway, "/admin/api/requests?limit=many").status_code == 400

    exported = admin(gateway, "/admin/api/requests.csv?outcome=upstream_error")
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    assert exported.headers["content-disposition"].startswith("attachment; filename=")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert [int(r["id"]) for r in table] == [r["id"] for r in failed]
    assert {r["outcome"] for r in table} == {"upstream_error"}
    full = list(csv.DictReader(io.StringIO(admin(gateway, "/admin/api/requests.csv").text)))
    assert len(full) == len(rows)
    assert sum(int(r["cost_nano"]) for r in full) == sum(r["cost_nano"] for r in rows)
    by_id = {r["request_id"]: r for r in full}
    assert "'" + evil in by_id  # a spreadsheet shows it as text instead of running it
    assert by_id["'" + evil]["time"].endswith("Z")
