"""Teams: keys grouped under budgets and rate limits of their own, on top of each key's,
exact under concurrency and across a fleet, managed live through the admin API and the
CLI; team spend in the ledger, reports and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness import BackgroundLoop, Gateway, simulated_config, two_gateways
from tests.services import RedisServer
from tests.test_console_api import ADMIN_KEY, admin

METERGATE = [sys.executable, "-m", "metergate"]


def team_config(**simulated: Any) -> dict[str, Any]:
    config = simulated_config(**{"latency_ms": 20, "output_tokens": 10, **simulated})
    # 1 USD per token makes every cost easy to reason about
    config["upstreams"]["sim-up"]["price"] = {"input": 1_000_000, "output": 1_000_000}
    config["admin"] = {"api_key": ADMIN_KEY}
    return config


def make_team(gateway: Gateway, name: str = "search", **fields: Any) -> dict[str, Any]:
    answer = admin(gateway, "/admin/api/teams", "POST", json={"name": name, **fields})
    assert answer.status_code == 201, answer.text
    return answer.json()["team"]


def team_key(gateway: Gateway, name: str, team: str | None, **fields: Any) -> str:
    answer = admin(gateway, "/admin/api/keys", "POST", json={"name": name, "team": team, **fields})
    assert answer.status_code == 201, answer.text
    return answer.json()["secret"]


def client_for(gateway: Gateway, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)


def ask(i: int = 0) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i:03d}"}]


async def spend(
    clients: list[openai.AsyncOpenAI], i: int, in_flight: asyncio.Semaphore | None = None
) -> str:
    """One request on client i % 2: "ok", or "refused" by a budget."""
    async with in_flight or contextlib.nullcontext():
        try:
            await clients[i % 2].chat.completions.create(
                model="sim", messages=ask(i), max_tokens=10
            )
            return "ok"
        except openai.RateLimitError as error:
            assert error.code == "budget_exceeded"
            return "refused"


def test_a_team_budget_caps_its_keys_together(gateway_factory):
    gateway = gateway_factory(team_config())
    make_team(gateway, budgets=[{"period": "day", "limit_usd": "120"}])
    a = client_for(gateway, team_key(gateway, "search-a", "search"))
    b = client_for(gateway, team_key(gateway, "search-b", "search"))
    outsider = gateway.client()  # key `test`, in no team
    refused = None
    for i in range(30):
        try:
            (a if i % 2 else b).chat.completions.create(model="sim", messages=ask(i), max_tokens=10)
        except openai.RateLimitError as error:
            refused = error
            break
    assert refused is not None and refused.code == "budget_exceeded"
    assert "budget 'team:search:day' (team search, per day)" in refused.message
    # a key outside the team is not held back by the team's budget
    assert outsider.chat.completions.create(model="sim", messages=ask(), max_tokens=10).choices
    rows = gateway.ledger_rows()
    team_rows = [r for r in rows if r["team"] == "search"]
    assert {r["key_name"] for r in team_rows} == {"search-a", "search-b"}
    assert sum(r["cost_nano"] for r in team_rows) <= 120 * 10**9
    assert all(r["team"] is None for r in rows if r["key_name"] == "test")


async def test_200_concurrent_requests_never_pass_a_team_limit(gateway_factory):
    limit = 600
    gateway = gateway_factory(team_config())
    make_team(gateway, budgets=[{"period": "month", "limit_usd": str(limit)}])
    clients = [
        openai.AsyncOpenAI(
            base_url=gateway.base_url,
            api_key=team_key(gateway, f"svc-{n}", "search"),
            max_retries=0,
        )
        for n in range(2)
    ]

    results = await asyncio.gather(*(spend(clients, i) for i in range(200)))
    rows = gateway.ledger_rows("team = 'search'")
    spent = sum(r["cost_nano"] for r in rows)
    assert spent <= limit * 10**9
    assert results.count("ok") == sum(r["outcome"] == "success" for r in rows) > 0
    assert results.count("refused") > 0
    budget = "team:search:month"
    assert gateway.metric("metergate_budget_spent_usd", budget=budget) == spent / 1e9
    assert gateway.metric("metergate_budget_limit_usd", budget=budget) == limit
    assert gateway.metric("metergate_team_cost_usd_total", team="search") == pytest.approx(
        spent / 1e9
    )


def test_a_soft_team_budget_alerts_and_never_refuses(gateway_factory):
    gateway = gateway_factory(team_config())
    budget = {"period": "day", "limit_usd": "50", "hard": False, "alert_at_percent": [50, 100]}
    make_team(gateway, budgets=[budget])
    client = client_for(gateway, team_key(gateway, "svc", "search"))
    for i in range(6):
        client.chat.completions.create(model="sim", messages=ask(i), max_tokens=10)
    spent = sum(r["cost_nano"] for r in gateway.ledger_rows("team = 'search'"))
    assert spent > 50 * 10**9  # over the limit: a soft budget only tells
    for threshold in ("50", "100"):
        assert (
            gateway.metric(
                "metergate_budget_alerts_total", budget="team:search:day", threshold=threshold
            )
            == 1
        )


def test_a_raised_team_limit_announces_a_threshold_again_when_reached(gateway_factory):
    """Raising a team budget's limit puts its spend back under a threshold it had
    passed: that threshold is announced again when spend reaches it at the new limit."""
    gateway = gateway_factory(team_config())
    budget = {"period": "day", "limit_usd": "50", "hard": False, "alert_at_percent": [50]}
    make_team(gateway, budgets=[budget])
    client = client_for(gateway, team_key(gateway, "svc", "search"))

    def alerts() -> float:
        return gateway.metric(
            "metergate_budget_alerts_total", budget="team:search:day", threshold="50"
        )

    def spend_until(count: int) -> None:
        for i in range(40):
            if alerts() >= count:
                return
            client.chat.completions.create(model="sim", messages=ask(i), max_tokens=10)

    spend_until(1)
    spent = sum(r["cost_nano"] for r in gateway.ledger_rows("team = 'search'")) / 1e9
    raised = {**budget, "limit_usd": str(int(spent * 4))}  # 50% is now twice the spend
    answer = admin(gateway, "/admin/api/teams/search", "PATCH", json={"budgets": [raised]})
    assert answer.status_code == 200, answer.text
    spend_until(2)
    assert alerts() == 2


def test_team_rate_limits_apply_on_top_of_each_keys(gateway_factory):
    config = team_config()
    config["rate_limits"] = {"keys": {"*": {"rpm": 100}}}
    gateway = gateway_factory(config)
    make_team(gateway, rpm=3)
    a = client_for(gateway, team_key(gateway, "svc-a", "search"))
    b = client_for(gateway, team_key(gateway, "svc-b", "search"))
    for client in (a, b, a):
        client.chat.completions.create(model="sim", messages=ask(), max_tokens=5)
    with pytest.raises(openai.RateLimitError) as raised:
        b.chat.completions.create(model="sim", messages=ask(), max_tokens=5)
    assert "team 'search'" in raised.value.message and "RPM): Limit 3" in raised.value.message
    headers = raised.value.response.headers
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-limit-requests"] == "3"
    # the key's own limit and other keys are untouched
    assert gateway.client().chat.completions.create(model="sim", messages=ask()).choices


def test_teams_change_live_and_cannot_be_deleted_with_keys(gateway_factory):
    gateway = gateway_factory(team_config())
    make_team(gateway, budgets=[{"period": "day", "limit_usd": "1000"}], tags={"cost_center": "42"})
    secret = team_key(gateway, "svc", "search", tags={"service": "crawler"})
    client = client_for(gateway, secret)
    client.chat.completions.create(model="sim", messages=ask(), max_tokens=10)
    # a lower limit applies to the very next request
    changed = admin(
        gateway,
        "/admin/api/teams/search",
        "PATCH",
        json={"budgets": [{"period": "day", "limit_usd": "5"}]},
    )
    assert changed.status_code == 200 and changed.json()["team"]["budgets"][0]["limit_usd"] == "5"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="sim", messages=ask(), max_tokens=10)
    listing = admin(gateway, "/admin/api/teams").json()["teams"]
    (team,) = listing
    assert team["keys"] == ["svc"] and team["spend_today_nano"] > 5 * 10**9
    (state,) = team["budget_state"]  # once (it was listed twice)
    assert state["name"] == "team:search:day" and state["state"] == "exceeded"
    # a team with keys stays; out of the team, the key is free again
    refused = admin(gateway, "/admin/api/teams/search", "DELETE")
    assert refused.status_code == 409 and "svc" in refused.json()["error"]["message"]
    key_id = next(
        k["id"] for k in admin(gateway, "/admin/api/keys").json()["keys"] if k["name"] == "svc"
    )
    moved = admin(gateway, f"/admin/api/keys/{key_id}", "PATCH", json={"team": None})
    assert moved.status_code == 200 and moved.json()["key"]["team"] is None
    assert client.chat.completions.create(model="sim", messages=ask(), max_tokens=10).choices
    assert admin(gateway, "/admin/api/teams/search", "DELETE").status_code == 200
    assert "team:search:day" not in gateway.runtime.plan.budgets.team_budgets()
    # bad input is refused with what to fix
    bad = admin(
        gateway, "/admin/api/teams", "POST", json={"name": "x", "budgets": [{"period": "week"}]}
    )
    assert bad.status_code == 400 and "day or month" in bad.json()["error"]["message"]
    unknown = admin(gateway, f"/admin/api/keys/{key_id}", "PATCH", json={"team": "nope"})
    assert unknown.status_code == 409 and unknown.json()["error"]["code"] == "team_not_found"
    assert admin(gateway, "/admin/api/teams/nope", "PATCH", json={"rpm": 5}).status_code == 404
    make_team(gateway, "ops")
    taken = admin(gateway, "/admin/api/teams", "POST", json={"name": "ops"})
    assert taken.status_code == 409


def test_tags_from_header_metadata_key_and_team_reach_the_ledger(gateway_factory):
    config = team_config()
    config["tags"] = {
        "metric_labels": {"feature": ["rerank", "search"], "env": "*"},
        "max_label_values": 2,
    }
    gateway = gateway_factory(config)
    make_team(gateway, tags={"cost_center": "42", "env": "prod"})
    client = client_for(gateway, team_key(gateway, "svc", "search", tags={"service": "crawler"}))
    client.chat.completions.create(
        model="sim",
        messages=ask(),
        metadata={"feature": "search", "env": "staging", "note": "not a tag name!", "x": "y"},
        extra_headers={"x-metergate-tags": "feature=rerank, experiment=b"},
    )
    (row,) = gateway.ledger_rows("key_name = 'svc'")
    assert row["team"] == "search"
    assert json.loads(row["tags"]) == {
        "cost_center": "42",  # team default
        "env": "staging",  # metadata over the team's default
        "service": "crawler",  # key default
        "feature": "rerank",  # the header over metadata
        "experiment": "b",
        "note": "not a tag name!",
        "x": "y",
    }
    for value in ("dev", "qa", "perf"):  # env: any value, at most 2 distinct per process
        client.chat.completions.create(
            model="sim",
            messages=ask(),
            extra_headers={"x-metergate-tags": f"env={value},feature=other-thing"},
        )
    assert gateway.metric("metergate_tag_requests_total", tag="feature", value="rerank") == 1
    assert gateway.metric("metergate_tag_requests_total", tag="feature", value="other") == 3
    assert gateway.metric("metergate_tag_requests_total", tag="env", value="staging") == 1
    assert gateway.metric("metergate_tag_requests_total", tag="env", value="dev") == 1
    assert gateway.metric("metergate_tag_requests_total", tag="env", value="other") == 2
    cost = gateway.metric("metergate_tag_cost_usd_total", tag="feature", value="rerank")
    assert cost == pytest.approx(row["cost_nano"] / 1e9)
    # only allow-listed names are labels, never the others
    labels = {
        s.labels.get("tag")
        for f in gateway.runtime.metrics.registry.collect()
        for s in f.samples
        if s.name.startswith("metergate_tag_")
    }
    assert labels == {"feature", "env"}


@pytest.mark.parametrize(
    ("headers", "metadata", "message"),
    [
        ({"x-metergate-tags": "feature"}, None, "is not name=value"),
        ({"x-metergate-tags": "bad name=x"}, None, "tag name 'bad name'"),
        ({"x-metergate-tags": "a="}, None, "printable value"),
        ({}, {"feature": 5}, "`metadata.feature` must be a string"),
    ],
)
def test_malformed_tags_are_a_400(gateway_factory, headers, metadata, message):
    gateway = gateway_factory(team_config())
    extra = {"metadata": metadata} if metadata is not None else {}
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().chat.completions.create(
            model="sim", messages=ask(), extra_headers=headers, extra_body=extra
        )
    assert raised.value.code == "invalid_tags" and message in raised.value.message
    (row,) = gateway.ledger_rows()
    assert row["outcome"] == "invalid_request"


# -- the CLI ----------------------------------------------------------------------------


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [*METERGATE, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=config.parent,
    )


def test_cli_manages_teams_a_running_gateway_follows(gateway_factory):
    gateway = gateway_factory(team_config())
    config = Path(gateway.runtime.source)
    created = run(
        config,
        "teams",
        "create",
        "search",
        "--rpm",
        "2",
        "--budget",
        "month:500",
        "--tag",
        "cost_center=42",
    )
    assert created.returncode == 0, created.stderr
    assert "$500 per month" in created.stdout and "2 rpm" in created.stdout
    bad = run(config, "teams", "create", "x", "--budget", "week:5")
    assert bad.returncode == 2 and "day or month" in bad.stderr
    made = run(
        config, "keys", "create", "--name", "crawler", "--team", "search", "--tag", "service=crawl"
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    assert run(config, "keys", "create", "--name", "y", "--team", "nope").returncode == 2
    listed = run(config, "keys", "list", "--team", "search")
    assert listed.returncode == 0 and "crawler" in listed.stdout
    misspelt = run(config, "keys", "list", "--team", "serch")
    assert misspelt.returncode == 2 and "no team named 'serch' (teams: search)" in misspelt.stderr
    client = client_for(gateway, secret)  # the running gateway learns the key and its team
    deadline = time.monotonic() + 10
    while True:  # the team's 2 rpm reaches the gateway within its refresh (2 s)
        try:
            for _ in range(3):
                client.chat.completions.create(model="sim", messages=ask(), max_tokens=5)
        except openai.RateLimitError as error:
            assert "team 'search'" in error.message
            break
        assert time.monotonic() < deadline, "the team's rate limit never applied"
        time.sleep(0.5)
    gateway.client().chat.completions.create(model="sim", messages=ask(), max_tokens=5)
    gateway.flush_ledger()
    listed = run(config, "teams", "list")
    assert listed.returncode == 0 and "search" in listed.stdout and "crawler" in listed.stdout
    by_team = run(config, "usage", "--by", "team", "--format", "json", "--since", "1h")
    groups = {g["name"]: g for g in json.loads(by_team.stdout)["groups"]}
    assert groups["search"]["requests"] >= 2 and "(none)" in groups  # the `test` key's
    by_tag = run(config, "usage", "--by", "tag:service", "--format", "csv", "--since", "1h")
    assert by_tag.returncode == 0 and by_tag.stdout.splitlines()[0].startswith("tag:service,")
    assert any(line.startswith("crawl,") for line in by_tag.stdout.splitlines())
    only = run(
        config,
        "usage",
        "--by",
        "key",
        "--tag",
        "cost_center=42",
        "--format",
        "json",
        "--since",
        "1h",
    )
    names = [g["name"] for g in json.loads(only.stdout)["groups"]]
    assert names == ["crawler"]
    assert run(config, "usage", "--by", "tag:bad name").returncode == 2
    refused = run(config, "teams", "delete", "search")
    assert refused.returncode == 2 and "crawler" in refused.stderr
    assert run(config, "keys", "update", "crawler", "--no-team").returncode == 0
    assert run(config, "teams", "delete", "search").returncode == 0


# -- a fleet -----------------------------------------------------------------------------


@pytest.fixture
def fleet(
    bg: BackgroundLoop, tmp_path: Path, redis_server: RedisServer, fresh_postgres_url: str
) -> Iterator[Callable[[dict[str, Any]], tuple[Gateway, Gateway]]]:
    redis_server.flushall()
    started: list[Gateway] = []

    def make(config: dict[str, Any]) -> tuple[Gateway, Gateway]:
        config = {
            **config,
            "redis": {"url": redis_server.url},
            "ledger": {"url": fresh_postgres_url},
        }
        return two_gateways(bg, config, tmp_path, started)

    yield make
    for gateway in started:
        gateway.stop()


async def test_a_team_budget_holds_across_two_gateways(fleet, bg):
    limit = 300
    a, b = fleet(team_config())
    make_team(a, budgets=[{"period": "month", "limit_usd": str(limit)}])
    secrets = [team_key(a, f"svc-{n}", "search") for n in range(2)]
    for gateway in (a, b):
        bg.run(gateway.runtime.teams.reload())
        bg.run(gateway.runtime.keys.reload())
    clients = [
        openai.AsyncOpenAI(base_url=g.base_url, api_key=s, max_retries=0)
        for g, s in ((a, secrets[0]), (b, secrets[1]))
    ]

    # Each gateway spends first on its own, so both take part whatever the order of the
    # concurrent waves below. There a hold (~$100: a token per request byte) is four times
    # what a request costs, so at most two or three fit, and a gateway whose requests
    # always arrive first can take every freed slot until the budget is gone: seen once
    # in a full run on a loaded machine (every one of the other gateway's 39 refused).
    assert [await spend(clients, i) for i in range(2)] == ["ok", "ok"]
    in_flight = asyncio.Semaphore(6)  # waves: both gateways spend while the budget lasts
    results = await asyncio.gather(*(spend(clients, i, in_flight) for i in range(2, 80)))
    for gateway in (a, b):
        bg.run(gateway.runtime.plan.shared.counters.drain())
    b.flush_ledger()  # one ledger for both: read it once, after both committed
    spent = sum(r["cost_nano"] for r in a.ledger_rows("team = 'search'"))
    assert 0 < spent <= limit * 10**9
    assert results.count("refused") > 0
    assert {r["key_name"] for r in a.ledger_rows("team = 'search' AND outcome = 'success'")} == {
        "svc-0",
        "svc-1",
    }


def test_team_and_key_bodies_are_what_the_api_document_says(gateway_factory):
    gateway = gateway_factory(team_config())
    team = make_team(gateway, budgets=[{"period": "month", "limit_usd": 12.5}], rpm=5.0)
    assert team["budgets"][0]["limit_usd"] == "12.5" and team["rpm"] == 5  # numbers, too
    # an empty change changes nothing, not even the time of the last change
    unchanged = admin(gateway, "/admin/api/teams/search", "PATCH", json={})
    assert unchanged.status_code == 200 and unchanged.json()["team"] == team
    assert admin(gateway, "/admin/api/teams/nope", "PATCH", json={}).status_code == 404
    # null is no list, object or text: only rpm and tpm take it
    budget = {"period": "day", "limit_usd": "5"}
    for body, param in (
        ({"budgets": None}, "budgets"),
        ({"tags": None}, "tags"),
        ({"description": None}, "description"),
        ({"budgets": [budget, {**budget, "limit_usd": "6"}]}, "budgets"),  # two per day
        ({"budgets": [{**budget, "limit_usd": "0.00"}]}, "budgets"),
        ({"budgets": [{**budget, "limit_usd": "1e3"}]}, "budgets"),
        ({"budgets": [{**budget, "limit_usd": 10**10}]}, "budgets"),  # past 64-bit nano-USD
        ({"budgets": [{**budget, "timezone": "Mars/Olympus"}]}, "budgets"),
        ({"budgets": [{**budget, "timezone": {}}]}, "budgets"),
        ({"budgets": [{**budget, "alert_at_percent": [0]}]}, "budgets"),
        ({"rpm": 2**31}, "rpm"),  # a 32-bit column in PostgreSQL
        ({"tags": {"env": "a\nb"}}, "tags"),
        ({"tags": {"env\n": "prod"}}, "tags"),
    ):
        refused = admin(gateway, "/admin/api/teams/search", "PATCH", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, body
        created = admin(gateway, "/admin/api/teams", "POST", json={"name": "other", **body})
        assert created.status_code == 400, body
    assert [t["name"] for t in admin(gateway, "/admin/api/teams").json()["teams"]] == ["search"]
    assert admin(gateway, "/admin/api/teams/search", "PATCH", json={}).json()["team"] == team
    assert admin(gateway, "/admin/api/teams", "POST", json={"name": "x\n"}).status_code == 400
    # a key's team must exist; nothing of a refused change is written
    secret = team_key(gateway, "svc", None, tags={"service": "crawler"})
    key = next(k for k in admin(gateway, "/admin/api/keys").json()["keys"] if k["name"] == "svc")
    for body in ({"models": ["sim"], "team": "nope"}, {"max_tokens_cap": 5, "tags": None}):
        refused = admin(gateway, f"/admin/api/keys/{key['id']}", "PATCH", json=body)
        assert refused.status_code in (400, 409), refused.text
    lost = admin(gateway, f"/admin/api/keys/{key['id']}", "PATCH", json={"team": "nope"})
    assert lost.status_code == 409 and lost.json()["error"]["code"] == "team_not_found"
    after = next(k for k in admin(gateway, "/admin/api/keys").json()["keys"] if k["name"] == "svc")
    assert after == key
    assert client_for(gateway, secret).chat.completions.create(model="sim", messages=ask()).choices
    for body in ({"tags": None}, {"tags": {"a": 5}}, {"team": "bad name"}, {"team": "nope"}):
        answer = admin(gateway, "/admin/api/keys", "POST", json={"name": "new", **body})
        assert answer.status_code in (400, 409) and answer.json()["error"]["param"] in body
    assert "new" not in {k["name"] for k in admin(gateway, "/admin/api/keys").json()["keys"]}


def test_a_tag_name_with_a_trailing_newline_is_no_tag() -> None:
    """Tag names are matched whole: `$` in a pattern would let "team\\n" through, and a
    newline in a name would split a ledger report line or a Prometheus label."""
    from metergate.errors import InvalidRequest
    from metergate.metering import tags

    assert tags.from_metadata({"team": "search", "team\n": "evil"}) == {"team": "search"}
    with pytest.raises(InvalidRequest, match="tag name"):
        tags.check_tag("team\n", "search", "x-metergate-tags")


def test_a_numeric_budget_limit_is_held_to_nano_usd(gateway_factory):
    """A JSON number is rounded to 9 decimals like a string must be written; one that
    rounds to 0 is refused (a zero limit would refuse every request of the team), and
    what the API answers can be sent back as it is (no "1E-7")."""
    from pydantic import ValidationError

    from metergate.config.model import BudgetConfig

    gateway = gateway_factory(team_config())
    for tiny in (1e-12, 1e-10, 5e-10):
        body = {"name": "tiny", "budgets": [{"period": "day", "limit_usd": tiny}]}
        refused = admin(gateway, "/admin/api/teams", "POST", json=body)
        assert refused.status_code == 400, (tiny, refused.text)
        assert refused.json()["error"]["param"] == "budgets"
    assert admin(gateway, "/admin/api/teams").json()["teams"] == []
    for number, text, nano in (
        (1e-9, "0.000000001", 1),
        (1e-7, "0.0000001", 100),
        (1.0000000004, "1", 10**9),
        (1.0000000006, "1.000000001", 10**9 + 1),
        (250, "250", 250 * 10**9),
    ):
        team = make_team(gateway, budgets=[{"period": "day", "limit_usd": number}])
        assert team["budgets"][0]["limit_usd"] == text, number
        installed = gateway.runtime.plan.budgets.team_budgets()["team:search:day"]
        assert installed.limit_nano == nano, number
        resent = {"budgets": team["budgets"]}
        again = admin(gateway, "/admin/api/teams/search", "PATCH", json=resent)
        assert again.status_code == 200 and again.json()["team"]["budgets"] == team["budgets"]
        assert admin(gateway, "/admin/api/teams/search", "DELETE").status_code == 200
    # a config budget below one nano-USD is refused too
    with pytest.raises(ValidationError, match="one nano-USD"):
        BudgetConfig(limit_usd=1e-12)  # type: ignore[arg-type]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_team_description_is_printable_text(gateway_factory, request, database):
    """Like a tag value: a NUL (which PostgreSQL's text refuses: was a 500), controls and
    bidi overrides (U+202E made the console show "evil" as "live") are a 400 naming
    `description`, the same on both databases; nothing is written."""
    config = team_config()
    if database == "postgresql":
        config["ledger"] = {"url": request.getfixturevalue("fresh_postgres_url")}
    gateway = gateway_factory(config)
    team = make_team(gateway, description="Search — ünïcødé 😀")
    for bad in (
        "a\x00b",
        "<img src=x>\x00\n\u202eevil",
        "\u202eevil",
        "x\u2066y\u2069",
        "a\tb",
        "a\x7f",
        "a\x85b",
        "zero\u200bwidth",
    ):
        refused = admin(gateway, "/admin/api/teams/search", "PATCH", json={"description": bad})
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["param"] == "description", bad
        body = {"name": "other", "description": bad}
        created = admin(gateway, "/admin/api/teams", "POST", json=body)
        assert created.status_code == 400 and created.json()["error"]["param"] == "description"
    assert [t["name"] for t in admin(gateway, "/admin/api/teams").json()["teams"]] == ["search"]
    assert admin(gateway, "/admin/api/teams/search", "PATCH", json={}).json()["team"] == team
    cleared = admin(gateway, "/admin/api/teams/search", "PATCH", json={"description": ""})
    assert cleared.status_code == 200 and cleared.json()["team"]["description"] == ""
