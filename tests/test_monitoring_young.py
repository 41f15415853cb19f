"""The spending and rollback alerts on a Prometheus seconds old, end to end: a real
gateway, a real Prometheus with the shipped config and rules (1 s intervals, the
spending alert's `for:` shortened to 1 s), a real Alertmanager with the shipped routes,
and a webhook receiver owned by the test.

Both alerts read `increase()`, which sees nothing of a counter's first value. The
gateway exports the series a burst or a rollback will move at 0 before they move: a
key's cost series as soon as the key exists, a rollout's rolled_back count from start.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import openai

from metergate.rollout import transitions
from tests.harness import BackgroundLoop
from tests.test_monitoring_stack import (
    HELD_ROLLOUT,
    Receiver,
    binary,
    firing,
    start_watched_gateway,
    wait_for_data,
)

ASK = [{"role": "user", "content": "spend"}]


def config() -> dict[str, Any]:
    """`agent` costs $50 a request (10 output tokens at $5 each); `canary` is under a
    rollout that never judges by itself (too few requests, ever)."""
    sim = {"type": "simulated", "simulated": {"output_tokens": 10}}
    return {
        "providers": {"sim": sim},
        "upstreams": {
            "pricey": {"provider": "sim", "model": "m", "price": {"input": 0, "output": 5e6}},
            "base-up": {"provider": "sim", "model": "base"},
            "cand-up": {"provider": "sim", "model": "cand"},
        },
        "models": {"agent": {"upstreams": ["pricey"]}, "canary": {"upstreams": ["base-up"]}},
        "rollouts": HELD_ROLLOUT,
    }


def test_burst_and_rollback_alerts_reach_their_receivers_on_a_fresh_prometheus(
    bg: BackgroundLoop, tmp_path: Path
) -> None:
    binary("prometheus")
    binary("prometheus-alertmanager", "alertmanager")
    with contextlib.ExitStack() as cleanup:
        receiver = Receiver(bg)
        cleanup.callback(receiver.server.close)
        gateway, _, prometheus = start_watched_gateway(
            bg, cleanup, config(), tmp_path, receiver, {"MetergateHighSpending": "1s"}
        )
        rollout = gateway.runtime.plan.rollouts.rollouts["canary-move"]

        # a key created now: its series are exported (at 0) before its first request
        secret = gateway.new_key("burst-agent", ["agent"])
        cost = 'metergate_cost_usd_total{model="agent",upstream="pricey",key="burst-agent"}'
        assert wait_for_data(prometheus, f"{cost} == 0", 30), prometheus.log()
        assert not wait_for_data(
            prometheus, '{__name__=~"metergate_.*",key="burst-agent",model="canary"}', 0
        )
        rolled_back = (
            'metergate_rollout_transitions_total{rollout="canary-move",event="rolled_back"}'
        )
        assert wait_for_data(prometheus, f"{rolled_back} == 0", 30)

        # a burst on the new key: $150 within one scrape, against $50 an hour
        caller = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
        for _ in range(3):
            caller.chat.completions.create(model="agent", messages=ASK)

        name, alert = receiver.wait_for(firing("MetergateHighSpending", model="agent"), 60)
        assert name == "pagerduty-critical"
        spent = re.fullmatch(
            r"Model agent spent \$([\d.]+) in the last hour", alert["annotations"]["summary"]
        )
        assert spent and float(spent.group(1)) >= 150  # all of it (increase() extrapolates)

        # a rollback on a Prometheus not a minute old
        bg.run(transitions.rollback(gateway.runtime.database, rollout))

        rolled = firing("MetergateRolloutRolledBack", rollout="canary-move")
        name, alert = receiver.wait_for(rolled, 60)
        assert name == "slack-warning"
        assert alert["annotations"]["summary"] == "Rollout canary-move rolled back"
