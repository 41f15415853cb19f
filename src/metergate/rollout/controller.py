"""The rollout controller: a background loop in every gateway process.

Every process follows the rollout state in the database (so a CLI command or another
replica's decision takes effect everywhere within a tick). One process at a time holds
a lease and judges: at each interval it promotes when every gate holds, holds when
data is short, and rolls back when a gate has failed `failure_threshold` times. The
lease holder also announces each transition once: log line, counter, webhook. How far
the holders have announced is kept with the lease (`store.unannounced`), so a process
that takes the lease over goes on from where the last holder stopped: what a dying
holder had not announced, or the CLI recorded while no gateway ran, is announced by the
next, and nothing twice.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from metergate.config.model import RolloutConfig
from metergate.logs import RepeatedFailures
from metergate.metering.metrics import Metrics
from metergate.rollout import store, transitions
from metergate.rollout.gates import (
    FAIL,
    INSUFFICIENT,
    PASS,
    judge,
    local_observations,
    prometheus_observations,
)
from metergate.rollout.state import RUNNING, Rollout
from metergate.storage.database import Database
from metergate.webhooks import WebhookNotifier

if TYPE_CHECKING:
    import httpx2

log = logging.getLogger("metergate.rollout")
# An event announced this long after it was recorded (by the CLI while no gateway ran,
# or left by a holder that died) says when it happened.
LATE_SECONDS = 60.0


def warn_of_one_workers_judging(
    configs: dict[str, RolloutConfig], before: dict[str, RolloutConfig], workers: int | None
) -> None:
    """`source: local` judges the attempts the process holding the controller's lease made
    itself: of N workers, about 1/N of the traffic (the others' never counts). Its
    `min_requests` and `max_5xx` then take N times the traffic, and a bad candidate that
    the other workers serve is not rolled back. A worker's numbers by model, with the
    requests open circuits turn away, are not in the metric files the workers share, so
    there is no whole to judge locally; Prometheus sees every worker's attempts. Warns of
    each such rollout in `configs` that was not one in `before` (the config replaced);
    `workers`: how many, when known."""
    for name, rollout in configs.items():
        was = before.get(name)
        if rollout.source == "local" and (was is None or was.source != "local"):
            log.warning(
                "rollout %r is judged with source: local, on the traffic of the one worker "
                "%sholding the lease (the others' attempts do not count): set "
                "source: prometheus and prometheus_url for the gates to see every worker",
                name,
                f"of {workers} " if workers else "",
            )


class RolloutController:
    def __init__(
        self,
        configs: dict[str, RolloutConfig],
        metrics: Metrics,
        carry: RolloutController | None = None,
    ) -> None:
        """`carry`: the controller of the config being replaced; a rollout whose config
        did not change keeps its live numbers."""
        previous = carry.rollouts if carry else {}
        self.rollouts: dict[str, Rollout] = {
            name: previous[name]
            if name in previous and previous[name].config == cfg
            else Rollout(name, cfg)
            for name, cfg in configs.items()
        }
        self.metrics = metrics
        self.notifier: WebhookNotifier = carry.notifier if carry else WebhookNotifier()
        self.holder: str = carry.holder if carry else store.holder_id()
        self.leader = False
        shortest = min((c.interval_seconds for c in configs.values()), default=4.0)
        self.tick_seconds = max(0.05, min(1.0, shortest / 4))
        self._database: Database | None = None
        self._task: asyncio.Task[None] | None = None
        self._http: httpx2.AsyncClient | None = None
        self._owns_notifier = True  # the newest controller closes the shared notifier

    def for_model(self, model: str) -> Rollout | None:
        return next((r for r in self.rollouts.values() if r.config.model == model), None)

    async def start(self, database: Database) -> None:
        await self.load(database)
        self._begin()

    async def load(self, database: Database) -> None:
        """Read the rollouts' state; nothing runs yet, so a config reload that fails
        after this has changed nothing (`replace` starts the loop)."""
        self._database = database
        for rollout in self.rollouts.values():
            await store.load(database, rollout)

    async def replace(self, old: RolloutController) -> None:
        """Stop the replaced controller's loop and start this one's (after `load`); the
        webhook notifier they share passes on instead of closing."""
        old._owns_notifier = False
        await old.close()
        self._begin()

    def _begin(self) -> None:
        self._export_weights()
        if self.rollouts:
            self._task = asyncio.create_task(self._run(), name="rollout-controller")

    async def close(self) -> None:
        """Stop the loop; the webhook notifier is closed by whichever controller is the
        newest (a replaced controller hands it on)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._owns_notifier:
            await self.notifier.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _run(self) -> None:
        failures = RepeatedFailures(log, "the rollout controller's tick")
        while True:
            try:
                await self.tick()
            except Exception as error:
                failures.failed(error)
            else:
                failures.succeeded()
            await asyncio.sleep(self.tick_seconds)

    async def tick(self) -> None:
        database = self._database
        assert database is not None
        self.leader = await store.take_lease(database, self.holder, self.tick_seconds * 3 + 1)
        for rollout in self.rollouts.values():
            async with rollout.lock:  # not in the middle of an admin action's load and save
                await store.load(database, rollout)
            if (
                self.leader
                and rollout.state == RUNNING
                and time.time() >= (rollout.next_decision_at())
            ):
                await self._decide(database, rollout)
        if self.leader:
            await self._announce(database)
        self._export_weights()

    async def _decide(self, database: Database, rollout: Rollout) -> None:
        """Judge the stage and act on the judgment. The numbers are gathered without the
        rollout's lock (a Prometheus query may take seconds, and an operator's rollback
        must not wait for it); the judgment applies only to the state it was made on: one
        that changed meanwhile is judged again on a later tick, and the save is a
        compare-and-set against other processes."""
        judged = rollout.version
        if rollout.config.source == "prometheus":
            if self._http is None:
                import httpx2  # only rollouts judged from Prometheus need it

                self._http = httpx2.AsyncClient(timeout=10)
            window = time.time() - max(
                rollout.stage_started_at, float(rollout.last_judgment.get("at", 0) or 0)
            )
            candidate, baseline = await prometheus_observations(rollout, self._http, window)
        else:
            candidate, baseline = local_observations(rollout)
        async with rollout.lock:
            if rollout.version == judged and rollout.state == RUNNING:
                await self._act(database, rollout, judge(rollout.config, candidate, baseline))

    async def _act(self, database: Database, rollout: Rollout, judgment: dict[str, Any]) -> None:
        rollout.last_judgment = judgment
        verdict = judgment["verdict"]
        try:
            if verdict == PASS:
                await transitions.promote(database, rollout, by="controller", judgment=judgment)
            elif verdict == FAIL:
                rollout.failures += 1
                rollout.reset_window()
                if rollout.failures >= rollout.config.failure_threshold:
                    await transitions.rollback(
                        database, rollout, by="controller", judgment=judgment
                    )
                elif not await store.save(database, rollout, "gate_failed", judgment):
                    await store.load(database, rollout)  # an operator acted: judge again
            else:
                assert verdict == INSUFFICIENT
                # hold: keep collecting this stage's numbers
                if await store.save(database, rollout):
                    self.metrics.rollout_transitions.labels(rollout.name, "held").inc()
                else:
                    await store.load(database, rollout)
        except transitions.TransitionRefused as refused:
            # An operator (or another process) changed the rollout after it was judged:
            # their action stands, and the next tick judges the state it left.
            log.info("rollout controller: %s", refused)

    async def _announce(self, database: Database) -> None:
        """Log, count and post every event no lease holder has announced yet, once. The
        position moves first and then they are announced: a holder that dies in between
        loses them (the webhooks it had queued go with it anyway), but none is announced
        twice, and one that lost the lease meanwhile announces nothing."""
        position, rows = await store.unannounced(database)
        if not rows or not await store.claim_announced(
            database, self.holder, position, int(rows[-1][0])
        ):
            return
        for _, recorded, name, event, stage, detail in rows:
            rollout = self.rollouts.get(name)
            if rollout is None:
                continue
            percent = rollout.config.stages[min(stage, len(rollout.config.stages) - 1)]
            text = (
                f"metergate rollout {name!r} ({rollout.config.model}): {event} "
                f"at stage {stage + 1}/{len(rollout.config.stages)} ({percent:g}%)"
            )
            if time.time() - recorded > LATE_SECONDS:  # say when: it happened before now
                when = datetime.datetime.fromtimestamp(recorded, datetime.UTC)
                text += f", recorded {when:%Y-%m-%d %H:%M:%S} UTC"
            fields: dict[str, Any] = {
                "rollout": name,
                "event": event,
                "stage": stage,
                "detail": orjson.loads(detail),
                "recorded_at": recorded,
            }
            (log.warning if event in ("rolled_back", "gate_failed") else log.info)(text)
            self.metrics.rollout_transitions.labels(name, event).inc()
            if rollout.config.webhook_url:
                self.notifier.send(rollout.config.webhook_url, text, fields)

    def _export_weights(self) -> None:
        for rollout in self.rollouts.values():
            weight = rollout.weight if rollout.active else 0.0
            for side, share in (
                (rollout.config.candidate, weight),
                (rollout.config.baseline, 1 - weight),
            ):
                for target in side:
                    self.metrics.rollout_weight.labels(rollout.name, target).set(share / len(side))
