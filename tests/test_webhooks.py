"""Webhook notices reach a receiver that fails for a moment, and leak no secret to logs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from metergate.webhooks import ATTEMPTS, WebhookNotifier
from tests.harness import free_port


class Receiver:
    """An HTTP receiver that answers each POST with the next status of `statuses`."""

    def __init__(self, statuses: list[int], headers: dict[str, str] | None = None) -> None:
        self.statuses = statuses
        self.headers = headers or {}
        self.received: list[dict[str, Any]] = []
        self.done = asyncio.Event()  # set once it answers with a success

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        status = self.statuses[min(len(self.received), len(self.statuses)) - 1]
        if status < 300:
            self.done.set()
        return web.Response(status=status, headers=self.headers if status >= 300 else None)


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(receiver: Receiver) -> str:
        app = web.Application()
        app.router.add_post("/hook/{token}", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://hook-user:hook-pass@127.0.0.1:{port}/hook/T0KEN?sig=S1G"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_a_notice_is_sent_again_after_a_passing_failure(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "metergate.webhooks")
    receiver = Receiver([503, 429, 200], headers={"Retry-After": "0"})
    notifier = WebhookNotifier(first_wait=0.01)
    notifier.send(await serve(receiver), "budget passed 80%", {"percent": 80})
    await asyncio.wait_for(receiver.done.wait(), 30)
    await notifier.close()
    assert len(receiver.received) == 3
    assert all(body == {"text": "budget passed 80%", "percent": 80} for body in receiver.received)
    logged = caplog.text
    assert "answered 503" in logged and "answered 429" in logged
    for secret in ("hook-user", "hook-pass", "T0KEN", "S1G"):
        assert secret not in logged


async def test_a_refused_notice_is_not_sent_again_and_a_failing_one_gives_up(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    refused, failing = Receiver([400]), Receiver([500])
    notifier = WebhookNotifier(first_wait=0.01)
    notifier.send(await serve(refused), "refused", {})
    notifier.send(await serve(failing), "failing", {})
    await asyncio.wait_for(asyncio.gather(*notifier._tasks), 30)
    await notifier.close()
    assert len(refused.received) == 1
    assert len(failing.received) == ATTEMPTS
    assert "answered 400; not sent again" in caplog.text
    assert f"answered 500; gave up after {ATTEMPTS} attempts" in caplog.text


async def test_an_unreachable_receiver_is_tried_again_and_named_by_its_host_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    notifier = WebhookNotifier(first_wait=0.01)
    notifier.send(f"http://user:secret@127.0.0.1:{port}/hook/T0KEN", "x", {})
    await asyncio.wait_for(asyncio.gather(*notifier._tasks), 30)
    await notifier.close()
    gave_up = f"webhook 127.0.0.1:{port} failed: ConnectError; gave up after {ATTEMPTS}"
    assert gave_up in caplog.text
    assert "secret" not in caplog.text and "T0KEN" not in caplog.text


async def test_a_receiver_answering_with_an_endless_body_is_not_read() -> None:
    """Only the status counts: a URL that streams gigabytes back costs no memory."""
    sent = 0
    requests = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent, requests
        requests += 1
        await request.read()
        response = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        await response.prepare(request)
        chunk = b"x" * (1 << 20)
        try:
            while sent < 512 << 20:  # stops by itself, should the reader never leave
                await response.write(chunk)
                sent += len(chunk)
        except ConnectionError:
            pass  # the notifier hung up, as it should
        return response

    app = web.Application()
    app.router.add_post("/hook", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        notifier = WebhookNotifier(first_wait=0.01)
        notifier.send(f"http://127.0.0.1:{port}/hook", "budget passed 80%", {})
        await asyncio.wait_for(asyncio.gather(*notifier._tasks), 60)
        await notifier.close()
    finally:
        await runner.cleanup()
    assert requests == 1  # a 200 is a success, sent once
    assert sent < 64 << 20
