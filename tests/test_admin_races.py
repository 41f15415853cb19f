"""The admin API under concurrency: each check and the write it allows are one step in
the database, so two admin calls at the same moment (on one gateway, or on two processes
sharing the ledger) give the answers they would give one after the other, on SQLite and
PostgreSQL alike."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from metergate.config.model import RolloutConfig
from metergate.rollout import Rollout, store, transitions
from metergate.rollout.gates import Observed
from metergate.storage.database import open_database
from tests.harness import BackgroundLoop, Gateway, two_gateways
from tests.services import GatewayProcess
from tests.test_console_api import ADMIN_KEY, base, console_config

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROUNDS = 20


@pytest.fixture
def pair(
    bg: BackgroundLoop, tmp_path: Path, database_url: str
) -> Iterator[Callable[..., tuple[Gateway, Gateway]]]:
    """Two gateways on one ledger database: two processes of a fleet, each with its own
    memory (its own `Rollout` objects and key index)."""
    started: list[Gateway] = []

    def make(config: dict[str, Any] | None = None) -> tuple[Gateway, Gateway]:
        config = {**(config or console_config()), "ledger": {"url": database_url}}
        return two_gateways(bg, config, tmp_path, started)

    yield make
    for gateway in started:
        gateway.stop()


def client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base(gateway), headers=HEADERS, timeout=30)


def assert_admin_error(answer: httpx.Response, status: int, code: str | None) -> None:
    """An OpenAI-shaped error with a message, and the admin headers."""
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"], error
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["content-security-policy"].startswith("default-src 'none'")


# -- rollouts ---------------------------------------------------------------------------

# After a rollback, only a new start may follow.
AFTER_ROLLBACK = {"started"}


def impossible_sequences(events: list[str]) -> list[tuple[str, str]]:
    return [
        (a, b)
        for a, b in itertools.pairwise(events)
        if a == "rolled_back" and b not in AFTER_ROLLBACK
    ]


async def test_an_action_decided_on_a_state_another_process_changed_is_refused(
    database_url: str,
):
    """Two processes hold the rollout loaded as running; one rolls it back. The other's
    promotion was checked against a state that is gone: refused, nothing written."""
    config = console_config()["rollouts"]["move"]
    database = await open_database(database_url)
    try:
        first = Rollout("move", RolloutConfig.model_validate(config))
        second = Rollout("move", RolloutConfig.model_validate(config))
        await transitions.start(database, first)
        assert await store.load(database, second) and second.state == "running"
        await transitions.rollback(database, first)
        with pytest.raises(transitions.TransitionRefused, match="another action changed it"):
            await transitions.promote(database, second)
        assert (second.state, second.stage) == ("rolled_back", 0)  # the database's state
        events = [row[1] for row in await store.events(database, "move")]
        assert events == ["started", "rolled_back"]
        # two processes starting a new rollout at once: one start
        third = Rollout("other", RolloutConfig.model_validate(config))
        fourth = Rollout("other", RolloutConfig.model_validate(config))
        await transitions.start(database, third)
        with pytest.raises(transitions.TransitionRefused):
            await transitions.start(database, fourth)
        assert [row[1] for row in await store.events(database, "other")] == ["started"]
    finally:
        await database.close()


async def test_concurrent_rollback_and_promote_never_undo_an_acknowledged_rollback(pair):
    a, b = pair()
    async with client(a) as on_a, client(b) as on_b:
        outcomes = []
        for i in range(ROUNDS):
            started = await on_a.post("/admin/api/rollouts/move/start")
            assert started.status_code == 200, started.text
            # the same gateway on even rounds, two processes on odd ones
            promoter = on_a if i % 2 == 0 else on_b
            rolled, promoted = await asyncio.gather(
                on_a.post("/admin/api/rollouts/move/rollback"),
                promoter.post("/admin/api/rollouts/move/promote"),
            )
            assert rolled.status_code == 200, rolled.text  # running or promoted: allowed
            if promoted.status_code != 200:
                assert_admin_error(promoted, 409, "transition_refused")
            final = (await on_b.get("/admin/api/rollouts")).json()["rollouts"][0]
            assert final["state"] == "rolled_back", (i, promoted.status_code, final["history"])
            outcomes.append(promoted.status_code)
    events = [row[1] for row in a.bg.run(store.events(a.runtime.database, "move", 10 * ROUNDS))]
    assert len(events) == ROUNDS * 2 + outcomes.count(200)
    assert impossible_sequences(events) == []


@pytest.mark.parametrize("operator", ["same process", "other process"])
def test_an_operator_rollback_during_a_controller_judgment_stands(
    pair, operator: str, monkeypatch: pytest.MonkeyPatch
):
    """A controller asks Prometheus for a stage's numbers (which may take seconds);
    meanwhile an operator rolls back, on the controller's gateway or another one. The
    rollback answers at once, and the judgment of the stage that no longer runs, a
    pass, promotes nothing."""
    import metergate.rollout.controller as controller

    asked, release = threading.Event(), threading.Event()
    judging = {"started": 0, "finished": 0}
    healthy = Observed(attempts=100, error_rate=0.0, p99_seconds=0.1, server_errors=0)

    async def slow_prometheus(*args: Any) -> tuple[Observed, Observed]:
        asked.set()
        await asyncio.to_thread(release.wait, 30)  # a query that takes its time
        return healthy, healthy

    decide = controller.RolloutController._decide

    async def decide_and_count(self: Any, *args: Any) -> None:
        judging["started"] += 1
        try:
            await decide(self, *args)
        finally:
            judging["finished"] += 1

    monkeypatch.setattr(controller, "prometheus_observations", slow_prometheus)
    monkeypatch.setattr(controller.RolloutController, "_decide", decide_and_count)
    config = console_config()
    config["rollouts"]["move"].update(
        source="prometheus", prometheus_url="http://127.0.0.1:9", interval_seconds=0.2
    )
    a, b = pair(config)
    assert admin_post(a, "/admin/api/rollouts/move/start").status_code == 200
    assert asked.wait(30), "the controller never judged the stage"
    rolled = admin_post(a if operator == "same process" else b, "/admin/api/rollouts/move/rollback")
    assert rolled.status_code == 200, rolled.text
    assert not release.is_set() and judging["finished"] == 0  # answered while it judged
    release.set()
    deadline = time.monotonic() + 30
    while judging["finished"] < judging["started"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert judging["finished"] == judging["started"]
    listed = httpx.get(base(b) + "/admin/api/rollouts", headers=HEADERS, timeout=10)
    final = listed.json()["rollouts"][0]
    assert final["state"] == "rolled_back"
    assert [event["event"] for event in final["history"]] == ["started", "rolled_back"]


def admin_post(gateway: Gateway, path: str) -> httpx.Response:
    return httpx.post(base(gateway) + path, headers=HEADERS, timeout=10)


# -- keys -------------------------------------------------------------------------------


async def test_keys_created_with_one_name_at_once_give_one_key_and_409s(pair):
    a, b = pair()
    async with client(a) as on_a, client(b) as on_b:
        answers = await asyncio.gather(
            *(
                (on_a if i % 2 else on_b).post("/admin/api/keys", json={"name": "racer"})
                for i in range(20)
            )
        )
    created = [r for r in answers if r.status_code == 201]
    assert len(created) == 1, [r.status_code for r in answers]
    for answer in answers:
        if answer.status_code != 201:
            assert_admin_error(answer, 409, "key_name_taken")
            assert "revoke it first or pick another name" in answer.json()["error"]["message"]
    rows = a.bg.run(a.runtime.database.fetch("SELECT id FROM keys WHERE name = 'racer'"))
    assert rows == [(created[0].json()["key"]["id"],)]


def test_a_bug_in_an_admin_endpoint_is_a_500_with_the_admin_headers(
    gateway_factory, monkeypatch: pytest.MonkeyPatch
):
    import metergate.api.admin_api as admin_api

    async def broken(*args: Any) -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(admin_api, "rollouts", broken)
    monkeypatch.setattr(admin_api.console_keys, "revoke_key_by_id", broken)
    gateway = gateway_factory(console_config())
    for method, path in (
        ("GET", "/admin/api/rollouts"),  # an exact path
        ("POST", "/admin/api/keys/key_0/revoke"),  # a path with an id
    ):
        answer = httpx.request(
            method,
            base(gateway) + path,
            headers={**HEADERS, "x-request-id": "req-bug-1"},
            timeout=10,
        )
        assert_admin_error(answer, 500, None)
        error = answer.json()["error"]
        assert error["type"] == "api_error"
        assert "quote request id req-bug-1" in error["message"]
        assert answer.headers["x-frame-options"] == "DENY"


# -- teams ------------------------------------------------------------------------------


async def test_a_key_never_joins_a_team_deleted_at_the_same_moment(pair):
    """Create a key into a team while the team is deleted, on one gateway or two: either
    the key is created and the delete is a 409 (the team is in use), or the team is gone
    and the key creation is a 409 naming it; never both 2xx."""
    a, b = pair()
    seen: set[tuple[int, int]] = set()
    async with client(a) as on_a, client(b) as on_b:
        for i in range(ROUNDS):
            team = f"race{i}"
            made = await on_a.post("/admin/api/teams", json={"name": team})
            assert made.status_code == 201, made.text
            creator = on_a if i % 2 == 0 else on_b
            key, deleted = await asyncio.gather(
                creator.post("/admin/api/keys", json={"name": f"rk{i}", "team": team}),
                on_a.delete(f"/admin/api/teams/{team}"),
            )
            seen.add((key.status_code, deleted.status_code))
            if key.status_code == 201:
                assert_admin_error(deleted, 409, "team_in_use")
                assert f"rk{i}" in deleted.json()["error"]["message"]
            else:
                assert deleted.status_code == 200, deleted.text
                assert_admin_error(key, 409, "team_not_found")
                assert "create it first" in key.json()["error"]["message"]
    assert seen <= {(201, 409), (409, 200)}
    orphans = a.bg.run(
        a.runtime.database.fetch(
            "SELECT k.name FROM keys k LEFT JOIN teams t ON t.name = k.team "
            "WHERE k.team IS NOT NULL AND t.name IS NULL"
        )
    )
    assert orphans == []


async def test_a_key_never_moves_into_a_team_deleted_at_the_same_moment(pair):
    a, b = pair()
    async with client(a) as on_a, client(b) as on_b:
        made = await on_a.post("/admin/api/keys", json={"name": "mover"})
        key_id = made.json()["key"]["id"]
        for i in range(ROUNDS):
            team = f"move{i}"
            assert (await on_a.post("/admin/api/teams", json={"name": team})).status_code == 201
            moved, deleted = await asyncio.gather(
                (on_a if i % 2 == 0 else on_b).patch(
                    f"/admin/api/keys/{key_id}", json={"team": team}
                ),
                on_a.delete(f"/admin/api/teams/{team}"),
            )
            if moved.status_code == 200:
                assert_admin_error(deleted, 409, "team_in_use")
                left = await on_a.patch(f"/admin/api/keys/{key_id}", json={"team": None})
                assert left.status_code == 200, left.text
            else:
                assert deleted.status_code == 200, deleted.text
                assert_admin_error(moved, 409, "team_not_found")
    (row,) = a.bg.run(a.runtime.database.fetch("SELECT team FROM keys WHERE name = 'mover'"))
    assert row == (None,)


# -- concurrent changes of different fields -----------------------------------------------


async def test_concurrent_patches_of_different_key_fields_keep_both(pair):
    a, b = pair()
    async with client(a) as on_a, client(b) as on_b:
        for i in range(ROUNDS):
            made = await on_a.post("/admin/api/keys", json={"name": f"both{i}"})
            key_id = made.json()["key"]["id"]
            path = f"/admin/api/keys/{key_id}"
            other = on_a if i % 2 == 0 else on_b
            answers = await asyncio.gather(
                on_a.patch(path, json={"max_tokens_cap": 99}),
                other.patch(path, json={"models": ["chat"]}),
                other.patch(path, json={"tags": {"round": str(i)}}),
                on_a.patch(path, json={}),  # changes nothing, and writes nothing
            )
            assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
            (key,) = [
                k for k in (await on_b.get("/admin/api/keys")).json()["keys"] if k["id"] == key_id
            ]
            assert (key["max_tokens_cap"], key["models"], key["tags"]) == (
                99,
                ["chat"],
                {"round": str(i)},
            ), i


async def test_concurrent_patches_of_different_team_fields_keep_both(pair):
    a, b = pair()
    budget = {"period": "day", "limit_usd": "7", "timezone": "Europe/Berlin"}
    async with client(a) as on_a, client(b) as on_b:
        for i in range(ROUNDS):
            team = f"t{i}"
            assert (await on_a.post("/admin/api/teams", json={"name": team})).status_code == 201
            path = f"/admin/api/teams/{team}"
            other = on_a if i % 2 == 0 else on_b
            answers = await asyncio.gather(
                on_a.patch(path, json={"description": f"set-by-A {i}"}),
                other.patch(path, json={"rpm": 77}),
                other.patch(path, json={"budgets": [budget]}),
            )
            assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
            (found,) = [
                t for t in (await on_b.get("/admin/api/teams")).json()["teams"] if t["name"] == team
            ]
            assert found["description"] == f"set-by-A {i}" and found["rpm"] == 77, found
            assert [(x["limit_usd"], x["timezone"]) for x in found["budgets"]] == [
                ("7", "Europe/Berlin")
            ], found


# -- `serve --workers 2`: processes that share nothing but the ledger --------------------


async def test_rollout_actions_and_key_names_hold_across_serve_workers(
    tmp_path: Path, database_url: str
):
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(console_config(ledger={"url": database_url})))
    gateway = GatewayProcess(config_path, tmp_path, workers=2)
    # no keep-alive: each request on a new connection, so they spread over the workers
    fresh = httpx.Limits(max_keepalive_connections=0)
    try:
        gateway.wait_ready(timeout=60)
        async with httpx.AsyncClient(
            base_url=gateway.base_url, headers=HEADERS, timeout=30, limits=fresh
        ) as http:
            for i in range(ROUNDS):
                assert (await http.post("/admin/api/rollouts/move/start")).status_code == 200
                rolled, promoted = await asyncio.gather(
                    http.post("/admin/api/rollouts/move/rollback"),
                    http.post("/admin/api/rollouts/move/promote"),
                )
                assert rolled.status_code == 200, rolled.text
                if promoted.status_code != 200:
                    assert_admin_error(promoted, 409, "transition_refused")
                final = (await http.get("/admin/api/rollouts")).json()["rollouts"][0]
                assert final["state"] == "rolled_back", (i, final["history"])
                history = [event["event"] for event in final["history"]]
                assert impossible_sequences(history) == [], history
            answers = await asyncio.gather(
                *(http.post("/admin/api/keys", json={"name": "racer"}) for _ in range(10))
            )
            assert sorted(r.status_code for r in answers) == [201] + [409] * 9
            for answer in answers:
                if answer.status_code == 409:
                    assert_admin_error(answer, 409, "key_name_taken")
    finally:
        gateway.kill_all()
