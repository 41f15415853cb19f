"""`server.metrics_key_label`: what the `key` label of the request, token and cost metrics
holds. A gateway with a key per end user cannot keep a series per key and model (10,000
keys and 3 models were 13.6 MB and 150,000 lines of /metrics, and ~95 MB of memory, at
start); counted by team or not by key at all, /metrics stays the size of the teams while
the ledger keeps every key's name."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from metergate import runtime as runtime_module
from metergate.storage.keys import create_key
from metergate.storage.teams import create_team
from tests.harness import Gateway, simulated_config

ADMIN_KEY = "key-label-admin-key-0123456789abcdef"
ASK = [{"role": "user", "content": "hi"}]


def label_config(by: str | None) -> dict[str, Any]:
    config = simulated_config(latency_ms=0, output_tokens=4)
    config["upstreams"]["sim-b"] = {"provider": "sim", "model": "sim-b"}
    config["models"]["b"] = {"upstreams": ["sim-b"]}
    config["admin"] = {"api_key": ADMIN_KEY}
    if by is not None:
        config["server"] = {"metrics_key_label": by}
    return config


def key_values(gateway: Gateway, name: str, **fixed: str) -> dict[str, float]:
    """`key` label -> summed value of the samples of `name` with the `fixed` labels, as a
    scrape of /metrics reads them."""
    text = httpx.get(gateway.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels_text, value = line[len(name) + 1 :].rsplit("} ", 1)
        labels = dict(part.split("=", 1) for part in labels_text.split('",') if part)
        labels = {k: v.strip('"') for k, v in labels.items()}
        if all(labels.get(k) == v for k, v in fixed.items()):
            found[labels["key"]] = found.get(labels["key"], 0.0) + float(value)
    return found


def add_key(gateway: Gateway, name: str, team: str | None = None, **fields: Any) -> str:
    secret, _ = gateway.bg.run(create_key(gateway.runtime.database, name, team=team, **fields))
    gateway.bg.run(gateway.runtime.keys.reload())
    return secret


def ask(gateway: Gateway, secret: str, model: str = "sim") -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    assert client.chat.completions.create(model=model, messages=ASK).choices


def test_by_team_counts_each_team_once_and_the_ledger_keeps_the_names(gateway_factory):
    gateway = gateway_factory(label_config("team"))
    database = gateway.runtime.database
    gateway.bg.run(create_team(database, {"name": "search"}))
    gateway.bg.run(create_team(database, {"name": "agents"}))
    alice = add_key(gateway, "alice", team="search", models=["b"])
    bob = add_key(gateway, "bob", team="search")
    carol = add_key(gateway, "carol", team="agents", models=["b"])
    loner = add_key(gateway, "loner")

    # started at 0 per team, with the models any of its keys may use; no key's name
    primed = key_values(gateway, "metergate_cost_usd_total", model="sim")
    assert primed == {"search": 0.0, "-": 0.0}  # agents' only key may not use `sim`
    assert set(key_values(gateway, "metergate_cost_usd_total", model="b")) == {
        "search",
        "agents",
        "-",
    }

    for secret, model in ((alice, "b"), (bob, "sim"), (bob, "sim"), (carol, "b"), (loner, "sim")):
        ask(gateway, secret, model)
    with pytest.raises(openai.AuthenticationError):
        ask(gateway, "mgk_" + "x" * 43)
    requests = key_values(gateway, "metergate_requests_total", outcome="success")
    assert requests == {"search": 3.0, "agents": 1.0, "-": 1.0}
    assert key_values(gateway, "metergate_requests_total", outcome="unauthorized") == {
        "unknown": 1.0
    }
    tokens = key_values(gateway, "metergate_tokens_total", type="output")
    assert tokens == {"search": 12.0, "agents": 4.0, "-": 4.0, "unknown": 0.0}  # 4 each
    every_key = set(key_values(gateway, "metergate_requests_total"))
    assert every_key.isdisjoint({"alice", "bob", "carol", "loner", "test"})

    rows = gateway.ledger_rows()
    assert sorted(r["key_name"] for r in rows) == ["alice", "bob", "bob", "carol", "loner"]
    spent = sum(r["cost_nano"] for r in rows if r["key_name"] in ("alice", "bob")) / 1e9
    assert key_values(gateway, "metergate_cost_usd_total")["search"] == pytest.approx(spent)


def test_a_reload_changes_the_label_of_the_requests_that_follow(gateway_factory):
    gateway = gateway_factory(label_config(None))  # by name, as before
    ask(gateway, gateway.key)
    assert key_values(gateway, "metergate_requests_total", outcome="success") == {"test": 1.0}

    path = Path(gateway.runtime.source)
    changed = yaml.safe_load(path.read_text())
    changed.setdefault("server", {})["metrics_key_label"] = "none"
    path.write_text(yaml.safe_dump(changed))
    answer = httpx.post(
        gateway.base_url.removesuffix("/v1") + "/admin/reload",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert answer.json()["applied"] is True, answer.text
    add_key(gateway, "newcomer")  # started under `-`, not under its name
    assert "newcomer" not in key_values(gateway, "metergate_cost_usd_total")
    ask(gateway, gateway.key)
    # a counter never goes back: the requests counted by name stay, new ones go to `-`
    success = key_values(gateway, "metergate_requests_total", outcome="success", model="sim")
    assert success == {"test": 1.0, "-": 1.0}


def test_by_none_keeps_metrics_the_same_size_however_many_keys(gateway_factory):
    gateway = gateway_factory(label_config("none"))
    before = len(key_values(gateway, "metergate_tokens_total"))
    for n in range(300):
        gateway.bg.run(create_key(gateway.runtime.database, f"user-{n:03d}"))
    gateway.bg.run(gateway.runtime.keys.reload())
    assert key_values(gateway, "metergate_tokens_total").keys() == {"-"}
    assert len(key_values(gateway, "metergate_tokens_total")) == before


def test_many_keys_by_name_are_worth_one_warning(
    gateway_factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(runtime_module, "MANY_KEYS", 5)
    gateway = gateway_factory(label_config(None))
    with caplog.at_level(logging.WARNING, logger="metergate"):
        for n in range(8):
            add_key(gateway, f"user-{n}")
    warnings = [r.getMessage() for r in caplog.records if "metrics_key_label" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("6 keys")  # `test` and five more: past five
    assert "user-" not in warnings[0]  # a count, never the names
