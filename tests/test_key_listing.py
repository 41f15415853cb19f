"""The admin API lists keys in pages, finds them by part of a name, an id or a hint, and
never answers with every key at once: a gateway may hold a key per end user. Teams show
their first keys and how many they have; the requests page's key menu and usage by key
(or by a tag with a value per user) stay bounded. On SQLite and PostgreSQL alike (the
paging query compares rows)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from metergate.console import requests_log
from metergate.console.attribution import TEAM_KEYS_SHOWN
from metergate.storage.keys import create_key
from tests.harness import Gateway, simulated_config
from tests.test_console_api import ADMIN_KEY, admin


def listing_config(database_url: str | None = None) -> dict[str, Any]:
    config = simulated_config(latency_ms=0, output_tokens=4)
    config["admin"] = {"api_key": ADMIN_KEY}
    if database_url:
        config["ledger"] = {"url": database_url}
    return config


def make_key(gateway: Gateway, name: str, **fields: Any) -> dict[str, Any]:
    answer = admin(gateway, "/admin/api/keys", "POST", json={"name": name, **fields})
    assert answer.status_code == 201, answer.text
    return answer.json()


def all_pages(gateway: Gateway, query: str, limit: int) -> tuple[list[dict[str, Any]], set[int]]:
    """Every key the list gives for `query`, page by page, and the `matched` counts seen."""
    keys: list[dict[str, Any]] = []
    matched: set[int] = set()
    after = ""
    for _ in range(100):
        page = admin(gateway, f"/admin/api/keys?limit={limit}{query}{after}")
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["keys"]) <= limit
        keys += body["keys"]
        matched.add(body["matched"])
        if body["next_after"] is None:
            return keys, matched
        after = f"&after={body['next_after']}"
    raise AssertionError("the pages never ended")


def test_pages_cover_every_key_once_active_first(gateway_factory, database_url: str) -> None:
    gateway = gateway_factory(listing_config(database_url))
    made = {name: make_key(gateway, name) for name in ("delta", "alpha", "echo", "bravo")}
    for name in ("charlie", "alpha"):  # a revoked alpha, then a new active one
        old = make_key(gateway, f"{name}-old") if name == "charlie" else made["alpha"]
        revoked = admin(gateway, f"/admin/api/keys/{old['key']['id']}/revoke", "POST")
        assert revoked.status_code == 200
    make_key(gateway, "alpha")

    keys, matched = all_pages(gateway, "", limit=2)
    listed = [(k["state"], k["name"]) for k in keys]
    active = sorted(["alpha", "bravo", "delta", "echo", "test"])
    assert listed == [("active", n) for n in active] + [
        ("revoked", "alpha"),
        ("revoked", "charlie-old"),
    ]
    assert len({k["id"] for k in keys}) == len(keys)
    assert matched == {len(keys)}
    one_page = admin(gateway, "/admin/api/keys").json()  # the default page holds them all
    assert [k["id"] for k in one_page["keys"]] == [k["id"] for k in keys]
    assert one_page["next_after"] is None

    revoked = all_pages(gateway, "&state=revoked", limit=1)[0]
    assert [k["name"] for k in revoked] == ["alpha", "charlie-old"]
    assert {k["name"] for k in all_pages(gateway, "&state=active", 3)[0]} == set(active)


def test_a_key_made_between_pages_shifts_nothing(gateway_factory, database_url: str) -> None:
    """Keyset paging: the next page starts after the last key shown, not at an offset, so
    a key created (or revoked) meanwhile neither repeats nor hides one."""
    gateway = gateway_factory(listing_config(database_url))
    for name in ("k1", "k2", "k3", "k4"):
        make_key(gateway, name)
    first = admin(gateway, "/admin/api/keys?limit=2").json()
    assert [k["name"] for k in first["keys"]] == ["k1", "k2"]
    make_key(gateway, "a-new")  # sorts before every key shown
    revoked = first["keys"][0]["id"]
    assert admin(gateway, f"/admin/api/keys/{revoked}/revoke", "POST").status_code == 200
    rest = admin(gateway, f"/admin/api/keys?limit=10&after={first['next_after']}").json()
    assert [(k["state"], k["name"]) for k in rest["keys"]] == [
        ("active", "k3"),
        ("active", "k4"),
        ("active", "test"),
        ("revoked", "k1"),
    ]


def test_any_well_formed_place_starts_a_page(gateway_factory, database_url: str) -> None:
    """A cursor names a place in the order, not a key: the key it came from may be gone
    (or never existed), and the page still starts right after that place."""
    gateway = gateway_factory(listing_config(database_url))
    for name in ("k1", "k2", "k3"):
        make_key(gateway, name)
    page = admin(gateway, "/admin/api/keys?after=0.key_ffffffffffffffff.k1").json()
    assert [k["name"] for k in page["keys"]] == ["k2", "k3", "test"]
    page = admin(gateway, "/admin/api/keys?after=0.key_0000000000000000.k2").json()
    assert [k["name"] for k in page["keys"]] == ["k2", "k3", "test"]
    assert admin(gateway, "/admin/api/keys?after=1.key_0000000000000000.a").json()["keys"] == []


def test_each_page_carries_its_keys_spend(gateway_factory, database_url: str) -> None:
    gateway = gateway_factory(listing_config(database_url))
    spenders = {name: make_key(gateway, name)["secret"] for name in ("s1", "s2", "s3")}
    for count, (name, secret) in enumerate(spenders.items(), start=1):
        client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
        for i in range(count):
            client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"{name} {i}"}]
            )
    rows = gateway.ledger_rows()
    keys, _ = all_pages(gateway, "", limit=1)  # every key alone on its page
    for key in keys:
        own = [r for r in rows if r["key_name"] == key["name"]]
        assert key["requests_month"] == len(own)
        assert (
            key["spend_month_nano"] == key["spend_today_nano"] == sum(r["cost_nano"] for r in own)
        )
    assert {k["name"]: k["requests_month"] for k in keys if k["name"] in spenders} == {
        "s1": 1,
        "s2": 2,
        "s3": 3,
    }


def test_search_finds_part_of_a_name_an_id_or_a_hint(gateway_factory, database_url: str) -> None:
    gateway = gateway_factory(listing_config(database_url))
    made = {name: make_key(gateway, name) for name in ("Billing-API", "billing-jobs", "search")}

    def found(search: str) -> list[str]:
        return [k["name"] for k in all_pages(gateway, f"&search={search}", limit=10)[0]]

    assert found("BILLING") == ["Billing-API", "billing-jobs"]  # any case
    assert found("ing-j") == ["billing-jobs"]
    assert found(made["search"]["key"]["id"]) == ["search"]
    hint = made["Billing-API"]["secret"][-4:]
    assert made["Billing-API"]["key"]["hint"] == hint
    assert "Billing-API" in found(hint)
    # LIKE's wildcards are only characters here: `_` is no "any one", `%` no "anything"
    assert found("billing_api") == []
    assert found("%25") == []
    assert found("b%25s") == []


def test_team_filter_and_the_teams_list_bound(
    gateway_factory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = gateway_factory(listing_config(database_url))
    database = gateway.runtime.database
    many = TEAM_KEYS_SHOWN + 7
    assert admin(gateway, "/admin/api/teams", "POST", json={"name": "crowd"}).status_code == 201
    for n in range(many):
        gateway.bg.run(create_key(database, f"user-{n:03d}", team="crowd"))
    make_key(gateway, "outsider")

    in_team, matched = all_pages(gateway, "&team=crowd", limit=20)
    assert [k["name"] for k in in_team] == [f"user-{n:03d}" for n in range(many)]
    assert matched == {many}

    team = next(t for t in admin(gateway, "/admin/api/teams").json()["teams"])
    assert team["key_count"] == many
    assert team["keys"] == [f"user-{n:03d}" for n in range(TEAM_KEYS_SHOWN)]

    refused = admin(gateway, "/admin/api/teams/crowd", "DELETE")
    assert refused.status_code == 409
    message = refused.json()["error"]["message"]
    assert "user-000, user-001" in message and f"and {many - 10} more" in message
    assert "user-056" not in message

    # the requests page offers the key names as a menu only while there are few
    choices = admin(gateway, "/admin/api/requests").json()["filters"]
    assert choices["keys_complete"] is True and "outsider" in choices["keys"]
    monkeypatch.setattr(requests_log, "KEY_CHOICES_MAX", 5)
    choices = admin(gateway, "/admin/api/requests").json()["filters"]
    assert choices["keys_complete"] is False
    assert choices["keys"] == ["outsider", "test", "user-000", "user-001", "user-002"]


def test_usage_by_key_answers_with_the_costliest_keys(gateway_factory, database_url: str) -> None:
    gateway = gateway_factory(listing_config(database_url))
    for name, count in (("few", 1), ("most", 3), ("some", 2)):
        secret = make_key(gateway, name)["secret"]
        client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
        for i in range(count):
            client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"{name} {i}"}]
            )
    rows = gateway.ledger_rows()
    whole = admin(gateway, "/admin/api/usage?by=key").json()
    assert [g["name"] for g in whole["groups"]] == ["most", "some", "few"]
    assert whole["group_count"] == 3
    page = admin(gateway, "/admin/api/usage?by=key&limit=2").json()
    assert page["groups"] == whole["groups"][:2] and page["group_count"] == 3
    assert page["total"]["cost_nano"] == sum(r["cost_nano"] for r in rows) > 0
    assert page["total"]["requests"] == 6
    assert whole["total"]["p95_ms"] > 0
    # the console's spend panel: the same figures without the percentiles
    spend = admin(gateway, "/admin/api/usage?by=key&p95=false").json()
    for group in (*spend["groups"], spend["total"]):
        assert group.pop("p95_ms") is None
    for group in (*whole["groups"], whole["total"]):
        del group["p95_ms"]
    assert (spend["groups"], spend["total"]) == (whole["groups"], whole["total"])


@pytest.mark.parametrize("limit", ["0", "1001", "ten"])
def test_a_bad_usage_limit_says_what_to_fix(gateway_factory, limit: str) -> None:
    gateway = gateway_factory(listing_config())
    answer = admin(gateway, f"/admin/api/usage?by=key&limit={limit}")
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "limit"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("after=not-a-place", "after"),
        ("after=2.key_0123456789abcdef.k1", "after"),  # flag neither 0 nor 1
        ("after=0.key_0123.k1", "after"),  # not a key id
        ("state=gone", "state"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("search=", "search"),
        ("team=a&team=b", "team"),
        ("page=2", "page"),
    ],
)
def test_a_bad_list_query_says_what_to_fix(gateway_factory, query: str, param: str) -> None:
    gateway = gateway_factory(listing_config())
    answer = admin(gateway, f"/admin/api/keys?{query}")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
