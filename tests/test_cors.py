"""CORS: off by default; with `server.cors.allowed_origins`, preflights are answered and a
browser app on another origin calls the gateway with a key (checked in real Chromium)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    BackgroundLoop,
    Gateway,
    UpstreamServer,
    simulated_config,
)

PREFLIGHT = {
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type, x-stainless-os",
}


def cors_config(*origins: str) -> dict[str, Any]:
    config = simulated_config(output_tokens=3)
    config["server"] = {"cors": {"allowed_origins": list(origins)}}
    return config


def test_off_by_default(gateway_factory: Any) -> None:
    gateway = gateway_factory(simulated_config())
    url = gateway.base_url + "/chat/completions"
    origin = {"origin": "https://app.example"}
    preflight = httpx.options(url, headers={**origin, **PREFLIGHT})
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers
    answer = httpx.get(
        gateway.base_url + "/models", headers={**origin, "authorization": f"Bearer {gateway.key}"}
    )
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_preflight_and_answers_for_an_allowed_origin(gateway_factory: Any) -> None:
    gateway = gateway_factory(cors_config("https://app.example"))
    url = gateway.base_url + "/chat/completions"
    origin = {"origin": "https://app.example"}
    preflight = httpx.options(url, headers={**origin, **PREFLIGHT})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert preflight.headers["access-control-allow-methods"] == "DELETE, GET, POST"
    assert (
        preflight.headers["access-control-allow-headers"]
        == PREFLIGHT["access-control-request-headers"]
    )
    assert preflight.headers["access-control-max-age"] == "600"
    assert "origin" in preflight.headers["vary"]
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"authorization": f"Bearer {gateway.key}"}
    for stream in (False, True):
        answer = httpx.post(url, json={**body, "stream": stream}, headers={**origin, **auth})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-metergate-cost-usd" in answer.headers["access-control-expose-headers"]
    refused = httpx.post(url, json=body, headers=origin)  # no key: the error is readable too
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://app.example"
    # Another origin: its preflight is refused and answers name no origin.
    other = {"origin": "https://evil.example"}
    assert httpx.options(url, headers={**other, **PREFLIGHT}).status_code == 403
    answer = httpx.post(url, json=body, headers={**other, **auth})
    assert "access-control-allow-origin" not in answer.headers
    not_allowed = {**PREFLIGHT, "access-control-request-method": "PUT"}
    assert httpx.options(url, headers={**origin, **not_allowed}).status_code == 403


def test_no_origin_no_cors(gateway_factory: Any) -> None:
    """Non-browser clients send no Origin: their answers stay as they were."""
    gateway = gateway_factory(cors_config("*"))
    answer = httpx.get(
        gateway.base_url + "/models", headers={"authorization": f"Bearer {gateway.key}"}
    )
    assert not any(name.startswith("access-control") for name in answer.headers)
    anywhere = httpx.get(
        gateway.base_url + "/models",
        headers={"authorization": f"Bearer {gateway.key}", "origin": "http://localhost:5173"},
    )
    assert anywhere.headers["access-control-allow-origin"] == "http://localhost:5173"


# --- a real browser ---------------------------------------------------------------------

playwright_api = pytest.importorskip("playwright.sync_api")
CALL = """async ([base, key]) => {
  const chat = await fetch(base + "/v1/chat/completions", {
    method: "POST",
    headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
    body: JSON.stringify({model: "sim", messages: [{role: "user", content: "hi"}]}),
  });
  const messages = await fetch(base + "/v1/messages", {
    method: "POST",
    headers: {"x-api-key": key, "anthropic-version": "2023-06-01",
              "content-type": "application/json"},
    body: JSON.stringify({model: "sim", max_tokens: 5,
                          messages: [{role: "user", content: "hi"}]}),
  });
  return {
    chat: (await chat.json()).choices[0].message.content,
    cost: chat.headers.get("x-metergate-cost-usd"),
    messages: (await messages.json()).content[0].text,
  };
}"""


@pytest.fixture
def pages(bg: BackgroundLoop) -> Iterator[tuple[UpstreamServer, UpstreamServer]]:
    """Two web apps on their own origins (ports), serving a blank page."""

    async def blank(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>app</title>", content_type="text/html")

    servers = []
    for _ in range(2):
        app = web.Application()
        app.router.add_get("/", blank)
        servers.append(UpstreamServer(bg, app))
    yield servers[0], servers[1]
    for server in servers:
        server.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is installed by scripts/test")
def test_a_browser_app_calls_the_gateway(
    gateway_factory: Any, pages: tuple[UpstreamServer, UpstreamServer]
) -> None:
    allowed, other = pages
    gateway: Gateway = gateway_factory(cors_config(allowed.url))
    base = gateway.base_url.removesuffix("/v1")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page()
            page.goto(allowed.url + "/")
            result = page.evaluate(CALL, [base, gateway.key])
            assert result["chat"] and result["messages"]
            assert float(result["cost"]) > 0  # an exposed header the app can read
            page.goto(other.url + "/")
            with pytest.raises(playwright_api.Error, match="Failed to fetch"):
                page.evaluate(CALL, [base, gateway.key])
        finally:
            browser.close()
    # The other origin's calls stopped at their refused preflight: two requests, not four.
    assert [row["api"] for row in gateway.ledger_rows()] == ["chat", "messages"]
