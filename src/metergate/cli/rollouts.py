"""`metergate rollout start|status|pause|resume|promote|rollback NAME`.

Commands change the rollout's state in the ledger database; every running gateway
follows it within a second. `status` shows the latest judgment the deciding gateway
recorded: the candidate's and baseline's numbers against each gate.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from metergate.cli.common import ConfigOption, console, errors, load_for_ledger, with_database
from metergate.config import GatewayConfig
from metergate.rollout import Rollout, store, transitions
from metergate.storage import config_versions
from metergate.storage.database import Database

app = typer.Typer(help="Staged rollouts between upstreams.", no_args_is_help=True)
Name = Annotated[str, typer.Argument(help="rollout name from the config")]
Action = transitions.Action


def _rollout(config: GatewayConfig, name: str) -> Rollout:
    if name not in config.rollouts:
        errors.print(f"no rollout {name!r}; configured: {', '.join(config.rollouts) or 'none'}")
        raise typer.Exit(2)
    return Rollout(name, config.rollouts[name])


async def _unknown_to_the_fleet(db: Database, name: str) -> str | None:
    """Why the gateways do not act on rollout `name`: the config they run (the newest
    version recorded) has no rollout of that name, as when it was added to this file but
    not reloaded. Its state is kept all the same, and taken up by the reload."""
    version = await config_versions.latest(db)
    if version is None:
        return None  # no gateway has run on this ledger yet: it starts with this file
    try:
        rollouts = yaml.safe_load(version.body).get("rollouts") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    if isinstance(rollouts, dict) and name in rollouts:
        return None
    return (
        f"the gateways run config version {version.hash}, which has no rollout {name!r}: "
        "no traffic moves until a config with it is applied (metergate config reload)"
    )


def _warn(unknown: str | None) -> None:
    if unknown is not None:
        errors.print(f"[yellow]warning:[/yellow] {unknown}", highlight=False)


def _change(config: ConfigOption, name: str, action: Action, done: str) -> None:
    loaded = load_for_ledger(config)
    rollout = _rollout(loaded, name)

    async def go(db: Database) -> tuple[str | None, str | None]:
        try:
            await transitions.apply(db, rollout, action, "operator")
        except transitions.TransitionRefused as refused:
            return str(refused), None
        return None, await _unknown_to_the_fleet(db, name)

    refused, unknown = with_database(loaded, go)
    if refused:
        errors.print(refused)
        raise typer.Exit(1)
    console.print(f"rollout {name}: {done}; candidate weight now {rollout.weight:.0%}")
    _warn(unknown)


@app.command("start")
def start(name: Name, config: ConfigOption = None) -> None:
    """Start at the first stage."""
    _change(config, name, transitions.start, "started")


@app.command("pause")
def pause(name: Name, config: ConfigOption = None) -> None:
    """Hold the current weights; no automatic decisions until resumed."""
    _change(config, name, transitions.pause, "paused")


@app.command("resume")
def resume(name: Name, config: ConfigOption = None) -> None:
    """Continue automatic decisions, judging only numbers from now on."""
    _change(config, name, transitions.resume, "resumed")


@app.command("promote")
def promote(name: Name, config: ConfigOption = None) -> None:
    """Move to the next stage now (the last stage completes the rollout)."""
    _change(config, name, transitions.promote, "promoted")


@app.command("rollback")
def rollback(name: Name, config: ConfigOption = None) -> None:
    """Send all of the model's traffic back to the baseline."""
    _change(config, name, transitions.rollback, "rolled back")


@app.command("status")
def status(name: Name, config: ConfigOption = None) -> None:
    """Stage, weights, the last judgment against each gate, and the next decision."""
    loaded = load_for_ledger(config)
    rollout = _rollout(loaded, name)

    async def go(db: Database) -> tuple[list[tuple[Any, ...]], str | None]:
        await store.load(db, rollout)
        return await store.events(db, name, 10), await _unknown_to_the_fleet(db, name)

    events, unknown = with_database(loaded, go)
    _warn(unknown)
    cfg = rollout.config
    stage = f"{rollout.stage + 1}/{len(cfg.stages)} ({cfg.stages[rollout.stage]:g}%)"
    console.print(
        f"rollout [bold]{name}[/bold] for model {cfg.model}: "
        f"{rollout.state.replace('_', ' ')}, stage {stage}"
    )
    weight = rollout.weight if rollout.active else 0.0
    console.print(
        f"weights: candidate {', '.join(cfg.candidate)} {weight:.0%}, "
        f"baseline {', '.join(cfg.baseline)} {1 - weight:.0%}"
    )
    judgment = rollout.last_judgment
    if judgment:
        table = Table("gate", "candidate", "limit", "baseline", "ok")
        baseline = judgment.get("baseline") or {}
        for gate, numbers in judgment["gates"].items():
            passed = "no" if gate in judgment["failed_gates"] else "yes"
            table.add_row(
                gate,
                f"{numbers['value']:g}",
                f"{numbers['limit']:g}",
                f"{baseline.get(gate, '')}",
                passed,
            )
        table.add_row(
            "attempts",
            f"{judgment['candidate']['attempts']:g}",
            f">= {judgment['min_requests']}",
            f"{baseline.get('attempts', '')}",
            "",
        )
        console.print(table)
        console.print(
            f"last verdict: {judgment['verdict']}; failed judgments in a row: "
            f"{rollout.failures}/{cfg.failure_threshold}"
        )
    if rollout.state == "running":
        wait = max(0.0, rollout.next_decision_at() - time.time())
        console.print(f"next decision in {wait:.0f}s")
    for ts, event, event_stage, _ in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))
        console.print(f"  {when} UTC  {event} (stage {event_stage + 1})")
