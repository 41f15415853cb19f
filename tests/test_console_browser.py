"""The console in a real browser: headless Chromium (Debian's) driven by Playwright.

Each test starts a gateway, sends traffic with the openai SDK, and works the console
like an operator. Screenshots of every page go to tests/artifacts/console/ for review.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.harness import Gateway
from tests.test_console_api import ADMIN_KEY, ASK, admin, base, console_config, send_traffic

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
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
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
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
    assert cells.nth(4).inner_text() == f"${spent / 1e9:.6f}"  # spend today, from the ledger
    shot(page, "03-keys")
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


def test_a_request_opens_with_its_attempts_headers_and_bodies(page, gateway_factory):
    config = console_config()
    config["request_log"] = {"enabled": True}
    gateway = gateway_factory(config)
    client = gateway.client()
    client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hello, write to kim@example.com"}],
        extra_headers={"x-metergate-tags": "feature=console"},
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
