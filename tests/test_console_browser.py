"""The console in a real browser: headless Chromium (Debian's) driven by Playwright.

Each test starts a gateway, sends traffic with the openai SDK, and works the console
like an operator. Screenshots of every page go to tests/artifacts/console/ for review.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from metergate.console import attribution
from metergate.console import mcp as mcp_view
from metergate.metering.ledger import COLUMNS, LedgerRow
from metergate.rollout import store as rollout_store
from metergate.rollout.gates import Observed, judge
from metergate.storage.keys import create_key
from tests.harness import CHROMIUM, CHROMIUM_ARGS, Gateway
from tests.test_console_api import ADMIN_KEY, ASK, admin, base, console_config, send_traffic

playwright_api = pytest.importorskip("playwright.sync_api")

SHOTS = Path(__file__).parent / "artifacts" / "console"
WAIT_MS = 10_000

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is installed by scripts/test"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS.parent / ".gitignore").write_text("*\n")  # screenshots are for review, not for git
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    problems: list[str] = []  # script errors; refused requests are expected in some tests

    def on_console(message) -> None:  # type: ignore[no-untyped-def]
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(message.text)

    tab.on("console", on_console)
    tab.on("pageerror", lambda e: problems.append(str(e)))
    tab.problems = problems
    yield tab
    context.close()


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page, gateway: Gateway, key: str = ADMIN_KEY) -> None:  # type: ignore[no-untyped-def]
    page.goto(base(gateway) + "/console")
    page.fill("#admin-key", key)
    page.click("#sign-in-button")


def open_page(page, name: str) -> None:  # type: ignore[no-untyped-def]
    page.click(f"nav a[data-page={name}]")
    page.wait_for_selector(f"#page[data-page={name}]")


def test_sign_in_and_overview_charts(page, gateway_factory, browser):
    gateway = gateway_factory(console_config())
    send_traffic(gateway)
    page.goto(base(gateway) + "/console")
    shot(page, "00-sign-in")
    sign_in(page, gateway, gateway.key)  # a caller key
    error = page.locator("#sign-in-error")
    playwright_api.expect(error).to_contain_text("caller key")
    shot(page, "00-sign-in-caller-key-refused")
    assert page.locator("#nav").is_hidden()
    sign_in(page, gateway, "not-the-admin-key")
    playwright_api.expect(error).to_contain_text("wrong admin key")

    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview] #charts")
    assert page.evaluate("sessionStorage.getItem('metergate.adminKey')") == ADMIN_KEY
    assert page.evaluate("document.cookie") == ""
    total = sum(r["cost_nano"] for r in gateway.ledger_rows())
    assert total < 10_000_000  # under a cent: shown to the micro-dollar
    assert page.inner_text("#spend-today .value") == f"${total / 1e9:.6f}"
    for chart in ("requests_per_second", "error_percent", "p95_ms", "ttft_p95_ms"):
        figure = page.locator(f"#chart-{chart}")
        assert int(figure.get_attribute("data-points")) > 0, chart
        assert figure.locator("path.series, circle.dot").count() > 0, chart
    legend = page.inner_text("#chart-requests_per_second .legend")
    assert "chat" in legend and "flaky" in legend
    # the key's tiny daily budget is spent: its bar is red; the big one is green
    assert page.get_attribute("#budgets .bar[data-budget=test-daily]", "data-state") == "exceeded"
    assert page.get_attribute("#budgets .bar[data-budget=everything]", "data-state") == "ok"
    shot(page, "01-overview")
    page.click(".segmented button[data-value='7d']")
    playwright_api.expect(page.locator("#requests .label")).to_contain_text("7d")
    assert int(page.get_attribute("#chart-p95_ms", "data-points")) > 0

    dark = browser.new_context(viewport={"width": 1400, "height": 1000}, color_scheme="dark")
    try:
        dark_page = dark.new_page()
        dark_page.goto(base(gateway) + "/console")
        dark_page.fill("#admin-key", ADMIN_KEY)
        dark_page.click("#sign-in-button")
        dark_page.wait_for_selector("#page[data-page=overview] #charts", timeout=WAIT_MS)
        background = dark_page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(14, 17, 22)"  # the dark palette, from prefers-color-scheme
        dark_page.screenshot(path=str(SHOTS / "01-overview-dark.png"), full_page=True)
    finally:
        dark.close()

    page.click("#sign-out")
    assert page.locator("#sign-in").is_visible()
    assert page.evaluate("sessionStorage.getItem('metergate.adminKey')") is None
    assert page.problems == []


def test_keys_page_creates_and_revokes_a_key(page, gateway_factory):
    gateway = gateway_factory(console_config())
    send_traffic(gateway, chat=3, streams=0, flaky=0)
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "keys")
    page.fill("#key-name", "search-mcp")
    page.check("#create-models input[value=chat]")
    page.fill("#key-cap", "256")
    page.click("#create-key")
    secret = page.inner_text("#new-secret").strip()
    assert secret.startswith("mgk_")
    row = page.locator("tr[data-key=search-mcp]")
    playwright_api.expect(row).to_contain_text("chat")
    playwright_api.expect(row).to_contain_text("256")
    shot(page, "03-keys-created")

    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    assert client.chat.completions.create(model="chat", messages=ASK).choices
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="moving", messages=ASK)

    page.click("#secret-done")
    playwright_api.expect(page.locator("#new-secret")).to_have_count(0)  # shown once, gone
    assert secret not in page.content()

    row.locator("button[data-action=edit]").click()
    dialog = page.locator("dialog[open]")
    dialog.locator("input[value=moving]").check()
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    playwright_api.expect(page.locator("tr[data-key=search-mcp]")).to_contain_text("moving")
    assert client.chat.completions.create(model="moving", messages=ASK).choices

    page.locator("tr[data-key=search-mcp] button[data-action=revoke]").click()
    confirm = page.locator("dialog[open]")
    playwright_api.expect(confirm).to_contain_text("Revoke key")
    confirm.locator("button[data-value=ok]").click()
    playwright_api.expect(
        page.locator("tr[data-key=search-mcp][data-state=revoked]")
    ).to_have_count(1)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="chat", messages=ASK)
    cells = page.locator("tr[data-key=test][data-state=active] td")
    spent = sum(r["cost_nano"] for r in gateway.ledger_rows() if r["key_name"] == "test")
    assert 0 < spent < 10_000_000
    columns = page.locator("#keys table thead th").all_inner_texts()
    today = cells.nth(columns.index("Spend today"))
    assert today.inner_text() == f"${spent / 1e9:.6f}"  # from the ledger
    shot(page, "03-keys")
    assert page.problems == []


def test_keys_page_pages_finds_and_follows_a_team(page, gateway_factory):
    """A gateway with a key per user: the page shows the first 100, loads more on demand,
    finds a key by part of its name, and the teams page links to all of a team's keys."""
    gateway = gateway_factory(console_config())
    database = gateway.runtime.database
    assert admin(gateway, "/admin/api/teams", "POST", json={"name": "crowd"}).status_code == 201
    for n in range(120):
        gateway.bg.run(create_key(database, f"user-{n:03d}", team="crowd" if n < 60 else None))
    total = len(admin(gateway, "/admin/api/keys?limit=1000").json()["keys"])
    assert total > 120  # the config's keys too
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "keys")
    rows = page.locator("#keys tbody tr")
    playwright_api.expect(page.locator("#keys-shown")).to_have_text(f"100 of {total} keys")
    playwright_api.expect(rows).to_have_count(100)
    page.click("#more-keys")
    playwright_api.expect(rows).to_have_count(total)
    playwright_api.expect(page.locator("#keys-shown")).to_have_text(f"{total} of {total} keys")
    playwright_api.expect(page.locator("#more-keys")).to_be_hidden()
    assert page.locator("tr[data-key=user-119]").count() == 1

    page.fill("#key-search", "USER-07")  # part of a name, any case
    page.press("#key-search", "Enter")
    playwright_api.expect(rows).to_have_count(10)
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.key)")) == [
        f"user-{n:03d}" for n in range(70, 80)
    ]
    shot(page, "03-keys-found")

    open_page(page, "teams")
    team = page.locator("tr[data-team=crowd]")
    playwright_api.expect(team).to_contain_text("user-000")
    team.locator("a.more-keys").click()  # "and 10 more": every key of the team
    page.wait_for_selector("#page[data-page=keys]")
    playwright_api.expect(page.locator("#key-team")).to_contain_text("crowd")
    playwright_api.expect(page.locator("#keys-shown")).to_have_text("60 of 60 keys")
    page.click("#key-team")  # the team filter goes, the search with it
    playwright_api.expect(page.locator("#keys-shown")).to_have_text(f"100 of {total} keys")
    assert page.problems == []


def patches(page) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The bodies of the PATCH requests the page sends, as they are sent."""
    sent: list[dict[str, Any]] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "PATCH" else None)
    return sent


def key_named(gateway: Gateway, name: str) -> dict[str, Any]:
    keys = admin(gateway, "/admin/api/keys").json()["keys"]
    return next(k for k in keys if k["name"] == name and k["state"] == "active")


def test_editing_a_key_keeps_models_no_longer_configured(page, gateway_factory):
    """A key whose models all left the config may use none. Changing only its cap in the
    console sent `models: null` (no box ticked: all models) and so opened every model
    to it; the dialog shows such models, keeps them, and sends only what changed."""
    gateway = gateway_factory(console_config())
    secret = gateway.new_key("restricted", models=["retired"])  # since removed from config
    sent = patches(page)
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "keys")
    page.locator("tr[data-key=restricted] button[data-action=edit]").click()
    dialog = page.locator("dialog[open]")
    dialog.locator("#edit-cap").fill("100")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    playwright_api.expect(page.locator("tr[data-key=restricted]")).to_contain_text("100")
    key = key_named(gateway, "restricted")
    assert key["models"] == ["retired"] and key["max_tokens_cap"] == 100
    assert sent == [{"max_tokens_cap": 100}]
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="chat", messages=ASK)
    # the dialog shows the model it cannot offer, ticked
    page.locator("tr[data-key=restricted] button[data-action=edit]").click()
    kept = dialog.locator("label[data-gone]")
    playwright_api.expect(kept).to_contain_text("retired (not configured now)")
    assert kept.locator("input").is_checked()
    # adding a configured model keeps the one that left
    dialog.locator("input[value=chat]").check()
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    playwright_api.expect(page.locator("tr[data-key=restricted]")).to_contain_text("chat")
    assert sorted(key_named(gateway, "restricted")["models"]) == ["chat", "retired"]
    assert sent[1] == {"models": ["chat", "retired"]}
    # saving with nothing changed sends nothing
    page.locator("tr[data-key=restricted] button[data-action=edit]").click()
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    assert len(sent) == 2
    assert page.problems == []


def test_rollouts_page_rolls_back_with_confirmation(page, gateway_factory):
    gateway = gateway_factory(console_config())
    assert admin(gateway, "/admin/api/rollouts/move/start", "POST").status_code == 200
    client = gateway.client()
    for _ in range(20):
        client.chat.completions.create(model="moving", messages=ASK)
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "rollouts")
    card = page.locator("section[data-rollout=move]")
    assert card.get_attribute("data-state") == "running"
    playwright_api.expect(card.locator(".split")).to_have_attribute("data-candidate-share", "10")
    assert card.locator("button[data-action=start]").is_disabled()
    shot(page, "04-rollouts-running")

    card.locator("button[data-action=rollback]").click()
    confirm = page.locator("dialog[open]")
    playwright_api.expect(confirm).to_contain_text("back to old")
    confirm.locator("button[data-value=cancel]").click()  # changing one's mind changes nothing
    assert gateway.runtime.plan.rollouts.rollouts["move"].state == "running"

    card.locator("button[data-action=rollback]").click()
    page.locator("dialog[open] button[data-value=ok]").click()
    rolled = page.locator("section[data-rollout=move][data-state=rolled_back]")
    playwright_api.expect(rolled).to_have_count(1)
    assert gateway.runtime.plan.rollouts.rollouts["move"].state == "rolled_back"
    playwright_api.expect(rolled).to_contain_text("rolled back")
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(model="moving", messages=ASK)
        assert raw.headers["x-metergate-upstream"] == "old"
    shot(page, "04-rollouts")
    assert page.problems == []


def test_upstreams_mcp_and_requests_pages(page, gateway_factory):
    gateway = gateway_factory(console_config())
    send_traffic(gateway)
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")

    open_page(page, "upstreams")
    assert page.get_attribute("tr[data-upstream=broken]", "data-circuit") == "open"
    assert page.get_attribute("tr[data-upstream=fast]", "data-circuit") == "closed"
    playwright_api.expect(page.locator("tr[data-upstream=shaky]")).to_contain_text("upstream_error")
    shot(page, "02-upstreams")

    open_page(page, "mcp")
    playwright_api.expect(page.locator("#mcp-empty")).to_contain_text("No MCP servers configured")
    shot(page, "05-mcp-empty")
    _fake_mcp_servers(gateway)
    page.reload()
    page.wait_for_selector("#page[data-page=mcp] #mcp-servers")
    playwright_api.expect(page.locator("tr[data-server=search]")).to_contain_text("up")
    playwright_api.expect(page.locator("tr[data-server=files]")).to_contain_text("down")
    playwright_api.expect(page.locator("tr[data-server=search]")).to_contain_text("crawl")
    shot(page, "05-mcp")

    open_page(page, "requests")
    rows = gateway.ledger_rows()
    assert page.locator("#requests tbody tr").count() == min(100, len(rows))
    # (the page's CSP forbids eval, so waits are locator assertions, not wait_for_function)
    page.select_option("#filter-outcome", "upstream_error")
    failed = sum(r["outcome"] == "upstream_error" for r in rows)
    playwright_api.expect(page.locator("#requests tbody tr")).to_have_count(failed)
    assert failed > 0
    assert page.locator("#requests tbody tr:not([data-outcome=upstream_error])").count() == 0
    page.select_option("#filter-model", "flaky")
    flaky_failed = sum(r["outcome"] == "upstream_error" and r["model"] == "flaky" for r in rows)
    playwright_api.expect(page.locator("#requests tbody tr")).to_have_count(flaky_failed)
    shot(page, "06-requests")
    with page.expect_download() as download:
        page.click("#export-csv")
    path = download.value.path()
    exported = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    assert exported and {(r["outcome"], r["model"]) for r in exported} == {
        ("upstream_error", "flaky")
    }
    assert download.value.suggested_filename.startswith("metergate-requests-")
    assert page.problems == []


def _fake_mcp_servers(gateway: Gateway) -> None:
    """Stand in for the MCP gateway: register its contract metrics and record calls."""
    from prometheus_client import Gauge, Histogram

    registry = gateway.runtime.metrics.registry
    up = Gauge("metergate_mcp_server_up", "up", ["mcp_server_name"], registry=registry)
    calls = Histogram(
        "mcp_client_operation_duration_seconds",
        "calls",
        ["mcp_server_name", "mcp_method_name", "gen_ai_tool_name", "error_type"],
        buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        registry=registry,
    )
    up.labels("search").set(1)
    up.labels("files").set(0)
    for seconds, tool, error in [(0.03, "lookup", "")] * 30 + [
        (3.0, "crawl", "timeout"),
        (1.2, "crawl", ""),
        (0.04, "lookup", "tool_error"),
    ]:
        calls.labels("search", "tools/call", tool, error).observe(seconds)
    calls.labels("files", "tools/call", "read_file", "transport").observe(0.5)


# --- the console with realistic names and numbers (issue: console polish) -------------------
#
# It fits the window, every tab is reachable, lines are told apart, the window fits the
# data, the forecast counts today, MCP rates have a fixed window, and a failed gate says
# who judged. Layout is asserted on the rendered elements' sizes.

# Names as providers spell them: long, with hyphens Chromium would break a line at.
MODELS = [
    "claude-sonnet-4-5-20250929", "claude-opus-4-1-20250805", "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-2025-04-14", "gemini-2.5-pro-preview-06-05", "gemini-2.5-flash-lite",
    "deepseek-chat-v3.1", "qwen3-coder-480b-a35b-instruct", "llama-3.3-70b-instruct-turbo",
    "mistral-large-2411", "o4-mini-deep-research", "text-embedding-3-large",
]  # fmt: skip


def fleet_config(models: list[str] = MODELS) -> dict[str, Any]:
    """Each model on two relays (provider model ids differ), one relay down with its circuit
    open, fallbacks, and a rollout whose candidate always fails."""
    sim = {"type": "simulated", "simulated": {"latency_ms": 1, "output_tokens": 12}}
    providers = {
        "holysheep-relay": sim,
        "openrouter-eu": sim,
        "down-relay": {"type": "simulated", "simulated": {"error_rate": 1.0}},
    }
    upstreams: dict[str, Any] = {}
    routes: dict[str, Any] = {}
    price = {"input": 1, "output": 2}
    for name in models:
        upstreams[f"holysheep-{name}"] = {
            "provider": "holysheep-relay",
            "model": name,
            "price": price,
        }
        upstreams[f"openrouter-{name}"] = {
            "provider": "openrouter-eu",
            "model": f"vendor/{name}",
            "price": price,
        }
        routes[name] = {"upstreams": [f"holysheep-{name}", f"openrouter-{name}"]}
    upstreams["down-relay-gpt-4.1-2025-04-14"] = {
        "provider": "down-relay", "model": "gpt-4.1-2025-04-14", "price": price,
        "circuit": {"failure_threshold": 1, "open_seconds": 60},
    }  # fmt: skip
    routes["broken-route"] = {
        "upstreams": ["down-relay-gpt-4.1-2025-04-14"],
        "retry": {"max_retries": 0},
    }
    routes[models[0]]["fallbacks"] = models[3:5]
    return {
        "providers": providers,
        "upstreams": upstreams,
        "models": routes,
        "admin": {"api_key": ADMIN_KEY},
    }


def traffic(gateway: Gateway, models: list[str]) -> None:
    """More requests for the first models, so the busiest are known; and a failure. An
    embeddings model gets embeddings requests (it refuses chat, as a real one does)."""
    client = gateway.client()
    for rank, name in enumerate(models):
        for _ in range(len(models) - rank):
            if "embed" in name:
                client.embeddings.create(model=name, input="console")
            else:
                client.chat.completions.create(model=name, messages=ASK)
    with pytest.raises(Exception):  # noqa: B017 - the upstream fails, the circuit opens
        client.chat.completions.create(model="broken-route", messages=ASK)


def overflow(page) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return page.evaluate("() => ({page: document.documentElement.scrollWidth - window.innerWidth})")


# --- upstreams table and names --------------------------------------------------------------


def test_upstreams_table_fits_1400px_and_names_never_break(page, gateway_factory):
    gateway = gateway_factory(fleet_config())
    traffic(gateway, MODELS)
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview] #charts")
    open_page(page, "upstreams")
    page.wait_for_selector("tr[data-upstream='down-relay-gpt-4.1-2025-04-14'][data-circuit=open]")
    shot(page, "10-upstreams-1400")
    sizes = page.evaluate(
        """() => {
          const wrap = document.querySelector('#upstreams .table-wrap');
          const names = [...document.querySelectorAll('#upstreams .name')];
          const broken = names.filter((el) => {
            const line = parseFloat(getComputedStyle(el).lineHeight) || 18;
            const tall = el.getBoundingClientRect().height > 1.6 * line;
            return el.getClientRects().length !== 1 || tall;
          }).map((el) => el.textContent);
          return {page: document.documentElement.scrollWidth - window.innerWidth,
                  table: wrap.scrollWidth - wrap.clientWidth, names: names.length, broken};
        }"""
    )
    assert sizes["page"] <= 0, f"the page is {sizes['page']} px wider than the window"
    assert sizes["table"] <= 0, f"the table scrolls sideways by {sizes['table']} px"
    # every upstream's name, provider and model id, and every model it serves
    rows = admin(gateway, "/admin/api/upstreams").json()["upstreams"]
    assert sizes["names"] == sum(3 + len(row["serves"]) for row in rows), sizes
    assert sizes["broken"] == []
    # the overview's model table too
    open_page(page, "overview")
    broken = page.evaluate(
        """() => [...document.querySelectorAll('#page .name')].filter(
             (el) => el.getClientRects().length !== 1).map((el) => el.textContent)"""
    )
    assert broken == []
    assert page.problems == []


def test_every_tab_is_in_view_at_800px(browser, gateway_factory):
    gateway = gateway_factory(fleet_config())
    traffic(gateway, MODELS[:3])
    context = browser.new_context(viewport={"width": 800, "height": 900})
    context.set_default_timeout(WAIT_MS)
    try:
        tab = context.new_page()
        sign_in(tab, gateway)
        tab.wait_for_selector("#page[data-page=overview] #charts")
        links = tab.evaluate(
            """() => {
              const nav = document.querySelector('nav');
              return {scroll: nav.scrollWidth - nav.clientWidth,
                      links: [...nav.querySelectorAll('a')].map((a) => {
                        const r = a.getBoundingClientRect();
                        return [a.dataset.page, r.left, r.right, r.top, r.bottom];
                      })};
            }"""
        )
        assert links["scroll"] <= 0, "the tabs scroll sideways"
        for name, left, right, top, bottom in links["links"]:
            assert left >= 0 and right <= 800 and top >= 0 and bottom <= 900, (name, left, right)
        tab.screenshot(path=str(SHOTS / "11-nav-800.png"))
        for name in ("mcp", "requests", "upstreams", "overview"):
            open_page(tab, name)  # a click, no scrolling
            assert overflow(tab)["page"] <= 0, f"{name} is wider than the window"
    finally:
        context.close()


# --- chart colours ------------------------------------------------------------------------


def _lab(rgb: tuple[int, ...]) -> tuple[float, float, float]:
    def linear(c: int) -> float:
        u = c / 255
        return ((u + 0.055) / 1.055) ** 2.4 if u > 0.04045 else u / 12.92

    r, g, b = (linear(c) for c in rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    fx, fy, fz = f(x), f(y), f(z)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def legend_colours(page) -> list[tuple[str, tuple[int, ...]]]:  # type: ignore[no-untyped-def]
    entries = page.evaluate(
        """() => [...document.querySelectorAll('#chart-requests_per_second .legend span')].map(
             (s) => [s.textContent, getComputedStyle(s).color])"""
    )
    return [
        (name, tuple(int(v) for v in re.findall(r"\d+", colour)[:3])) for name, colour in entries
    ]


def test_ten_distinct_colours_then_the_rest_grouped(page, browser, gateway_factory):
    gateway = gateway_factory(fleet_config())
    traffic(gateway, MODELS)  # 12 models (13 with the broken one) in the window
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview] #charts")
    shot(page, "12-overview-many-models")
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        legend = legend_colours(page)
        names = [name for name, _ in legend]
        assert len(legend) == 10, names
        assert names[-1] == "4 other models"  # the least busy three, and the broken one
        assert set(names[:-1]) == set(MODELS[:9])
        distances = [
            math.dist(_lab(a), _lab(b)) for (_, a), (_, b) in itertools.combinations(legend, 2)
        ]
        assert min(distances) > 20, f"{scheme}: two lines look alike ({min(distances):.1f})"
    page.emulate_media(color_scheme="light")
    # the grouped line counts the grouped models' requests together
    series = admin(gateway, "/admin/api/overview?window=1h").json()["series"]["models"]
    grouped = sum(v for v in series["4 other models"]["requests_per_second"] if v)
    per_model = {
        name: sum(v for v in line["requests_per_second"] if v) for name, line in series.items()
    }
    assert grouped * 60 == pytest.approx(3 + 2 + 1 + 1, rel=1e-3)  # per s, 1-minute buckets
    assert per_model[MODELS[0]] * 60 == pytest.approx(12, rel=1e-3)
    assert page.problems == []


# --- the default window -------------------------------------------------------------------


def test_default_window_follows_the_age_of_the_data(page, gateway_factory):
    gateway = gateway_factory(fleet_config(MODELS[:2]))
    traffic(gateway, MODELS[:2])  # all of it seconds old
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview] #charts")
    pressed = ".segmented button[aria-pressed=true]"
    assert page.get_attribute(pressed, "data-value") == "1h"
    playwright_api.expect(page.locator("#requests .label")).to_have_text("Requests (1h)")
    shot(page, "13-overview-young-data")

    # an older ledger: rows from five hours ago
    ledger = gateway.runtime.ledger
    old = LedgerRow(**{k: gateway.ledger_rows()[0][k] for k in COLUMNS})
    ledger.append(old._replace(ts=time.time() - 5 * 3600, request_id="old-row"))
    gateway.flush_ledger()
    page.reload()
    page.wait_for_selector("#page[data-page=overview] #charts")
    assert page.get_attribute(pressed, "data-value") == "24h"
    page.click(".segmented button[data-value='1h']")  # a choice of the operator's stays
    open_page(page, "upstreams")
    assert page.get_attribute(pressed, "data-value") == "1h"
    assert page.problems == []


# --- the forecast -------------------------------------------------------------------------


def test_forecast_counts_todays_spend_on_a_new_gateway(page, gateway_factory):
    gateway = gateway_factory(fleet_config(MODELS[:2]))
    traffic(gateway, MODELS[:2])
    spend = admin(gateway, "/admin/api/overview").json()["spend"]
    assert spend["today_nano"] > 0
    assert spend["daily_rate_nano"] > 0, "today's spend is the only spend: it sets the rate"
    assert spend["forecast_nano"] > spend["month_nano"] or spend["remaining_days"] == 0
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview] #charts")
    sub = page.inner_text("#forecast .sub")
    assert "$0.00/day" not in sub and re.search(r"run rate \$[\d.,]+/day \(last 60 min\)", sub), sub
    shot(page, "14-forecast")


# --- MCP rates ----------------------------------------------------------------------------


def test_mcp_rates_are_over_a_fixed_window_however_often_the_page_is_seen(
    page, gateway_factory, monkeypatch
):
    monkeypatch.setattr(mcp_view, "RATE_WINDOW", 2.0)  # a minute in production
    monkeypatch.setattr(mcp_view, "SAMPLE_EVERY", 0.2)
    started = time.monotonic()
    gateway = gateway_factory(fleet_config(MODELS[:1]))
    _fake_mcp_servers(gateway)
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "mcp")  # the first read starts the sampling
    deadline = time.monotonic() + 15
    window = 0.0
    while time.monotonic() < deadline:  # until samples cover a window (before: since start)
        window = admin(gateway, "/admin/api/mcp").json()["rate_window_seconds"]
        if 2.0 <= window < 2.3 and time.monotonic() - started > 3:
            break
        time.sleep(0.1)
    assert 2.0 <= window < 2.3, window
    for _ in range(3):  # seen again at once, and again: the same window
        page.reload()
        page.wait_for_selector("#page[data-page=mcp] #mcp-servers")
        playwright_api.expect(page.locator("#mcp-rate-window")).to_contain_text(
            "Rates over the last 2 s;"
        )
    shot(page, "15-mcp-rate-window")


# --- rollout history ----------------------------------------------------------------------


def test_a_failed_gate_says_the_controller_judged_it(page, gateway_factory):
    config = fleet_config(MODELS[:1])
    name = MODELS[0]
    config["providers"]["bad-relay"] = {"type": "simulated", "simulated": {"error_rate": 1.0}}
    config["upstreams"]["bad-relay-candidate"] = {
        "provider": "bad-relay",
        "model": "x",
        "circuit": {"enabled": False},
    }
    config["rollouts"] = {
        "to-bad": {
            "model": name,
            "baseline": [f"holysheep-{name}"],
            "candidate": ["bad-relay-candidate"],
            "stages": [50, 100],
            "interval_seconds": 1,
            "min_requests": 1,
            "failure_threshold": 100,
        }
    }
    gateway = gateway_factory(config)
    assert admin(gateway, "/admin/api/rollouts/to-bad/start", "POST").status_code == 200
    client = gateway.client()
    deadline = time.monotonic() + 20
    history: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        client.chat.completions.create(model=name, messages=ASK)  # retried on the baseline
        (rollout,) = admin(gateway, "/admin/api/rollouts").json()["rollouts"]
        history = [e for e in rollout["history"] if e["event"] == "gate_failed"]
        if history:
            break
    assert history, "no gate failed"
    assert history[0]["by"] == "controller" and history[0]["verdict"] == "fail"
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "rollouts")
    row = page.locator("section[data-rollout=to-bad] tr", has_text="gate failed").first
    cells = row.locator("td")
    assert cells.nth(3).inner_text() == "controller"
    assert cells.nth(4).inner_text().startswith("fail: ")
    shot(page, "16-rollout-gate-failed")


def test_a_judgment_from_prometheus_shows_the_circuit_gate(page, gateway_factory):
    """Judged from Prometheus, a stage also fails when every candidate circuit is open:
    the gates table shows that gate, failed, beside the others (which passed)."""
    config = console_config()
    config["rollouts"]["move"].update(source="prometheus", prometheus_url="http://127.0.0.1:9")
    gateway = gateway_factory(config)
    rollout = gateway.runtime.plan.rollouts.rollouts["move"]
    seen = Observed(attempts=2, error_rate=0.0, p99_seconds=0.1, server_errors=0, circuit_open=True)
    rollout.last_judgment = judge(rollout.config, seen, None)
    assert rollout.last_judgment["failed_gates"] == ["circuit_open"]
    assert gateway.bg.run(rollout_store.save(gateway.runtime.database, rollout))
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "rollouts")
    card = page.locator("section[data-rollout=move]")
    circuit = card.locator("tr", has_text="Every circuit open")
    playwright_api.expect(circuit).to_contain_text("yes")
    playwright_api.expect(circuit).to_contain_text("fail")
    playwright_api.expect(card.locator("tr", has_text="Error rate")).to_contain_text("pass")
    assert page.problems == []


def test_a_request_opens_with_its_attempts_headers_and_bodies(page, gateway_factory):
    config = console_config()
    config["request_log"] = {"enabled": True}
    gateway = gateway_factory(config)
    client = gateway.client()
    client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hello, write to kim@example.com"}],
        extra_headers={"x-metergate-tags": "feature=console"},
        seed=9007199254740993,  # past 2^53: a JavaScript number would show ...992
        temperature=1.0,
        extra_body={"metadata": {}},
    )
    client.chat.completions.create(model="resilient", messages=ASK)  # shaky, then chat
    gateway.flush_ledger()
    rows = admin(gateway, "/admin/api/requests").json()["requests"][::-1]  # oldest first
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "requests")
    first = rows[0]
    page.locator(f"#requests a[href='#/request?id={first['id']}']").click()
    page.wait_for_selector("#page[data-page=request] #request-detail")
    summary = page.locator("#summary")
    playwright_api.expect(summary).to_contain_text(first["request_id"])
    playwright_api.expect(summary).to_contain_text("feature=console")
    playwright_api.expect(summary).to_contain_text(f"${first['cost_nano'] / 1e9:.6f}")
    playwright_api.expect(page.locator("#request-headers")).to_contain_text("[REDACTED]")
    body = page.inner_text("#request-body pre")
    assert "[REDACTED:email]" in body and "kim@example.com" not in page.content()
    # indented, and as it was sent
    lines = body.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    for line in ('  "seed": 9007199254740993,', '  "temperature": 1.0', '  "metadata": {}'):
        assert any(seen.startswith(line) for seen in lines), (line, body)
    playwright_api.expect(page.locator("#response-body pre")).to_contain_text("chat.completion")
    playwright_api.expect(page.locator("#attempts tbody tr")).to_have_count(1)
    shot(page, "07-request")
    with page.expect_download() as download:
        page.click("#download-json")
    saved = Path(download.value.path()).read_text()
    assert first["request_id"] in saved
    # a request that fell back: each attempt on its own row and lane
    page.goto(base(gateway) + f"/console#/request?id={rows[-1]['id']}")
    page.wait_for_selector("#page[data-page=request] #attempts")
    attempts = rows[-1]["attempts"]
    playwright_api.expect(page.locator("#attempts tbody tr")).to_have_count(attempts)
    assert page.locator("#attempts .waterfall .lane").count() == attempts
    shot(page, "07-request-fallback")
    assert page.problems == []


def test_teams_page_creates_a_team_and_groups_spend_by_tag(page, gateway_factory):
    gateway = gateway_factory(console_config())
    client = gateway.client()
    for feature in ("search", "search", "rerank"):
        client.chat.completions.create(
            model="chat", messages=ASK, extra_headers={"x-metergate-tags": f"feature={feature}"}
        )
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "teams")
    page.fill("#team-name", "search")
    page.fill("#create-month", "25")
    page.fill("#create-rpm", "100")
    page.fill("#create-tags", "cost_center=42")
    page.click("#create-team")
    row = page.locator("tr[data-team=search]")
    playwright_api.expect(row).to_contain_text("100 rpm")
    playwright_api.expect(row).to_contain_text("cost_center=42")
    assert gateway.runtime.plan.budgets.team_budgets()["team:search:month"].limit_nano == 25 * 10**9
    row.locator("button[data-action=edit]").click()
    dialog = page.locator("dialog[open]")
    dialog.locator("#edit-rpm").fill("50")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(page.locator("tr[data-team=search]")).to_contain_text("50 rpm")
    page.fill("#tag-name", "feature")
    page.click("#tag-form button")
    groups = page.locator("#usage-by tbody tr")
    playwright_api.expect(groups).to_have_count(2)
    playwright_api.expect(page.locator("tr[data-group=search]")).to_contain_text("2")
    shot(page, "08-teams")
    page.locator("tr[data-team=search] button[data-action=delete]").click()
    page.locator("dialog[open] button[data-value=ok]").click()
    playwright_api.expect(page.locator("tr[data-team=search]")).to_have_count(0)
    assert page.problems == []


def test_spend_by_a_tag_of_many_values_shows_the_costliest_and_sums_the_rest(
    page, gateway_factory, monkeypatch
):
    """A tag with a value per user: the panel lists the costliest values only and says
    how many more there are and what they spent together."""
    monkeypatch.setattr(attribution, "GROUPS_DEFAULT", 2)
    gateway = gateway_factory(console_config())
    client = gateway.client()
    for user, count in (("ann", 3), ("bo", 2), ("cy", 1), ("di", 1)):
        for _ in range(count):
            client.chat.completions.create(
                model="chat", messages=ASK, extra_headers={"x-metergate-tags": f"user={user}"}
            )
    rest_nano = sum(
        r["cost_nano"]
        for r in gateway.ledger_rows()
        if json.loads(r["tags"])["user"] in ("cy", "di")
    )
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "teams")
    page.fill("#tag-name", "user")
    page.click("#tag-form button")
    groups = page.locator("#usage-by tbody tr")
    playwright_api.expect(groups).to_have_count(2)
    assert groups.evaluate_all("rows => rows.map(r => r.dataset.group)") == ["ann", "bo"]
    playwright_api.expect(page.locator("#more-groups")).to_contain_text(
        f"and 2 more, ${rest_nano / 1e9:.6f} together"
    )
    assert page.problems == []


def team_named(gateway: Gateway, name: str) -> dict[str, Any]:
    fields = ("name", "description", "tags", "budgets", "rpm", "tpm", "updated_at")
    teams = admin(gateway, "/admin/api/teams").json()["teams"]
    return next({k: t[k] for k in fields} for t in teams if t["name"] == name)


def test_editing_a_team_keeps_what_the_dialog_does_not_edit(page, gateway_factory):
    """The Edit dialog sent each budget as {period, limit_usd, hard}, and PATCH replaces
    budgets whole: saving reset a budget's time zone to UTC and its alerts to the
    default. Saving with nothing changed now leaves the team exactly as it was; a change
    sends only itself, and a changed budget keeps its time zone and alerts."""
    gateway = gateway_factory(console_config())
    daily = {
        "period": "day",
        "limit_usd": "10",
        "hard": False,
        "timezone": "Europe/Berlin",
        "alert_at_percent": [90],
    }
    monthly = {
        "period": "month",
        "limit_usd": "200",
        "hard": True,
        "timezone": "Asia/Tokyo",
        "alert_at_percent": [25, 75],
    }
    body = {"name": "tz", "rpm": 100, "description": "zones", "budgets": [daily, monthly]}
    assert admin(gateway, "/admin/api/teams", "POST", json=body).status_code == 201
    before = team_named(gateway, "tz")
    sent = patches(page)
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "teams")
    edit = page.locator("tr[data-team=tz] button[data-action=edit]")
    dialog = page.locator("dialog[open]")
    edit.click()
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    assert team_named(gateway, "tz") == before  # not even its time of change
    assert sent == []
    edit.click()  # the dialog says what it keeps
    playwright_api.expect(dialog.locator("[data-kept=day]")).to_have_text(
        "Europe/Berlin days, alerts at 90%"
    )
    dialog.locator("#edit-rpm").fill("50")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(page.locator("tr[data-team=tz]")).to_contain_text("50 rpm")
    assert sent == [{"rpm": 50}]
    assert team_named(gateway, "tz")["budgets"] == before["budgets"]
    edit.click()
    dialog.locator("#edit-day").fill("12")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(page.locator("tr[data-team=tz]")).to_contain_text("$12.00")
    assert team_named(gateway, "tz")["budgets"] == [{**daily, "limit_usd": "12"}, monthly]
    assert sent[1].keys() == {"budgets"}
    assert page.problems == []


def test_tags_with_commas_survive_the_edit_dialogs(page, gateway_factory):
    """A tag value may hold a comma (and "=", spaces at either end). The dialogs showed
    tags as "name=value, name=value" and could not read "a, b" back: the key and team
    could not be saved. One tag a line round-trips every value the API takes."""
    gateway = gateway_factory(console_config())
    tags = {"note": "a, b", "pad": " x=y "}
    team = {"name": "commas", "tags": tags}
    assert admin(gateway, "/admin/api/teams", "POST", json=team).status_code == 201
    key = {"name": "commatag", "tags": tags}
    assert admin(gateway, "/admin/api/keys", "POST", json=key).status_code == 201
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    dialog = page.locator("dialog[open]")
    for page_name, row, field in (
        ("keys", "tr[data-key=commatag]", "#edit-tags"),
        ("teams", "tr[data-team=commas]", "#edit-tags"),
    ):
        open_page(page, page_name)
        page.locator(f"{row} button[data-action=edit]").click()
        shown = dialog.locator(field).input_value()
        dialog.locator(field).fill(shown + "\nenv=prod")
        shot(page, f"09-{page_name}-edit-tags")
        dialog.locator("button[data-value=save]").click()
        playwright_api.expect(dialog).to_have_count(0)
        playwright_api.expect(page.locator(row)).to_be_visible()
    assert key_named(gateway, "commatag")["tags"] == {**tags, "env": "prod"}
    assert team_named(gateway, "commas")["tags"] == {**tags, "env": "prod"}
    assert page.problems == []


# --- auto-refresh -------------------------------------------------------------------------

# Counts the Overview's loads, and holds them while `__hold` is set (a slow ledger).
HOLD_OVERVIEW = """
window.__calls = 0;
window.__hold = false;
const waiting = [];
window.__release = () => {
  window.__hold = false;
  waiting.splice(0).forEach((go) => go());
};
const original = window.fetch.bind(window);
window.fetch = (input, init) => {
  if (!String(input).includes("/admin/api/overview")) return original(input, init);
  window.__calls += 1;
  if (!window.__hold) return original(input, init);
  return new Promise((go) => waiting.push(go)).then(() => original(input, init));
};
"""


def test_a_page_still_loading_is_not_asked_again(page, gateway_factory):
    """The Overview refreshes every 15 s; over a big ledger a load can take longer, and
    asking again meanwhile would pile up reports on the gateway. After a slow load the
    next waits ten times that load, so an open console never keeps the gateway busy."""
    gateway = gateway_factory(fleet_config(MODELS[:2]))
    page.add_init_script(HOLD_OVERVIEW)
    page.clock.install()
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview] #charts")
    loaded = page.get_attribute("#page", "data-loaded")
    page.evaluate("window.__hold = true")
    calls = page.evaluate("window.__calls")
    page.clock.run_for(15_000)  # the refresh asks, and waits for the answer
    assert page.evaluate("window.__calls") == calls + 1
    page.clock.run_for(60_000)  # four more refresh ticks while it waits
    assert page.evaluate("window.__calls") == calls + 1
    page.evaluate("window.__release()")
    page.wait_for_selector(f"#page[data-page=overview]:not([data-loaded='{loaded}'])")
    # the load took 60-75 s (from its tick to the release): none again for ten times that
    page.clock.run_for(15_000)
    assert page.evaluate("window.__calls") == calls + 1
    page.clock.run_for(510_000)  # 600 s after the hold began: still too soon
    assert page.evaluate("window.__calls") == calls + 1
    page.clock.run_for(150_000)  # 750 s after it: past ten loads whenever its tick came
    assert page.evaluate("window.__calls") >= calls + 2
    assert page.problems == []


def test_a_budget_for_each_key_on_the_overview_and_keys_pages(page, gateway_factory):
    config = console_config()
    config["budgets"] = {
        "per-user": {"scope": "key", "target": "*", "period": "day", "limit_usd": 0.001}
    }
    gateway = gateway_factory(config)
    heavy = openai.OpenAI(
        base_url=gateway.base_url, api_key=gateway.new_key("heavy-user"), max_retries=0
    )
    with pytest.raises(openai.RateLimitError, match="key heavy-user"):
        for _ in range(200):
            heavy.chat.completions.create(model="chat", messages=ASK, max_tokens=12)
    gateway.client().chat.completions.create(model="chat", messages=ASK, max_tokens=12)
    sign_in(page, gateway)
    row = page.locator("#budgets .budget[data-budget=per-user]")
    playwright_api.expect(row).to_contain_text("each key apart")
    playwright_api.expect(row).to_contain_text("most: heavy-user")
    playwright_api.expect(row).to_contain_text("1 key past it")
    assert row.locator(".bar").get_attribute("data-state") in ("warning", "exceeded")
    open_page(page, "keys")
    heavy_row = page.locator("tr", has_text="heavy-user")
    playwright_api.expect(heavy_row).to_contain_text("per-user:")
    assert heavy_row.locator(".bar").get_attribute("data-state") in ("warning", "exceeded")
    light_row = page.locator("tr", has=page.locator("td", has_text=re.compile(r"^test$")))
    assert light_row.locator(".bar").get_attribute("data-state") == "ok"
    shot(page, "each-key-budget")
    # the heavy user gets a plan of its own: ten times the limit, and is served again
    sent = patches(page)
    heavy_row.locator("button[data-action=edit]").click()
    dialog = page.locator("dialog[open]")
    dialog.locator("#edit-limits").fill("per-user=0.01")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    assert sent == [{"budget_limits": {"per-user": "0.01"}}]
    playwright_api.expect(heavy_row).to_contain_text("/ $0.0100 per day")
    assert heavy.chat.completions.create(model="chat", messages=ASK, max_tokens=12).usage
    heavy_row.locator("button[data-action=edit]").click()
    assert dialog.locator("#edit-limits").input_value() == "per-user=0.01"
    dialog.locator("button[data-value=cancel]").click()
    assert page.problems == []


def edit_key(page, gateway: Gateway, name: str):  # type: ignore[no-untyped-def]
    """Sign in, open the keys page and the Edit dialog of key `name`: its row, the dialog."""
    sign_in(page, gateway)
    page.wait_for_selector("#page[data-page=overview]")
    open_page(page, "keys")
    row = page.locator(f"tr[data-key={name}]")
    row.locator("button[data-action=edit]").click()
    return row, page.locator("dialog[open]")


def create_in_form(page, gateway: Gateway, name: str, fields: dict[str, str], shows: str):  # type: ignore[no-untyped-def]
    """Create key `name` with the create form's `fields` (input id -> text); wait until
    its row shows `shows`; the key as the admin API lists it."""
    page.fill("#key-name", name)
    for field, text in fields.items():
        page.fill(f"#{field}", text)
    page.click("#create-key")
    playwright_api.expect(page.locator(f"tr[data-key={name}]")).to_contain_text(shows)
    return admin(gateway, "/admin/api/keys", params={"search": name}).json()["keys"][0]


def test_a_keys_expiry_is_set_shown_and_lifted_in_the_console(page, gateway_factory):
    gateway = gateway_factory(console_config())
    secret = gateway.new_key("contractor")
    sent = patches(page)
    row, dialog = edit_key(page, gateway, "contractor")
    dialog.locator("#edit-expires").fill("2020-01-01")  # a day already past: expired at once
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    assert sent == [{"expires_at": 1577836800}]  # 2020-01-01T00:00:00Z
    playwright_api.expect(row.locator(".badge")).to_contain_text("expired")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="expired at 2020-01-01T00:00:00Z"):
        client.chat.completions.create(model="chat", messages=ASK)
    shot(page, "key-expired")
    # an expired key can still be edited: a later day, then none
    row.locator("button[data-action=edit]").click()
    assert dialog.locator("#edit-expires").input_value() == "2020-01-01"
    dialog.locator("#edit-expires").fill("2999-12-31")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(row).to_contain_text("expires")
    assert client.chat.completions.create(model="chat", messages=ASK).usage
    row.locator("button[data-action=edit]").click()
    dialog.locator("#edit-expires").fill("")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    assert sent[1:] == [{"expires_at": 32503593600}, {"expires_at": None}]
    playwright_api.expect(row).not_to_contain_text("expires")
    # a new key may be given a day from the create form
    trial = create_in_form(page, gateway, "trial", {"key-expires": "2999-12-31"}, "expires")
    assert trial["expires_at"] == 32503593600
    # but not a day already begun: such a key would never work (a slip), so none is made
    page.fill("#key-name", "late")
    page.fill("#key-expires", "2020-01-01")
    page.click("#create-key")
    playwright_api.expect(page.locator("#create-error")).to_contain_text(
        "2020-01-01 00:00 UTC is already past"
    )
    assert admin(gateway, "/admin/api/keys", params={"search": "late"}).json()["keys"] == []
    assert page.problems == []


def test_a_keys_own_rates_are_edited_and_shown(page, gateway_factory):
    gateway = gateway_factory(console_config())
    gateway.new_key("metered")
    sent = patches(page)
    row, dialog = edit_key(page, gateway, "metered")
    dialog.locator("#edit-rpm").fill("3")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    assert sent == [{"rpm": 3}]
    playwright_api.expect(row).to_contain_text("3 / —")
    row.locator("button[data-action=edit]").click()
    assert dialog.locator("#edit-rpm").input_value() == "3"
    dialog.locator("#edit-rpm").fill("")
    dialog.locator("#edit-tpm").fill("5000")
    dialog.locator("button[data-value=save]").click()
    playwright_api.expect(dialog).to_have_count(0)
    assert sent[1] == {"rpm": None, "tpm": 5000}
    playwright_api.expect(row).to_contain_text("— / 5,000")
    # a key on a plan is created with its rates at once
    planned = create_in_form(page, gateway, "planned", {"key-rpm": "60"}, "60 / —")
    assert (planned["rpm"], planned["tpm"]) == (60, None)
    assert page.problems == []
