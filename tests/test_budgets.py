"""Budgets: hard limits hold under concurrency, thresholds notify, spend survives restarts."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from metergate.budgets.book import exhausted, usd
from metergate.budgets.budget import Budget
from metergate.budgets.period import period_bounds
from metergate.config.model import BudgetConfig
from metergate.metering.estimate import WorstCase
from tests.harness import (
    UpstreamServer,
    WebhookReceiver,
    eventually,
    simulated_config,
    start_gateway,
)
from tests.upstreams import anthropic_server

ASK = [{"role": "user", "content": "budget me"}]


def budget_config(limit_usd: float, **budget: object) -> dict:
    config = simulated_config(latency_ms=50, output_tokens=10)
    # 1 USD per token for input and output makes every cost easy to reason about
    config["upstreams"]["sim-up"]["price"] = {"input": 1_000_000, "output": 1_000_000}
    config["budgets"] = {"cap": {"limit_usd": limit_usd, **budget}}
    return config


async def one(client: openai.AsyncOpenAI, i: int) -> str:
    """One request under the budget: "ok", or "refused" by it."""
    try:
        await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": f"q{i:03d}"}], max_tokens=10
        )
        return "ok"
    except openai.RateLimitError as error:
        assert error.code == "budget_exceeded"
        return "refused"


def test_hard_limit_refuses_with_details(gateway_factory):
    gateway = gateway_factory(budget_config(100, period="day"))
    client = gateway.client()
    first = client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    assert first.usage.total_tokens > 0
    with pytest.raises(openai.RateLimitError) as raised:
        for _ in range(20):
            client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    error = raised.value
    assert error.code == "budget_exceeded" and error.type == "budget_exceeded"
    message = error.message
    assert "budget 'cap' (global, per day)" in message and "limit $100" in message
    _, end = period_bounds(time.time(), "day", "UTC")
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)) in message
    assert 0 < int(error.response.headers["retry-after"]) <= 86400
    rows = gateway.ledger_rows()
    assert sum(r["cost_nano"] for r in rows) <= 100 * 10**9
    assert rows[-1]["outcome"] == "budget_exceeded" and rows[-1]["status"] == 429


async def test_200_concurrent_requests_never_pass_a_hard_limit(gateway_factory):
    limit = 600  # each answer costs ~ (prompt + 10) USD; the limit admits a few dozen
    gateway = gateway_factory(budget_config(limit))
    client = gateway.async_client()

    results = await asyncio.gather(*(one(client, i) for i in range(200)))
    rows = gateway.ledger_rows()
    spent = sum(r["cost_nano"] for r in rows)
    assert spent <= limit * 10**9
    assert results.count("ok") == sum(r["outcome"] == "success" for r in rows) > 0
    assert results.count("refused") > 0
    assert gateway.metric("metergate_budget_spent_usd", budget="cap") == spent / 1e9
    assert gateway.metric("metergate_budget_limit_usd", budget="cap") == limit


async def test_a_reload_that_changes_a_budget_keeps_its_spend_and_holds(gateway_factory):
    """Requests in flight across a reload that changes a hard budget's limit settle on
    the budget they reserved on: the limit holds and no spend is forgotten (a budget
    rebuilt from the ledger at the reload missed what those requests then spent)."""
    admin = "admin-secret-0123456789abcdef"
    limit = 600
    config = budget_config(limit)
    config["providers"]["sim"]["simulated"]["latency_ms"] = 400  # in flight at the reload
    config["admin"] = {"api_key": admin}
    gateway = gateway_factory(config)
    path = Path(gateway.runtime.source)
    client = gateway.async_client()

    def cap() -> Budget:
        return gateway.runtime.plan.budgets.budgets[0]

    results: list[str] = []
    async with httpx.AsyncClient(timeout=30) as http:
        for wave, new_limit in enumerate((limit + 1, limit) * 3):
            requests = [asyncio.ensure_future(one(client, wave * 20 + i)) for i in range(20)]
            assert await eventually(lambda: cap().reserved_nano > 0)
            config["budgets"]["cap"]["limit_usd"] = new_limit
            await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
            reloaded = await http.post(
                gateway.base_url.removesuffix("/v1") + "/admin/reload",
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert reloaded.status_code == 200, reloaded.text
            results += await asyncio.gather(*requests)
    gateway.flush_ledger()
    spent = sum(r["cost_nano"] for r in gateway.ledger_rows())
    assert "ok" in results and "refused" in results
    assert spent <= (limit + 1) * 10**9
    assert (cap().spent_nano, cap().reserved_nano) == (spent, 0)
    assert gateway.metric("metergate_budget_spent_usd", budget="cap") == spent / 1e9
    assert gateway.metric("metergate_budget_limit_usd", budget="cap") == limit


@pytest.mark.parametrize("where", ["config", "team"])
async def test_a_budget_rebuilt_while_requests_run_counts_what_they_spend(gateway_factory, where):
    """A budget given another time zone (or period) is rebuilt from the ledger, where
    the requests in flight have no row yet: they settle on it, and it holds what they
    hold meanwhile (they settled on the replaced one, which counted for nobody, and a
    hard limit went unenforced by what they spent). A config budget, and a team's."""
    admin = "admin-secret-0123456789abcdef"
    config = budget_config(10_000, period="day", timezone="UTC", hard=True)
    config["providers"]["sim"]["simulated"]["latency_ms"] = 400  # in flight at the change
    config["admin"] = {"api_key": admin}
    base = "team:crew:day"
    if where == "team":
        del config["budgets"]
    gateway = gateway_factory(config)
    path = Path(gateway.runtime.source)
    headers = {"Authorization": f"Bearer {admin}"}
    origin = gateway.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=30, headers=headers) as http:
        if where == "team":
            team = {"name": "crew", "budgets": [{"period": "day", "limit_usd": "10000"}]}
            made = await http.post(f"{origin}/admin/api/teams", json=team)
            assert made.status_code in (200, 201), made.text
            key = await http.post(f"{origin}/admin/api/keys", json={"name": "c", "team": "crew"})
            client = openai.AsyncOpenAI(
                base_url=gateway.base_url, api_key=key.json()["secret"], max_retries=0
            )
        else:
            client = gateway.async_client()

        def budget() -> Budget:
            book = gateway.runtime.plan.budgets
            return book.team_budgets()[base] if where == "team" else book.budgets[0]

        before = budget()
        requests = [asyncio.ensure_future(one(client, i)) for i in range(10)]
        assert await eventually(lambda: before.reserved_nano > 0)
        if where == "team":
            zone = {"budgets": [{"period": "day", "limit_usd": "10000", "timezone": "Etc/UTC"}]}
            changed = await http.patch(f"{origin}/admin/api/teams/crew", json=zone)
        else:
            config["budgets"]["cap"]["timezone"] = "Etc/UTC"
            await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
            changed = await http.post(f"{origin}/admin/reload")
        assert changed.status_code == 200, changed.text
        assert budget() is not before  # rebuilt, not kept
        assert budget().reserved_nano == before.reserved_nano  # holding what is in flight
        assert await asyncio.gather(*requests) == ["ok"] * 10
    gateway.flush_ledger()
    spent = sum(r["cost_nano"] for r in gateway.ledger_rows())
    assert spent > 0
    assert (budget().spent_nano, budget().reserved_nano) == (spent, 0)


def test_soft_thresholds_notify_once_each(gateway_factory, bg):
    receiver = WebhookReceiver(bg)
    received = receiver.received
    try:
        gateway = gateway_factory(
            budget_config(
                400, hard=False, alert_at_percent=[10, 50, 100], webhook_url=receiver.hook_url
            )
        )
        client = gateway.client()
        for _ in range(30):  # ~16 USD each: passes 10%, 50% and 100% of 400, never refused
            client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
        deadline = time.monotonic() + 5
        while len(received) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        receiver.close()
    assert [notice["percent"] for notice in received] == [10, 50, 100]
    assert all("text" in notice and "'cap'" in notice["text"] for notice in received)
    assert f"${usd(int(received[-1]['spent_usd'] * 1e9))} of $400.00" in received[-1]["text"]
    assert received[-1]["spent_usd"] >= 400 and received[-1]["limit_usd"] == 400
    assert gateway.metric("metergate_budget_alerts_total", budget="cap", threshold="50") == 1


@pytest.mark.parametrize("shared", ["process", "redis"])
def test_a_raised_limit_announces_its_thresholds_again(gateway_factory, request, shared):
    """A limit raised mid-period is a new limit to be warned about: 50 % of it is
    announced when reached, as 50 % of the old one was; with Redis too (the fleet's
    record of announced thresholds kept the percent alone, so it never was)."""
    config = budget_config(400, hard=False, alert_at_percent=[50])
    if shared == "redis":
        redis_server = request.getfixturevalue("redis_server")
        redis_server.flushall()
        config["redis"] = {"url": redis_server.url}
    gateway = gateway_factory(config)
    client = gateway.client()

    def announced() -> float:
        return gateway.metric("metergate_budget_alerts_total", budget="cap", threshold="50")

    def spend_until(count: float) -> None:
        deadline = time.monotonic() + 30
        while announced() < count:  # ~16 USD a request
            assert time.monotonic() < deadline, "the threshold was not announced"
            client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)

    spend_until(1)
    config["budgets"]["cap"]["limit_usd"] = 800
    Path(gateway.runtime.source).write_text(yaml.safe_dump(config))
    assert gateway.bg.run(gateway.runtime.reload_from_source("test"))
    spend_until(2)
    gateway.flush_ledger()
    spent = sum(r["cost_nano"] for r in gateway.ledger_rows())
    assert 400 * 10**9 <= spent < 480 * 10**9  # said when reached, not long after


def test_alert_text_shows_a_small_budgets_digits():
    """Cents, and below them what a small budget needs: "$0.0015 of $0.002", not
    "$0.00 of $0.00"."""
    assert [usd(n) for n in (1_500_000, 2_000_000, 400 * 10**9, 12_345_678_900, 0)] == [
        "0.0015",
        "0.002",
        "400.00",
        "12.345679",
        "0.00",
    ]


def test_key_and_model_budgets_apply_only_to_their_target(gateway_factory):
    config = budget_config(1)  # global budget too small for anything ...
    config["budgets"] = {
        "search": {"scope": "key", "target": "search-mcp", "limit_usd": 1},
        "sim-model": {"scope": "model", "target": "sim", "limit_usd": 10_000},
    }
    gateway = gateway_factory(config)
    search = openai.OpenAI(
        base_url=gateway.base_url, api_key=gateway.new_key("search-mcp"), max_retries=0
    )
    with pytest.raises(openai.RateLimitError, match="budget 'search' \\(key search-mcp"):
        search.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    assert gateway.client().chat.completions.create(model="sim", messages=ASK, max_tokens=10)


def test_spend_survives_a_restart(bg, tmp_path):
    config = budget_config(100)
    first = start_gateway(bg, config, tmp_path)
    try:
        first.client().chat.completions.create(model="sim", messages=ASK, max_tokens=10)
        spent = first.metric("metergate_budget_spent_usd", budget="cap")
        assert spent > 0
    finally:
        first.stop()
    second = start_gateway(bg, config, tmp_path, key_name="after-restart")
    try:
        assert second.metric("metergate_budget_spent_usd", budget="cap") == spent
    finally:
        second.stop()


def test_missing_max_tokens_is_bounded_when_a_hard_budget_applies(gateway_factory):
    config = budget_config(10_000)
    config["models"]["sim"]["budget_max_tokens"] = 3
    gateway = gateway_factory(config)
    reply = gateway.client().chat.completions.create(model="sim", messages=ASK)
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


def test_images_by_url_are_held_at_their_token_bound(gateway_factory):
    """An image given by URL is a few dozen request bytes but a thousand tokens or more
    upstream: the hold counts `budget_attachment_tokens` for each, so a hard budget
    refuses before the call what its images may cost."""
    images = [
        {"type": "image_url", "image_url": {"url": f"https://img.example/{i}.png"}}
        for i in range(3)
    ]
    ask = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, *images]}]
    config = budget_config(10_000)  # $1 a token: 3 images x 4,000 tokens is $12,000
    gateway = gateway_factory(config)
    with pytest.raises(openai.RateLimitError, match="the prompt alone may cost up to"):
        gateway.client().chat.completions.create(model="sim", messages=ask, max_tokens=10)
    assert not [r for r in gateway.ledger_rows() if r["outcome"] == "success"]

    config["models"]["sim"]["budget_attachment_tokens"] = 100  # the model's own bound
    gateway = gateway_factory(config)
    reply = gateway.client().chat.completions.create(model="sim", messages=ask, max_tokens=10)
    assert reply.usage.total_tokens > 0


TOOL_USE = {"type": "tool_use", "id": "t1", "name": "look", "input": {}}
PICTURE = {"type": "image", "source": {"type": "url", "url": "https://img.example/1.png"}}
HIDDEN_ATTACHMENTS = {
    "tool result images": (
        "/messages",
        {
            "messages": [
                {"role": "user", "content": "look"},
                {"role": "assistant", "content": [TOOL_USE]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": [PICTURE] * 3}
                    ],
                },
            ]
        },
    ),
    "url documents": (
        "/messages",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "document", "source": {"type": "url", "url": "https://d/x.pdf"}}
                    ]
                    * 3,
                }
            ]
        },
    ),
    "files by url or id": (
        "/responses",
        {
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_file", "file_url": "https://d/x.pdf"},
                        {"type": "input_image", "file_id": "file-1"},
                        {"type": "input_image", "file_id": "file-2"},
                    ],
                }
            ]
        },
    ),
    "images in a tool output": (
        "/responses",
        {
            "input": [
                {"type": "function_call", "call_id": "c1", "name": "look", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c1",
                    "output": [{"type": "input_image", "image_url": "https://img.example/1.png"}]
                    * 3,
                },
            ]
        },
    ),
}


@pytest.mark.parametrize("case", HIDDEN_ATTACHMENTS)
def test_attachments_the_chat_form_cannot_carry_are_held_too(gateway_factory, case):
    """Images and documents that only an upstream speaking the caller's protocol gets
    (in tool results, by URL or file id) are held like any other: the hold searches the
    request in every form an upstream may get it."""
    path, body = HIDDEN_ATTACHMENTS[case]
    gateway = gateway_factory(budget_config(10_000))  # 3 x 4,000 tokens at $1: $12,000
    limit = {"/messages": {"max_tokens": 10}, "/responses": {"max_output_tokens": 10}}[path]
    answer = httpx.post(
        gateway.base_url + path,
        json={"model": "sim", **limit, **body},
        headers={"authorization": f"Bearer {gateway.key}"},
        timeout=30,
    )
    assert answer.status_code == 429, answer.text
    assert "the prompt alone may cost up to" in answer.text


def test_an_attachment_spelled_with_escapes_is_held_too(gateway_factory):
    """The hold looks for attachments only in bodies whose bytes may hold one; a type
    written with JSON escapes (`"\\u0069mage_url"`) is still one, and still held."""
    image = '{"type": "\\u0069mage_url", "\\u0069mage_url": {"url": "https://img.example/1.png"}}'
    raw = (
        '{"model": "sim", "max_tokens": 10, "messages": [{"role": "user", "content": ['
        + ", ".join([image] * 3)
        + "]}]}"
    )
    assert "image" not in raw
    gateway = gateway_factory(budget_config(10_000))  # 3 x 4,000 tokens at $1: $12,000
    answer = httpx.post(
        gateway.base_url + "/chat/completions",
        content=raw,
        headers={"authorization": f"Bearer {gateway.key}", "content-type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 429, answer.text
    assert "the prompt alone may cost up to" in answer.text


def test_a_stored_conversation_is_held_at_its_size(gateway_factory):
    """A Responses request with `previous_response_id` sends the stored conversation
    upstream: its hold bounds that prompt, not the few bytes the caller sent."""
    config = budget_config(1)
    config["models"]["capped"] = {"upstreams": ["sim-up"]}
    limit = 5_000
    config["budgets"] = {"capped": {"scope": "model", "target": "capped", "limit_usd": limit}}
    gateway = gateway_factory(config)
    client = gateway.client()
    long_input = " ".join(f"word{i}" for i in range(8000))  # ~60 kB, thousands of tokens
    first = client.responses.create(model="sim", input=long_input, max_output_tokens=10)
    with pytest.raises(openai.RateLimitError, match="the prompt alone may cost up to"):
        client.responses.create(
            model="capped", input="go on", previous_response_id=first.id, max_output_tokens=10
        )
    capped = [r for r in gateway.ledger_rows() if r["model"] == "capped"]
    assert sum(r["cost_nano"] for r in capped) <= limit * 10**9
    assert [r["outcome"] for r in capped] == ["budget_exceeded"]


def test_a_soft_budget_leaves_a_missing_max_tokens_missing(gateway_factory):
    """A soft budget only alerts: it bounds nothing, so the caller's answer is not cut at
    budget_max_tokens as a hard budget's would be."""
    config = budget_config(10_000, hard=False)
    config["models"]["sim"]["budget_max_tokens"] = 3
    gateway = gateway_factory(config)
    reply = gateway.client().chat.completions.create(model="sim", messages=ASK)
    assert reply.usage.completion_tokens > 3
    assert reply.choices[0].finish_reason == "stop"


def test_period_bounds_follow_the_time_zone():
    now = 1_795_800_000.0  # 2026-11-27T17:20:00Z, already 11-28 in Seoul
    start, end = period_bounds(now, "month", "UTC")
    assert time.gmtime(start)[:3] == (2026, 11, 1) and time.gmtime(end)[:3] == (2026, 12, 1)
    seoul_start, _ = period_bounds(now, "day", "Asia/Seoul")
    assert time.gmtime(seoul_start)[:4] == (2026, 11, 27, 15)  # midnight in Seoul, UTC+9
    ny_start, ny_end = period_bounds(now, "month", "America/New_York")
    assert ny_end - ny_start == 30 * 86400 + 3600  # November 2026 gains the DST hour


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
def test_a_refusal_for_want_of_max_tokens_says_which_fits(gateway_factory, request, shared):
    """Zero spend, no max_tokens: budget_max_tokens x price is more than the budget, so
    the request is refused; the message names a max_tokens that fits, and it does."""
    config = simulated_config(output_tokens=10)
    # $1 per million input tokens, $1000 per million output: budget_max_tokens (4096)
    # bounds the answer at $4.096, four times the $1 budget
    config["upstreams"]["sim-up"]["price"] = {"input": 1, "output": 1000}
    config["budgets"] = {"cap": {"limit_usd": 1, "period": "day"}}
    if shared:
        config["redis"] = {"url": request.getfixturevalue("redis_url"), "key_prefix": "fit:"}
    gateway = gateway_factory(config)
    client = gateway.client()
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="sim", messages=ASK)
    message = raised.value.message
    assert "sent no max_tokens" in message and "budget_max_tokens, 4096" in message
    fits = int(re.search(r"send max_tokens of at most (\d+)", message).group(1))
    assert 900 < fits < 1000  # $1 left, $0.001 a token, minus the prompt's bound
    reply = client.chat.completions.create(model="sim", messages=ASK, max_tokens=fits)
    assert reply.usage.completion_tokens == 10
    with pytest.raises(openai.RateLimitError):  # (with Redis, the hold may still be held)
        client.chat.completions.create(model="sim", messages=ASK, max_tokens=fits + 100)


def test_a_refusal_says_why_no_max_tokens_fits():
    budget = Budget("cap", BudgetConfig(limit_usd=1, period="day"), 10**9)
    # a byte of prompt costs 1e-6 USD, a token of output 1e-3 USD; 100 bytes, 100 tokens
    worst = WorstCase(100_100_000, 1_000_000, 100_000_000, 1_000_000_000, 100)
    in_flight = exhausted(budget, worst, spent_nano=0, held_nano=999_500_000).message
    assert (
        "of the $0.000500 left, the prompt may take up to $0.000100 and the rest does not "
        "pay for one output token"
    ) in in_flight
    spent = exhausted(budget, worst, spent_nano=999_950_000, held_nano=0).message
    assert "the prompt alone may cost up to $0.000100, more than the $0.000050 left" in spent
    room = exhausted(budget, worst, spent_nano=900_000_000, held_nano=0).message
    assert "send max_tokens of at most 99 to fit the $0.100000 left" in room
    # A request that sent max_tokens does not grow when it sends a smaller one: all the
    # room after its prompt is for tokens (it was refused as if it would add the field).
    dear = WorstCase(210_000_000, 100_000_000, 10_000_000_000, 10_000_000_000, 20)
    tight = exhausted(budget, dear, spent_nano=950_000_000, held_nano=0).message
    assert "send max_tokens of at most 4 to fit the $0.050000 left" in tight
    # Nothing left (spent to the limit, or past a limit lowered since): no prompt fits,
    # so none is to be shortened.
    for spent_nano in (10**9, 2 * 10**9):
        gone = exhausted(budget, worst, spent_nano=spent_nano, held_nano=0).message
        assert "; nothing of it is left; the budget resets at" in gone
        assert "shorten" not in gone and " left:" not in gone


def test_a_refusal_for_what_requests_in_flight_hold_says_retry_soon():
    """Spent plus this request fits the limit: only holds of requests in flight are in
    the way, and they end in seconds, not when the period resets."""
    budget = Budget("cap", BudgetConfig(limit_usd=1, period="day"), 10**9)
    worst = WorstCase(100_100_000, 1_000_000, 100_000_000, 1_000_000_000, 100)
    budget.start, budget.end = period_bounds(time.time(), "day", "UTC")
    held = exhausted(budget, worst, spent_nano=500_000_000, held_nano=450_000_000)
    assert held.retry_after == 1 and "requests in flight hold the rest" in held.message
    assert "resets" not in held.message
    spent = exhausted(budget, worst, spent_nano=950_000_000, held_nano=0)
    assert spent.retry_after is not None and spent.retry_after > 1
    assert "the budget resets at" in spent.message


def test_tools_are_held_at_the_prompt_a_provider_adds_for_them(gateway_factory, bg):
    """A request with tools is billed a tool-use system prompt its bytes do not show
    (Anthropic's 346 tokens here): the hold counts it, so one request after another
    stops before a hard limit, not past it."""
    server = UpstreamServer(bg, anthropic_server.create_app())
    try:
        provider = {
            "type": "anthropic",
            "base_url": server.url,
            "api_key": anthropic_server.API_KEY,
        }
        price = {"input": 1_000_000, "output": 1_000_000}  # $1 a token
        config = {
            "providers": {"claude": provider},
            "upstreams": {"claude-up": {"provider": "claude", "model": "m", "price": price}},
            "models": {"claude": {"upstreams": ["claude-up"]}},
            "budgets": {"cap": {"limit_usd": 1_900}},
        }
        gateway = gateway_factory(config)
        ask = [
            {"role": "system", "content": "TRIGGER:tool_prompt"},
            {"role": "user", "content": "Weather?"},
        ]
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
        client = gateway.client()
        with pytest.raises(openai.RateLimitError, match="budget 'cap'"):
            for _ in range(20):
                client.chat.completions.create(
                    model="claude", messages=ask, tools=[tool], max_tokens=10
                )
        rows = gateway.ledger_rows("outcome = 'success'")
        assert rows and rows[0]["input_tokens"] > 346  # the tool-use prompt was billed
        assert sum(r["cost_nano"] for r in rows) <= 1_900 * 10**9
    finally:
        server.close()
