"""A budget for each key (team, model) apart: `target: "*"`. Every key gets the limit
for itself; one key's spend never refuses another; the spend survives restarts and
reloads; no metric series per key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from metergate.config import ConfigError, parse_config
from tests.harness import WebhookReceiver, eventually, simulated_config, start_gateway

ASK = [{"role": "user", "content": "budget me"}]
ADMIN = "admin-secret-0123456789abcdef"


def each_config(limit_usd: float, scope: str = "key", **budget: object) -> dict:
    config = simulated_config(latency_ms=20, output_tokens=10)
    # 0.01 USD an input token, 1 USD an output token: an answer costs ~10 USD and is
    # held (prompt bytes + max_tokens) at ~11 USD
    config["upstreams"]["sim-up"]["price"] = {"input": 10_000, "output": 1_000_000}
    config["budgets"] = {
        "per-user": {"scope": scope, "target": "*", "period": "day", "limit_usd": limit_usd}
        | budget
    }
    config["admin"] = {"api_key": ADMIN}
    return config


def client_of(gateway, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)


def until_refused(client: openai.OpenAI, most: int = 30) -> tuple[int, str]:
    """Ask until the budget refuses: how many were answered, and the refusal's text."""
    for answered in range(most):
        try:
            client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
        except openai.RateLimitError as error:
            assert error.code == "budget_exceeded"
            return answered, error.message
    raise AssertionError(f"not refused after {most} answers")


def spent_by(gateway, key: str) -> int:
    return sum(r["cost_nano"] for r in gateway.ledger_rows(f"key_name = '{key}'"))


def series(gateway, name: str, budget: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in gateway.runtime.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and sample.labels.get("budget") == budget
    ]


def test_each_key_spends_its_own_limit_and_no_more(gateway_factory):
    gateway = gateway_factory(each_config(100, alert_at_percent=[50]))
    alice = client_of(gateway, gateway.new_key("alice"))
    bob = client_of(gateway, gateway.new_key("bob"))

    answered, message = until_refused(alice)
    assert answered >= 7  # ~10 USD each: $100 is several answers, for alice alone
    assert "budget 'per-user' (key alice, per day) would be exceeded" in message
    assert "limit $100" in message
    assert 0 < spent_by(gateway, "alice") <= 100 * 10**9
    # bob's share is untouched by alice's: he is answered, and so is the gateway's key
    assert bob.chat.completions.create(model="sim", messages=ASK, max_tokens=10).usage
    assert gateway.client().chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    # what each member counted is what the ledger has for its key
    members = gateway.runtime.plan.budgets.each[0].members
    assert members["alice"].spent_nano == spent_by(gateway, "alice")
    assert members["bob"].spent_nano == spent_by(gateway, "bob") > 0
    # one limit series, no spend series per key; alerts count the keys that crossed
    assert gateway.metric("metergate_budget_limit_usd", budget="per-user") == 100
    assert series(gateway, "metergate_budget_spent_usd", "per-user") == []
    assert gateway.metric("metergate_budget_alerts_total", budget="per-user", threshold="50") == 1


async def test_concurrent_requests_of_two_keys_each_stay_under_the_limit(gateway_factory):
    limit = 200
    gateway = gateway_factory(each_config(limit))
    secrets = {name: gateway.new_key(name) for name in ("carol", "dave")}

    async def one(name: str, i: int) -> str:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=secrets[name], max_retries=0)
        try:
            await client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"q{i:03d}"}], max_tokens=10
            )
            return f"{name} ok"
        except openai.RateLimitError as error:
            assert "(key " + name in error.message
            return f"{name} refused"
        finally:
            await client.close()

    results = await asyncio.gather(*(one(("carol", "dave")[i % 2], i) for i in range(120)))
    for name in secrets:
        rows = gateway.ledger_rows(f"key_name = '{name}'")
        assert 0 < sum(r["cost_nano"] for r in rows) <= limit * 10**9
        assert results.count(f"{name} ok") == sum(r["outcome"] == "success" for r in rows) > 0
        assert results.count(f"{name} refused") > 0


def test_each_keys_spend_survives_a_restart(bg, tmp_path):
    config = each_config(100)
    first = start_gateway(bg, config, tmp_path)
    try:
        alice, bob = first.new_key("alice"), first.new_key("bob")
        until_refused(client_of(first, alice))
        client_of(first, bob).chat.completions.create(model="sim", messages=ASK, max_tokens=10)
        spent = {name: spent_by(first, name) for name in ("alice", "bob")}
    finally:
        first.stop()
    second = start_gateway(bg, config, tmp_path, key_name="after-restart")
    try:
        # read back from the ledger in one query: alice is refused at once, bob is not
        with pytest.raises(openai.RateLimitError, match="key alice"):
            client_of(second, alice).chat.completions.create(
                model="sim", messages=ASK, max_tokens=10
            )
        answered, _ = until_refused(client_of(second, bob))
        assert answered >= 1
        members = second.runtime.plan.budgets.each[0].members
        assert members["alice"].spent_nano == spent["alice"] == spent_by(second, "alice")
        assert spent_by(second, "bob") <= 100 * 10**9 < spent_by(second, "bob") + 32 * 10**9
    finally:
        second.stop()


async def test_a_reload_keeps_each_keys_spend_and_applies_a_new_limit(gateway_factory):
    config = each_config(100)
    gateway = gateway_factory(config)
    alice = gateway.new_key("alice")
    await asyncio.to_thread(until_refused, client_of(gateway, alice))
    before = gateway.runtime.plan.budgets.each[0]

    config["budgets"]["per-user"]["limit_usd"] = 200
    await asyncio.to_thread(Path(gateway.runtime.source).write_text, yaml.safe_dump(config))
    async with httpx.AsyncClient(timeout=30) as http:
        reloaded = await http.post(
            gateway.base_url.removesuffix("/v1") + "/admin/reload",
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
    assert reloaded.status_code == 200, reloaded.text
    (after,) = gateway.runtime.plan.budgets.each
    assert after is before and after.members["alice"].limit_nano == 200 * 10**9
    answered, message = await asyncio.to_thread(until_refused, client_of(gateway, alice))
    assert answered >= 8 and "limit $200" in message
    assert after.members["alice"].spent_nano == spent_by(gateway, "alice") <= 200 * 10**9
    assert gateway.metric("metergate_budget_limit_usd", budget="per-user") == 200


def test_a_budget_for_each_model_and_each_team(gateway_factory):
    config = each_config(50, scope="model")
    config["models"]["sim-2"] = {"upstreams": ["sim-up"]}
    gateway = gateway_factory(config)
    client = gateway.client()
    for model in ("sim", "sim-2"):
        with pytest.raises(openai.RateLimitError, match=f"model {model},"):
            for _ in range(10):
                client.chat.completions.create(model=model, messages=ASK, max_tokens=10)

    config = each_config(50, scope="team")
    gateway = gateway_factory(config)
    base = gateway.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {ADMIN}"}
    for team in ("red", "blue"):
        made = httpx.post(f"{base}/admin/api/teams", headers=headers, json={"name": team})
        assert made.status_code == 201, made.text
    keys = {}
    for name, team in (("r1", "red"), ("r2", "red"), ("b1", "blue")):
        made = httpx.post(
            f"{base}/admin/api/keys", headers=headers, json={"name": name, "team": team}
        )
        assert made.status_code == 201, made.text
        keys[name] = made.json()["secret"]
    # the red team's two keys share one limit; blue's key still has its own
    answered = sum(until_refused(client_of(gateway, keys[n]))[0] for n in ("r1", "r2"))
    assert answered >= 2
    assert client_of(gateway, keys["b1"]).chat.completions.create(
        model="sim", messages=ASK, max_tokens=10
    )
    # keys without a team are not under a budget for each team
    for _ in range(5):
        gateway.client().chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    # the teams page shows each team's share
    teams = httpx.get(f"{base}/admin/api/teams", headers=headers, timeout=10).json()["teams"]
    shares = {t["name"]: t["budget_state"] for t in teams}
    red_rows = gateway.ledger_rows("team = 'red'")
    assert [(b["name"], b["target"]) for b in shares["red"]] == [("per-user", "red")]
    assert shares["red"][0]["spent_nano"] == sum(r["cost_nano"] for r in red_rows) > 0
    assert shares["blue"][0]["spent_nano"] < shares["red"][0]["spent_nano"]


def test_a_target_of_star_is_for_key_team_or_model_scopes():
    config = each_config(10)
    config["budgets"]["per-user"]["scope"] = "global"
    with pytest.raises(ConfigError, match="a global budget counts everything: it takes no target"):
        parse_config(yaml.safe_dump(config))
    config["budgets"]["per-user"]["scope"] = "model"  # "*" is not an unknown model
    parse_config(yaml.safe_dump(config))


def test_console_shows_the_key_that_spent_most_and_each_keys_share(gateway_factory):
    gateway = gateway_factory(each_config(100))
    alice = gateway.new_key("alice")
    until_refused(client_of(gateway, alice))
    gateway.client().chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    gateway.flush_ledger()
    base = gateway.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {ADMIN}"}

    overview = httpx.get(f"{base}/admin/api/overview", headers=headers, timeout=10).json()
    (budget,) = overview["budgets"]
    assert budget["each"] is True and budget["target"] == "*"
    assert budget["top_target"] == "alice" and budget["spent_nano"] == spent_by(gateway, "alice")
    assert budget["past_soft"] == 1  # alice passed 80% of $100; the gateway's key did not
    keys = httpx.get(f"{base}/admin/api/keys", headers=headers, timeout=10).json()["keys"]
    shares = {k["name"]: k["budgets"] for k in keys}
    assert shares["alice"][0]["target"] == "alice"
    assert shares["alice"][0]["spent_nano"] == spent_by(gateway, "alice")
    assert shares["test"][0]["spent_nano"] == spent_by(gateway, "test") > 0


async def test_the_overview_bar_holds_what_its_top_key_holds_not_every_keys(
    gateway_factory,
):
    """The bar of a budget for each key is the key that spent most: what it shows held
    is that key's requests in flight, not every key's (which could fill a bar past its
    limit with other keys' holds)."""
    config = each_config(100)
    config["providers"]["slow"] = {"type": "simulated", "simulated": {"latency_ms": 600_000}}
    config["upstreams"]["slow-up"] = {**config["upstreams"]["sim-up"], "provider": "slow"}
    config["models"]["slow"] = {"upstreams": ["slow-up"]}
    gateway = gateway_factory(config)
    alice, bob = gateway.new_key("alice"), gateway.new_key("bob")
    client_of(gateway, alice).chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    gateway.flush_ledger()
    each = gateway.runtime.plan.budgets.each[0]

    def holding(name: str) -> int:
        member = each.members.get(name)
        return 0 if member is None else member.reserved_nano

    clients = {
        name: openai.AsyncOpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
        for name, secret in (("alice", alice), ("bob", bob))
    }
    slow = [
        asyncio.create_task(  # streams: a caller that leaves one ends its upstream call
            c.chat.completions.create(model="slow", messages=ASK, max_tokens=10, stream=True)
        )
        for c in clients.values()
    ]
    try:
        assert await eventually(lambda: holding("alice") > 0 and holding("bob") > 0)
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.get(
                f"{gateway.base_url.removesuffix('/v1')}/admin/api/overview",
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
        (bar,) = answer.json()["budgets"]
        assert bar["top_target"] == "alice"
        assert bar["reserved_nano"] == holding("alice")
    finally:
        for task in slow:
            task.cancel()
        for c in clients.values():
            await c.close()


async def test_members_appear_on_first_request_without_a_ledger_query_each(
    gateway_factory, monkeypatch
):
    """A budget for each key reads the ledger once (grouped), not once per key: 200 keys'
    first requests make 200 members and no further spend queries."""
    gateway = gateway_factory(each_config(100, hard=False))
    database = gateway.runtime.database
    queries: list[str] = []
    fetch = database.fetch

    async def counting(sql, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "SUM(cost_nano)" in sql:
            queries.append(sql)
        return await fetch(sql, *args, **kwargs)

    secrets = [await asyncio.to_thread(gateway.new_key, f"user-{i:03d}") for i in range(200)]
    monkeypatch.setattr(database, "fetch", counting)

    async def one(secret: str) -> None:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
        await client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
        await client.close()

    await asyncio.gather(*(one(s) for s in secrets))
    monkeypatch.undo()
    members = gateway.runtime.plan.budgets.each[0].members
    assert len(members) == 200 and queries == []
    assert await eventually(lambda: all(m.spent_nano > 0 for m in members.values()))


def test_a_keys_alert_names_the_key(gateway_factory, bg):
    receiver = WebhookReceiver(bg)
    received = receiver.received
    try:
        config = each_config(30, hard=False, alert_at_percent=[50])
        config["budgets"]["per-user"]["webhook_url"] = receiver.hook_url
        gateway = gateway_factory(config)
        erin = client_of(gateway, gateway.new_key("erin"))
        for _ in range(2):  # ~10 USD each: erin passes 50% of $30; the gateway's key does not
            erin.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
        gateway.client().chat.completions.create(model="sim", messages=ASK, max_tokens=10)
        assert bg.run(eventually(lambda: len(received) >= 1))
    finally:
        receiver.close()
    (notice,) = received
    assert notice["budget"] == "per-user" and notice["key"] == "erin"
    assert notice["percent"] == 50 and "(key erin, per day) passed 50%" in notice["text"]


def test_a_key_may_have_its_own_limit_of_a_budget_for_each_key(gateway_factory):
    """A plan: every key may spend $30 a day unless its own `budget_limits` says more (or
    less); a change applies to the key's next request, its day's spend kept."""
    gateway = gateway_factory(each_config(30))
    base = gateway.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {ADMIN}"}

    def create(name: str, **fields: object) -> dict:
        answer = httpx.post(
            f"{base}/admin/api/keys", headers=headers, json={"name": name, **fields}
        )
        assert answer.status_code == 201, answer.text
        return answer.json()

    def change(key_id: str, **fields: object) -> httpx.Response:
        return httpx.patch(f"{base}/admin/api/keys/{key_id}", headers=headers, json=fields)

    basic, pro = create("basic"), create("pro", budget_limits={"per-user": "100"})
    assert pro["key"]["budget_limits"] == {"per-user": "100"}
    answered, message = until_refused(client_of(gateway, basic["secret"]))
    assert 1 <= answered <= 3 and "limit $30.000000" in message
    answered, message = until_refused(client_of(gateway, pro["secret"]))
    assert answered >= 7 and "budget 'per-user' (key pro, per day)" in message
    assert "limit $100.000000" in message and spent_by(gateway, "pro") <= 100 * 10**9

    raised = change(basic["key"]["id"], budget_limits={"per-user": 60.5})
    assert raised.status_code == 200 and raised.json()["key"]["budget_limits"] == {
        "per-user": "60.5"
    }
    answered, message = until_refused(client_of(gateway, basic["secret"]))
    assert answered >= 2 and "limit $60.500000" in message
    assert spent_by(gateway, "basic") <= 60.5 * 10**9
    assert change(pro["key"]["id"], budget_limits=None).json()["key"]["budget_limits"] == {}
    with pytest.raises(openai.RateLimitError, match=r"limit \$30\.000000"):  # back to $30
        client_of(gateway, pro["secret"]).chat.completions.create(
            model="sim", messages=ASK, max_tokens=10
        )
    keys = httpx.get(f"{base}/admin/api/keys", headers=headers, timeout=10).json()["keys"]
    limits = {k["name"]: k["budgets"][0]["limit_nano"] for k in keys}
    assert limits == {"basic": 60_500_000_000, "pro": 30 * 10**9, "test": 30 * 10**9}

    for wrong in ({"per-day": 5}, {"per-user": 0}, {"per-user": "lots"}, ["per-user"]):
        refused = change(basic["key"]["id"], budget_limits=wrong)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "budget_limits"
    unknown = change(basic["key"]["id"], budget_limits={"per-day": 5}).json()["error"]
    assert "'per-day' is not a budget for each key" in unknown["message"]
    assert "those a key may set: per-user" in unknown["message"]


def test_the_cli_sets_and_clears_a_keys_budget_limits(gateway_factory):
    gateway = gateway_factory(each_config(30))
    keys = gateway.keys_cli

    secret = keys("create", "--name", "vip", "--budget-limit", "per-user=100").split()[-1]
    answered, message = until_refused(client_of(gateway, secret))
    assert answered >= 7 and "limit $100.000000" in message
    assert "budget limits as configured" in keys("update", "vip", "--clear-budget-limits")
    assert "per-user $12.5" in keys("update", "vip", "--budget-limit", "per-user=12.5")
    wrong = keys("update", "vip", "--budget-limit", "per-day=5", code=2)
    assert "'per-day' is not a budget for each key" in wrong


def test_the_overview_counts_keys_past_the_amber_mark_of_their_own_limit(gateway_factory):
    gateway = gateway_factory(each_config(30, hard=False))  # soft: nobody is refused
    base = gateway.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {ADMIN}"}
    for name, limits in (("plain", None), ("big", {"per-user": 1000}), ("small", {"per-user": 10})):
        made = httpx.post(
            f"{base}/admin/api/keys",
            headers=headers,
            json={"name": name, "budget_limits": limits},
        )
        assert made.status_code == 201, made.text
        client = client_of(gateway, made.json()["secret"])
        for _ in range(3):  # ~$30 each: past 80% of $30 and of $10, not of $1000
            client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    gateway.flush_ledger()
    overview = httpx.get(f"{base}/admin/api/overview", headers=headers, timeout=10).json()
    (budget,) = overview["budgets"]
    assert budget["past_soft"] == 2  # plain and small; big is far from its own limit
