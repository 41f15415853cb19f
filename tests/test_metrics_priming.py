"""The series the alerts read start at 0 before anything moves them: every configured
model x each upstream that may serve it x each live key allowed to use it, for cost,
tokens and successful requests; and each rollout's rolled_back count. Nothing else:
no name that is not configured, no key that does not exist or may not use the model."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from tests.harness import Gateway

ADMIN_KEY = "priming-admin-key-0123456789abcdef"


def config() -> dict:
    sim = {"type": "simulated"}
    upstreams = {name: {"provider": "sim", "model": name} for name in ("u1", "u2", "u3", "u4")}
    return {
        "providers": {"sim": sim},
        "upstreams": upstreams,
        "models": {
            "a": {"upstreams": ["u1"], "fallbacks": ["b"]},  # b's upstream may serve a
            "b": {"upstreams": ["u2"]},
            "c": {"upstreams": ["u3"]},
        },
        "rollouts": {"c-move": {"model": "c", "baseline": ["u3"], "candidate": ["u4"]}},
        "admin": {"api_key": ADMIN_KEY},
    }


def series(gateway: Gateway, name: str, **fixed: str) -> set[tuple[str, ...]]:
    """(model, upstream, key) of every sample of `name` with the `fixed` labels, all 0."""
    found = set()
    for family in gateway.runtime.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in fixed.items()):
                assert sample.value == 0, sample
                found.add((sample.labels["model"], sample.labels["upstream"], sample.labels["key"]))
    return found


def test_configured_series_start_at_zero_and_follow_keys_and_reloads(gateway_factory):
    gateway = gateway_factory(config())  # makes the key `test`, allowed every model
    gateway.new_key("only-b", ["b"])
    expected = {
        ("a", "u1", "test"), ("a", "u2", "test"), ("b", "u2", "test"),
        ("c", "u3", "test"), ("c", "u4", "test"), ("b", "u2", "only-b"),
    }  # fmt: skip
    assert series(gateway, "metergate_cost_usd_total") == expected
    for kind in ("input", "cached_input", "output"):
        assert series(gateway, "metergate_tokens_total", type=kind) == expected
    assert series(gateway, "metergate_requests_total", outcome="success") == expected
    assert series(gateway, "metergate_requests_total", outcome="upstream_error") == set()
    exposition = httpx.get(gateway.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    assert 'metergate_rollout_transitions_total{rollout="c-move",event="rolled_back"} 0.0' in (
        exposition
    )

    # a reload that adds a model: its series start at 0 too
    path = Path(gateway.runtime.source)
    changed = yaml.safe_load(path.read_text())
    changed["models"]["d"] = {"upstreams": ["u4"]}
    path.write_text(yaml.safe_dump(changed))
    answer = httpx.post(
        gateway.base_url.removesuffix("/v1") + "/admin/reload",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert answer.json()["applied"] is True
    assert series(gateway, "metergate_cost_usd_total") == expected | {("d", "u4", "test")}


def test_each_call_starts_what_changed_since_the_last() -> None:
    """Priming runs at each change of keys: it starts a new key, a key's newly allowed
    model, a new model's series for every key, and a new rollout's count."""
    from metergate.metering.metrics import Metrics

    metrics = Metrics()

    def started() -> set[tuple[str, str, str]]:
        return {
            (s.labels["model"], s.labels["upstream"], s.labels["key"])
            for family in metrics.registry.collect()
            for s in family.samples
            if s.name == "metergate_cost_usd_total"
        }

    serving = {"a": ["u1"], "b": ["u2"]}
    metrics.prime(serving, [("k1", None), ("k2", ["a"])])
    assert started() == {("a", "u1", "k1"), ("b", "u2", "k1"), ("a", "u1", "k2")}
    metrics.prime(serving, [("k1", None), ("k2", ["a", "b"]), ("k3", ["b"])])
    assert started() >= {("b", "u2", "k2"), ("b", "u2", "k3")}
    assert ("a", "u1", "k3") not in started()
    metrics.prime({**serving, "c": ["u3"]}, [("k1", None), ("k2", ["a", "b"])], ["r"])
    assert ("c", "u3", "k1") in started() and ("c", "u3", "k2") not in started()
    rolled = [
        s.labels["rollout"]
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "metergate_rollout_transitions_total"
    ]
    assert rolled == ["r"]
