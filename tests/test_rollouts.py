"""Staged rollouts: promotion, holding on thin data, automatic rollback, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import openai
import pytest
import yaml
from aiohttp import web
from typer.testing import CliRunner

import metergate.runtime as runtime_module
from metergate.cli import app as cli_app
from metergate.config import ConfigError, parse_config
from metergate.config.model import ProviderConfig, RolloutConfig
from metergate.providers import Adapter, build_adapter
from metergate.rollout import Rollout, store, transitions
from metergate.rollout.gates import Observed, judge
from metergate.storage.database import Database, Transaction, open_database
from metergate.storage.migrations import migrate
from tests.harness import Gateway, UpstreamServer, start_gateway, two_gateways, write_config
from tests.services import GatewayProcess, ServerProcess, run_prometheus
from tests.test_ledger import wait_for
from tests.test_metrics_workers import metrics_dir_of
from tests.upstreams.fault_server import Fault, FaultServer

ASK = [{"role": "user", "content": "roll"}]


def rollout_config(base: FaultServer, cand: FaultServer, **rollout: object) -> dict:
    provider = {"type": "openai", "api_key": "sk-test", "timeouts": {"first_byte": 2}}
    return {
        "providers": {
            "base-p": {**provider, "base_url": f"{base.url}/v1"},
            "cand-p": {**provider, "base_url": f"{cand.url}/v1"},
        },
        "upstreams": {
            "base": {"provider": "base-p", "model": "m", "price": {"input": 1}},
            "cand": {
                "provider": "cand-p",
                "model": "m",
                "price": {"input": 1},
                "circuit": {"enabled": False},
            },
        },
        "models": {"m": {"upstreams": ["base"], "retry": {"max_retries": 1, "backoff_base": 0.01}}},
        "retry_budget": {"ratio": 1.0, "min_per_second": 100},
        "rollouts": {
            "move": {
                "model": "m",
                "baseline": ["base"],
                "candidate": ["cand"],
                "interval_seconds": 0.4,
                "failure_threshold": 2,
                "min_requests": 5,
                **rollout,
            }
        },
    }


@pytest.fixture
def servers(bg):
    base, cand = FaultServer(bg, "base"), FaultServer(bg, "cand")
    yield base, cand
    base.close()
    cand.close()


def rollout_of(gateway: Gateway):
    return gateway.runtime.plan.rollouts.rollouts["move"]


def start_rollout(gateway: Gateway) -> None:
    gateway.bg.run(transitions.start(gateway.runtime.database, rollout_of(gateway)))


async def load_until(
    gateway: Gateway,
    done: Callable[[], bool],
    limit: float,
    on_tick: Callable[[], None] = lambda: None,
) -> list[str]:
    """Steady traffic from 6 callers until `done()` or `limit` seconds; every outcome."""
    client = gateway.async_client()
    outcomes: list[str] = []
    deadline = time.monotonic() + limit

    async def caller() -> None:
        while not done() and time.monotonic() < deadline:
            on_tick()
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="m", messages=ASK
                )
                outcomes.append(raw.headers["x-metergate-upstream"])
            except openai.APIError as error:
                outcomes.append(f"error {error}")
            await asyncio.sleep(0.005)

    await asyncio.gather(*(caller() for _ in range(6)))
    return outcomes


async def test_healthy_candidate_is_promoted_through_every_stage(gateway_factory, servers):
    base, cand = servers
    gateway = gateway_factory(rollout_config(base, cand, stages=[20, 50, 100]))
    start_rollout(gateway)
    rollout = rollout_of(gateway)
    outcomes = await load_until(gateway, lambda: rollout.state == "completed", 15)
    assert rollout.state == "completed"
    assert all(not outcome.startswith("error") for outcome in outcomes)
    events = [row[1] for row in gateway.bg.run(store.events(gateway.runtime.database, "move"))]
    assert events == ["started", "promoted", "promoted", "completed"]
    # completed: all traffic on the candidate
    after = await load_until(gateway, lambda: False, 0.3)
    assert set(after) == {"cand"}
    assert gateway.metric("metergate_rollout_weight", rollout="move", target="cand") == 1.0
    assert (
        gateway.metric("metergate_rollout_transitions_total", rollout="move", event="promoted") == 2
    )


async def test_degrading_candidate_is_rolled_back_and_no_caller_notices(
    gateway_factory, servers, caplog, bg
):
    caplog.set_level(logging.INFO, logger="metergate.rollout")
    notices: list[dict] = []
    all_four = threading.Event()

    async def hook(request: web.Request) -> web.Response:
        notices.append(await request.json())
        if len(notices) >= 4:
            all_four.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = UpstreamServer(bg, app)
    base, cand = servers
    gateway = gateway_factory(
        rollout_config(base, cand, stages=[20, 50, 100], webhook_url=f"{receiver.url}/hook")
    )
    start_rollout(gateway)
    rollout = rollout_of(gateway)
    degraded_at: list[float] = []

    def degrade_at_second_stage() -> None:
        if rollout.stage == 1 and not degraded_at:
            cand.plan.fail_until_cleared(Fault.error(500))
            degraded_at.append(time.monotonic())

    try:
        outcomes = await load_until(
            gateway, lambda: rollout.state == "rolled_back", 15, degrade_at_second_stage
        )
        rolled_back_after = time.monotonic() - degraded_at[0]
        after = await load_until(gateway, lambda: False, 0.3)
        await asyncio.to_thread(all_four.wait, 5)
    finally:
        receiver.close()
    assert rollout.state == "rolled_back"
    # two failed judgments, one interval apart, plus a controller tick of slack
    assert rolled_back_after <= 0.4 * 2 + 0.4 + 0.5
    assert all(not outcome.startswith("error") for outcome in outcomes + after)
    assert set(after) == {"base"}
    rows = gateway.ledger_rows("model = 'm'")
    assert len(rows) == len(outcomes) + len(after)
    assert all(row["outcome"] == "success" for row in rows)
    assert any(row["attempts"] == 2 and row["upstream"] == "base" for row in rows)
    assert [n["event"] for n in notices] == ["started", "promoted", "gate_failed", "rolled_back"]
    assert notices[-1]["detail"]["judgment"]["failed_gates"]
    assert "'move' (m): rolled_back" in caplog.text
    assert gateway.metric("metergate_rollout_weight", rollout="move", target="cand") == 0.0
    assert (
        gateway.metric("metergate_rollout_transitions_total", rollout="move", event="rolled_back")
        == 1
    )


async def test_a_candidate_that_fails_every_call_is_rolled_back_behind_its_open_circuit(
    gateway_factory, servers
):
    """The candidate's breaker opens after a few failures and lets a probe through now
    and then: the candidate itself never sees `min_requests` (50), but the requests its
    open circuit turns away count as its failures, so it rolls back. Meanwhile every
    failed candidate attempt is served by the baseline although the model allows no
    retry and the retry budget is the default: no caller sees the bad candidate, nor
    pays for it."""
    base, cand = servers
    cand.plan.fail_until_cleared(Fault.error(500))
    config = rollout_config(base, cand, stages=[50, 100], min_requests=50)
    config["upstreams"]["cand"]["circuit"] = {"open_seconds": 0.5}
    config["models"]["m"]["retry"] = {"max_retries": 0}
    del config["retry_budget"]
    gateway = gateway_factory(config)
    start_rollout(gateway)
    rollout = rollout_of(gateway)
    outcomes = await load_until(gateway, lambda: rollout.state == "rolled_back", 20)
    assert rollout.state == "rolled_back"
    assert cand.plan.requests < 50
    assert "error_rate" in rollout.last_judgment["failed_gates"]
    assert outcomes and all(outcome == "base" for outcome in outcomes)
    rows = gateway.ledger_rows("model = 'm'")
    assert len(rows) == len(outcomes)
    assert all((row["outcome"], row["upstream"]) == ("success", "base") for row in rows)
    assert any(row["attempts"] == 2 for row in rows)


def at_last_stage(gateway: Gateway) -> None:
    """Start the rollout and promote it to its last stage: all traffic on the candidate."""
    start_rollout(gateway)
    rollout = rollout_of(gateway)
    while rollout.weight < 1:
        gateway.bg.run(transitions.promote(gateway.runtime.database, rollout))
    assert rollout.state == "running"


async def test_at_the_last_stage_a_failing_candidate_is_served_by_the_baseline(
    gateway_factory, servers
):
    """At 100 % the rollout is not over: a failed candidate attempt is tried again on the
    baseline, and once the candidate's circuit opens the baseline serves its requests
    (no 503 "circuits open"). Once the rollout completes, the baseline serves no more."""
    base, cand = servers
    cand.plan.fail_until_cleared(Fault.error(500))
    config = rollout_config(base, cand, stages=[50, 100], interval_seconds=600)
    config["upstreams"]["cand"]["circuit"] = {"failure_threshold": 3, "open_seconds": 600}
    config["models"]["m"]["retry"] = {"max_retries": 0}
    del config["retry_budget"]
    gateway = gateway_factory(config)
    at_last_stage(gateway)
    breaker = gateway.runtime.plan.router.deployments["cand"].breaker
    outcomes = await load_until(gateway, lambda: breaker.state == 2 and base.plan.requests > 30, 10)
    assert breaker.state == 2  # open
    assert outcomes and all(outcome == "base" for outcome in outcomes)
    rows = gateway.ledger_rows("model = 'm'")
    assert all((row["outcome"], row["upstream"]) == ("success", "base") for row in rows)
    assert any(row["attempts"] == 2 for row in rows)  # the candidate failed, then the baseline
    assert any(row["attempts"] == 1 for row in rows)  # the candidate's open circuit: baseline
    gateway.bg.run(transitions.promote(gateway.runtime.database, rollout_of(gateway)))
    assert rollout_of(gateway).state == "completed"
    served = base.plan.requests
    with pytest.raises(openai.APIStatusError) as refused:
        await gateway.async_client().chat.completions.create(model="m", messages=ASK)
    assert refused.value.status_code == 503
    assert base.plan.requests == served


@pytest.mark.parametrize("fault", [Fault.error(503), Fault.error(401)])
async def test_a_failed_candidate_attempt_goes_to_the_baseline_whatever_retry_on_says(
    gateway_factory, servers, fault
):
    """`retry_on` chooses which failures a model retries on its own deployments; it left
    out the candidate's 503 (or a 401 of its misconfigured key, never retried) and that
    reached the caller. The baseline is the model's own upstream from before the move:
    it serves what the candidate fails, as the README promises."""
    base, cand = servers
    cand.plan.fail_until_cleared(fault)
    config = rollout_config(base, cand, stages=[50, 100], interval_seconds=600)
    config["models"]["m"]["retry"] = {"max_retries": 0, "retry_on": ["connection_error"]}
    gateway = gateway_factory(config)
    at_last_stage(gateway)
    outcomes = await load_until(gateway, lambda: cand.plan.requests >= 10, 10)
    assert cand.plan.requests >= 10
    assert outcomes and all(outcome == "base" for outcome in outcomes)
    rows = gateway.ledger_rows("model = 'm'")
    assert all(
        (row["outcome"], row["upstream"], row["attempts"]) == ("success", "base", 2) for row in rows
    )


async def test_a_candidate_behind_its_open_circuit_at_the_last_stage_is_rolled_back(
    gateway_factory, servers
):
    """The candidate's circuit opens and stays open (600 s, no probe in this test): the
    requests it turns away count as its failures, so the stage fails on them and rolls
    back within a few intervals instead of holding for want of candidate attempts."""
    base, cand = servers
    cand.plan.fail_until_cleared(Fault.error(500))
    config = rollout_config(base, cand, stages=[50, 100], min_requests=50)
    config["upstreams"]["cand"]["circuit"] = {"failure_threshold": 3, "open_seconds": 600}
    gateway = gateway_factory(config)
    at_last_stage(gateway)
    rollout = rollout_of(gateway)
    outcomes = await load_until(gateway, lambda: rollout.state == "rolled_back", 20)
    assert rollout.state == "rolled_back"
    # judged on the requests its circuit turned away: it took fewer than `min_requests`
    # itself, and got no probe (still open); without them, the stage would hold
    assert gateway.runtime.plan.router.deployments["cand"].breaker.state == 2  # open
    assert cand.plan.requests < 50
    judgment = rollout.last_judgment
    assert judgment["candidate"]["attempts"] > 0 and judgment["candidate"]["error_rate"] == 1
    assert "error_rate" in judgment["failed_gates"]
    assert outcomes and all(outcome == "base" for outcome in outcomes)
    after = await load_until(gateway, lambda: False, 0.3)
    assert set(after) == {"base"}


async def test_a_rollout_is_judged_on_its_own_models_traffic_only(gateway_factory, servers):
    """Another model served by the candidate's upstream fails there (its callers' bad
    requests, say): that says nothing about moving `m`, which sends the rollout no
    traffic here, so its judgments only hold the stage."""
    base, cand = servers
    config = rollout_config(base, cand)
    config["models"]["other"] = {"upstreams": ["cand"], "retry": {"max_retries": 0}}
    gateway = gateway_factory(config)
    start_rollout(gateway)
    rollout = rollout_of(gateway)
    cand.plan.fail_until_cleared(Fault.error(400))
    client = gateway.async_client()

    def held() -> float:
        return gateway.metric("metergate_rollout_transitions_total", rollout="move", event="held")

    deadline = time.monotonic() + 20
    while held() < 3 and rollout.state == "running" and time.monotonic() < deadline:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="other", messages=ASK)
    assert (rollout.state, rollout.failures) == ("running", 0)
    assert held() >= 3 and cand.plan.requests >= 5  # more than min_requests failed there
    assert rollout.last_judgment["verdict"] == "insufficient"


def test_too_few_attempts_fail_only_when_more_could_not_change_the_verdict():
    config = RolloutConfig(
        model="m", baseline=["b"], candidate=["c"], min_requests=50, gates={"max_5xx": 10}
    )
    few = Observed(attempts=6, error_rate=1.0, p99_seconds=0.1, server_errors=0)
    assert judge(config, few, None)["verdict"] == "fail"  # 6 errors > 10 % of 50
    some = Observed(attempts=5, error_rate=0.8, p99_seconds=0.1, server_errors=0)
    assert judge(config, some, None)["verdict"] == "insufficient"  # 4 errors: could pass
    slow = Observed(attempts=2, error_rate=0.0, p99_seconds=99.0, server_errors=0)
    assert judge(config, slow, None)["verdict"] == "insufficient"  # a p99 of 2 settles nothing
    broken = Observed(attempts=11, error_rate=1.0, p99_seconds=0.1, server_errors=11)
    verdict = judge(config, broken, None)
    assert verdict["verdict"] == "fail" and "server_errors" in verdict["failed_gates"]


async def test_too_little_traffic_holds_the_stage(gateway_factory, servers):
    base, cand = servers
    gateway = gateway_factory(rollout_config(base, cand, stages=[20, 100], min_requests=10_000))
    start_rollout(gateway)
    rollout = rollout_of(gateway)
    await load_until(gateway, lambda: False, 1.5)
    assert (rollout.state, rollout.stage) == ("running", 0)
    assert rollout.last_judgment["verdict"] == "insufficient"
    assert gateway.metric("metergate_rollout_transitions_total", rollout="move", event="held") >= 2


async def test_sticky_by_key_keeps_a_caller_on_one_side(gateway_factory, servers):
    base, cand = servers
    gateway = gateway_factory(
        rollout_config(base, cand, stages=[50, 100], sticky="key", interval_seconds=60)
    )
    start_rollout(gateway)
    sides = set()
    for name in ("svc-a", "svc-b", "svc-c", "svc-d", "svc-e", "svc-f"):
        client = openai.AsyncOpenAI(
            base_url=gateway.base_url, api_key=gateway.new_key(name), max_retries=0
        )
        seen = {
            (
                await client.chat.completions.with_raw_response.create(model="m", messages=ASK)
            ).headers["x-metergate-upstream"]
            for _ in range(8)
        }
        assert len(seen) == 1, f"{name} flipped between {seen}"
        sides |= seen
    assert sides == {"base", "cand"}  # 6 keys at 50%: both sides in use


def test_restart_finds_the_rollout_where_it_was(bg, tmp_path, servers):
    base, cand = servers
    config = rollout_config(base, cand, interval_seconds=600)
    first = start_gateway(bg, config, tmp_path)
    try:
        start_rollout(first)
        bg.run(transitions.promote(first.runtime.database, rollout_of(first)))
        bg.run(transitions.promote(first.runtime.database, rollout_of(first)))
    finally:
        first.stop()
    second = start_gateway(bg, config, tmp_path, key_name="again")
    try:
        rollout = rollout_of(second)
        assert (rollout.state, rollout.stage, rollout.weight) == ("running", 2, 0.5)
        assert second.metric("metergate_rollout_weight", rollout="move", target="cand") == 0.5
    finally:
        second.stop()


async def test_a_controller_that_fails_every_tick_says_so_once_and_again_when_it_recovers(
    gateway_factory, servers, caplog, monkeypatch
):
    """The lease table gone (a database restored without it, a role without its grant):
    every tick fails, about ten a second here. One traceback says why, not one a tick;
    the recovery is said once."""
    caplog.set_level(logging.INFO, logger="metergate.rollout")
    base, cand = servers
    gateway = gateway_factory(rollout_config(base, cand))
    database = gateway.runtime.database
    ticks = 0
    take_lease = store.take_lease

    async def counted(*args: object) -> bool:
        nonlocal ticks
        ticks += 1
        return await take_lease(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "take_lease", counted)

    def said(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "metergate.rollout" and text in r.message]

    await asyncio.wrap_future(
        gateway.bg.submit(database.execute("ALTER TABLE leases RENAME TO gone"))
    )
    await wait_for(lambda: ticks >= 3 and said("failed"))
    failing_from = ticks
    await wait_for(lambda: ticks >= failing_from + 10)
    failed = said("failed")
    assert len(failed) == 1 and failed[0].exc_info is not None, [r.message for r in failed]
    assert failed[0].message == "the rollout controller's tick failed; retrying"
    await asyncio.wrap_future(
        gateway.bg.submit(database.execute("ALTER TABLE gone RENAME TO leases"))
    )
    await wait_for(lambda: said("works again"))
    assert said("works again")[0].message.startswith(
        "the rollout controller's tick works again after "
    )
    assert len(said("failed")) == 1


def announced(gateway: Gateway, event: str) -> float:
    """How many times this gateway announced `event` of the rollout (its counter)."""
    return gateway.metric("metergate_rollout_transitions_total", rollout="move", event=event)


def leads(gateway: Gateway) -> bool:
    return gateway.runtime.plan.rollouts.leader


async def test_each_transition_is_announced_once_as_the_lease_changes_hands(
    bg, tmp_path, servers, database_url
):
    """Each process kept where it had announced up to in its memory, from its own start:
    a follower that took the lease over announced again what the leader had, and a new
    process skipped what a dying leader had not announced yet. The position is kept in
    the database with the lease, so a new leader goes on from where the last stopped."""
    base, cand = servers
    config = {**rollout_config(base, cand, interval_seconds=600), "ledger": {"url": database_url}}
    started: list[Gateway] = []
    try:
        first, second = two_gateways(bg, config, tmp_path, started)
        await wait_for(lambda: leads(first) or leads(second))
        leader, follower = (first, second) if leads(first) else (second, first)
        database, rollout = leader.runtime.database, rollout_of(leader)
        for action in (transitions.start, transitions.pause, transitions.resume):
            await asyncio.wrap_future(bg.submit(transitions.apply(database, rollout, action, "t")))
        await wait_for(lambda: announced(leader, "resumed") == 1)
        started.remove(leader)
        leader.stop()
        await wait_for(lambda: leads(follower), within=20)
        database, rollout = follower.runtime.database, rollout_of(follower)
        await asyncio.wrap_future(
            bg.submit(transitions.apply(database, rollout, transitions.promote, "t"))
        )
        await wait_for(lambda: announced(follower, "promoted") == 1)
        for event in ("started", "paused", "resumed"):
            assert (announced(leader, event), announced(follower, event)) == (1, 0), event
    finally:
        for gateway in started:
            gateway.stop()


def test_a_transition_made_while_the_gateway_was_down_is_announced_at_its_restart(
    bg, tmp_path, servers
):
    """`rollout rollback` from the CLI while no gateway runs: the next gateway to hold
    the lease announces it (log line, counter, webhook), and nothing from before."""
    base, cand = servers
    config = rollout_config(base, cand, interval_seconds=600)
    first = start_gateway(bg, config, tmp_path)
    try:
        start_rollout(first)
        bg.run(wait_for(lambda: announced(first, "started") == 1))
    finally:
        first.stop()
    rolled = CliRunner().invoke(
        cli_app, ["rollout", "rollback", "move", "-c", str(tmp_path / "gateway.yaml")]
    )
    assert rolled.exit_code == 0, rolled.output
    second = start_gateway(bg, config, tmp_path, key_name="again")
    try:
        bg.run(wait_for(lambda: announced(second, "rolled_back") == 1, within=20))
        assert announced(second, "started") == 0
    finally:
        second.stop()


def test_the_cli_warns_of_a_rollout_the_gateways_do_not_run_yet(gateway_factory, servers):
    """A rollout added to the file but not reloaded: `rollout start` records its state
    (the reload takes it up), yet no traffic moves until then, which start and status
    say, naming the version the gateways run; once it is applied they say nothing."""
    base, cand = servers
    config = rollout_config(base, cand)
    without = {name: value for name, value in config.items() if name != "rollouts"}
    gateway = gateway_factory(without)
    path = Path(gateway.runtime.source)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **config}))
    version = gateway.runtime.plan.version

    def cli(*args: str) -> str:
        done = CliRunner().invoke(cli_app, ["rollout", *args, "move", "-c", str(path)])
        assert done.exit_code == 0, done.output
        return " ".join(done.output.split())

    warning = (
        f"warning: the gateways run config version {version}, which has no rollout 'move': "
        "no traffic moves until a config with it is applied (metergate config reload)"
    )
    started = cli("start")
    assert "rollout move: started" in started and warning in started
    assert warning in cli("status")
    assert gateway.bg.run(gateway.runtime.reload_from_source("test"))
    assert "warning" not in cli("status")


async def test_a_ledger_from_before_the_position_was_kept_announces_no_history(tmp_path):
    """Upgrading: the events already there were announced by the gateway that recorded
    them (or left unannounced by it long ago), so they are not all announced again at
    once; what comes after them is."""
    database = await open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        await migrate(database)
        await database.execute("ALTER TABLE leases DROP COLUMN announced")
        await database.execute("DELETE FROM leases")
        await database.execute("DELETE FROM schema_migrations WHERE version = 13")
        for event in ("started", "promoted", "rolled_back"):
            await database.execute(
                "INSERT INTO rollout_events (ts, rollout, event, stage, detail)"
                " VALUES (0, 'move', ?, 0, '{}')",
                (event,),
            )
        assert await migrate(database) == [13]
        position, rows = await store.unannounced(database)
        assert (position, rows) == (3, [])
    finally:
        await database.close()


class PausedAfterEvent:
    """The ledger database as `store.save` uses it, its transaction held open once the
    event is inserted, until `go` is set."""

    def __init__(self, database: Database) -> None:
        self.database, self.inserted, self.go = database, asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.database.transaction() as tx:
            execute = tx.execute

            async def paused(sql: str, params: Sequence[object] = ()) -> int:
                changed = await execute(sql, params)
                if sql.startswith("INSERT INTO rollout_events"):
                    self.inserted.set()
                    await self.go.wait()
                return changed

            tx.execute = paused  # type: ignore[method-assign]
            yield tx


async def test_an_event_recorded_while_an_earlier_one_commits_waits_for_it(fresh_postgres_url):
    """Two rollouts' transitions recorded at once on PostgreSQL: the event given the lower
    id must be visible first, or the announcer, which goes on from the highest id it
    announced, would skip it for good (a rollback no webhook ever told)."""
    database = await open_database(fresh_postgres_url)
    try:
        await migrate(database)
        config = RolloutConfig(model="m", baseline=["a"], candidate=["b"])
        paused = PausedAfterEvent(database)
        earlier = asyncio.create_task(store.save(paused, Rollout("one", config), "started"))  # type: ignore[arg-type]
        await asyncio.wait_for(paused.inserted.wait(), 10)
        later = asyncio.create_task(store.save(database, Rollout("two", config), "started"))
        deadline = time.monotonic() + 10
        while not later.done():  # recorded at once (as before), or waiting for a lock
            (waiting,) = await database.fetch(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
            if waiting[0]:
                break
            assert time.monotonic() < deadline, "the later event neither waits nor commits"
            await asyncio.sleep(0.01)
        assert (await store.unannounced(database))[1] == []
        paused.go.set()
        assert await earlier and await later
        _, rows = await store.unannounced(database)
        assert [(rollout, event) for _, _, rollout, event, _, _ in rows] == [
            ("one", "started"),
            ("two", "started"),
        ]
    finally:
        await database.close()


def test_serve_with_workers_warns_that_a_local_rollout_sees_one_workers_traffic(tmp_path, servers):
    """With `--workers 2` the lease holder judges the attempts it made itself, and a bad
    candidate that the other worker serves is never rolled back: `serve` says so, naming
    the source that sees every worker, and so does a reload that adds such a rollout
    (once, though each worker applies it)."""
    base, cand = servers
    local = rollout_config(base, cand)
    first = {
        **local,
        "rollouts": {
            **local["rollouts"],
            "fleet": {
                **local["rollouts"]["move"],
                "model": "n",
                "source": "prometheus",
                "prometheus_url": "http://127.0.0.1:9",
            },
        },
        "models": {**local["models"], "n": {"upstreams": ["base"]}},
    }
    config = write_config(first, tmp_path)
    gateway = GatewayProcess(config, tmp_path, workers=2)
    directories: set[Path | None] = set()
    try:
        gateway.wait_ready(timeout=60)
        directories = {metrics_dir_of(pid) for pid in gateway.worker_pids()}
        said = " ".join(gateway.log().split())
        later = {**local["rollouts"]["move"], "model": "o", "baseline": ["base"]}
        write_config(
            {
                **first,
                "rollouts": {**first["rollouts"], "later": later},
                "models": {**first["models"], "o": {"upstreams": ["base"]}},
            },
            tmp_path,
        )
        os.kill(gateway.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while gateway.log().count(" applied (was ") < 2:  # by both workers
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.05)
        reloaded = " ".join(gateway.log().split())
    finally:
        gateway.kill_all()
        for directory in directories:  # `serve` leaves its metric files behind
            if directory is not None and directory.name.startswith("metergate-metrics-"):
                shutil.rmtree(directory, ignore_errors=True)
    assert (
        "rollout 'move' is judged with source: local, on the traffic of the one worker of 2" in said
    )
    assert "set source: prometheus and prometheus_url" in said
    assert "rollout 'fleet'" not in said
    assert reloaded.count("rollout 'later' is judged with source: local") == 1, reloaded
    assert reloaded.count("rollout 'move' is judged") == 1  # said at start, not again
    assert "rollout 'fleet'" not in reloaded


def _prometheus(workdir: Path) -> tuple[ServerProcess, Path]:
    """A real Prometheus scraping the targets listed in `targets.yml` every second."""
    workdir.mkdir()
    targets = workdir / "targets.yml"
    targets.write_text("[]\n")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": "metergate",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            }
        ],
    }
    return run_prometheus(workdir, config), targets


async def judged_from_prometheus(
    gateway_factory, servers, tmp_path: Path, circuit: dict | None = None, **rollout: object
) -> tuple[Gateway, list[str]]:
    """A rollout judged from a real Prometheus that scrapes the gateway, started with a
    candidate that fails every call, under load until it rolls back (or 60 s pass)."""
    base, cand = servers
    prometheus, targets = _prometheus(tmp_path / "prometheus")
    try:
        config = rollout_config(
            base,
            cand,
            stages=[50, 100],
            source="prometheus",
            prometheus_url=prometheus.url,
            **rollout,
        )
        if circuit is not None:
            config["upstreams"]["cand"]["circuit"] = circuit
        gateway = gateway_factory(config)
        netloc = gateway.base_url.removeprefix("http://").removesuffix("/v1")
        targets.write_text(yaml.safe_dump([{"targets": [netloc]}]))
        cand.plan.fail_until_cleared(Fault.error(500))
        start_rollout(gateway)
        rolling = rollout_of(gateway)
        outcomes = await load_until(gateway, lambda: rolling.state == "rolled_back", 60)
        return gateway, outcomes
    finally:
        prometheus.stop()


async def test_a_rollout_judged_from_prometheus_rolls_back_a_failing_candidate(
    gateway_factory, servers, tmp_path
):
    """`source: prometheus`: the gates read the fleet's numbers from a real Prometheus."""
    gateway, outcomes = await judged_from_prometheus(
        gateway_factory, servers, tmp_path, interval_seconds=3
    )
    rollout = rollout_of(gateway)
    assert rollout.state == "rolled_back"
    assert all(not outcome.startswith("error") for outcome in outcomes)  # base served
    judgment = rollout.last_judgment
    assert judgment["verdict"] == "fail" and "error_rate" in judgment["failed_gates"]
    assert judgment["candidate"]["attempts"] >= 5  # counted by Prometheus, not locally


async def test_a_rollout_judged_from_prometheus_rolls_back_a_candidate_behind_its_open_circuit(
    gateway_factory, servers, tmp_path
):
    """Prometheus sees no requests the candidate's open circuit turns away, and with the
    circuit open for 600 s no probe reaches it: judged on attempts alone the stage would
    hold after its first failure. It sees the circuit open (`metergate_circuit_state`)
    and fails the `circuit_open` gate on it, so the rollout rolls back."""
    gateway, outcomes = await judged_from_prometheus(
        gateway_factory,
        servers,
        tmp_path,
        circuit={"failure_threshold": 3, "open_seconds": 600},
        interval_seconds=2,
        min_requests=50,
        failure_threshold=3,
    )
    rollout = rollout_of(gateway)
    assert rollout.state == "rolled_back"
    assert servers[1].plan.requests < 50  # the candidate never had min_requests attempts
    assert all(not outcome.startswith("error") for outcome in outcomes)  # base served
    judgment = rollout.last_judgment
    assert judgment["verdict"] == "fail" and "circuit_open" in judgment["failed_gates"]
    assert judgment["gates"]["circuit_open"] == {"value": 1.0, "limit": 0}


async def test_a_reload_the_database_refuses_midway_changes_nothing(
    gateway_factory, servers, monkeypatch
):
    """The database answers the ledger's flush and the budgets, then refuses the rollouts'
    state (an outage beginning mid-reload): the reload fails as a whole. The rollout it
    found keeps being judged, and no adapter of the refused config is left open."""
    base, cand = servers
    config = rollout_config(base, cand, stages=[50, 100])
    gateway = gateway_factory(config)
    runtime = gateway.runtime
    start_rollout(gateway)
    rollout = rollout_of(gateway)
    version = runtime.plan.version
    built: list[Adapter] = []

    def build_and_remember(name: str, provider: ProviderConfig) -> Adapter:
        built.append(build_adapter(name, provider))
        return built[-1]

    monkeypatch.setattr(runtime_module, "build_adapter", build_and_remember)
    database, fetch = runtime.database, runtime.database.fetch

    async def refusing_rollouts(sql: str, params: Sequence[object] = ()) -> list:
        if "FROM rollouts" in sql:
            raise ConnectionRefusedError("simulated: the database went away")
        return await fetch(sql, params)

    config["providers"]["extra-p"] = {**config["providers"]["base-p"]}
    config["upstreams"]["base"]["price"] = {"input": 2}
    text = yaml.safe_dump({**config, "ledger": {"url": runtime.plan.config.ledger.url}})
    monkeypatch.setattr(database, "fetch", refusing_rollouts)
    with pytest.raises(ConnectionRefusedError):
        gateway.bg.run(runtime.apply(parse_config(text), text, "test"))
    monkeypatch.setattr(database, "fetch", fetch)

    assert runtime.plan.version == version
    assert [a.name for a in built] == ["extra-p"]  # the one provider not carried over
    assert all(a.transport.client is None for a in built)  # never opened, or closed
    await load_until(gateway, lambda: rollout.state == "completed", 15)
    assert rollout.state == "completed"  # the controller in force went on judging


ONE_MOVE = """\
providers:
  p: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key: k}
upstreams:
  old: {provider: p, model: m}
  new: {provider: p, model: n}
models:
  m: {upstreams: [old]}
rollouts:
  move: {model: m, %s}
"""


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("baseline: [old], candidate: [new], stages: [.nan, 100]", "finite"),
        ("baseline: [old], candidate: [new], stages: [1, .nan, 100]", "finite"),
        ("baseline: [old], candidate: [new], stages: [10, .inf]", "finite"),
        ("baseline: [old], candidate: [old]", "on both sides: old"),
        ("baseline: [old], candidate: [new, old]", "on both sides: old"),
    ],
)
def test_a_rollout_that_could_never_be_judged_is_refused(fields, message):
    """A NaN stage passed every comparison: the rollout ran at "nan%" for ever, sent the
    candidate nothing and exported NaN weights. An upstream on both sides counted every
    baseline attempt as the candidate's."""
    with pytest.raises(ConfigError) as raised:
        parse_config(ONE_MOVE % fields, "gw.yaml")
    rendered = "\n".join(problem.render() for problem in raised.value.problems)
    assert "rollouts.move" in rendered and message in rendered
