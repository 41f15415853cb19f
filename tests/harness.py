"""Run real servers for tests: the gateway (uvicorn) and fake upstreams, on loopback.

Everything runs on one event loop in a background thread, so tests can use the
official SDKs' synchronous clients as well as their async ones.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
import uvicorn
import yaml
from aiohttp import web

from metergate.api.app import GatewayApp
from metergate.config import read_config
from metergate.storage.keys import create_key

T = TypeVar("T")

# Debian's Chromium (scripts/test installs it), headless, for the tests that use a browser.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def eventually(condition: Callable[[], bool], within: float = 10) -> bool:
    """Whether `condition` holds within `within` seconds, polled every 10 ms: tests wait
    on what they expect with a deadline, never sleep and then assert."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def cancel_requests() -> int:
    """What uvicorn does to the requests still running when a shutdown's grace period
    runs out: cancel their tasks."""
    running = [
        task
        for task in asyncio.all_tasks()
        if task.get_coro().__qualname__.endswith("run_asgi")  # type: ignore[union-attr]
    ]
    for task in running:
        task.cancel()
    return len(running)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BackgroundLoop:
    """An asyncio loop in a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close_server(self, server: asyncio.Server) -> None:
        """Close an asyncio server on its own loop: closing it from another thread races
        with the loop detaching its last connection (both wake the server's waiters)."""

        async def close() -> None:
            server.close()

        self.run(close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class UpstreamServer:
    """An aiohttp application served on a free loopback port."""

    def __init__(self, bg: BackgroundLoop, app: web.Application) -> None:
        self.bg = bg
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner = web.AppRunner(app)

        async def start() -> None:
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        bg.run(start())

    def close(self) -> None:
        self.bg.run(self._runner.cleanup())


class WebhookReceiver(UpstreamServer):
    """Keeps the JSON body of every POST to `url` in `received`, in order."""

    def __init__(self, bg: BackgroundLoop) -> None:
        self.received: list[dict[str, Any]] = []

        async def hook(request: web.Request) -> web.Response:
            self.received.append(await request.json())
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", hook)
        super().__init__(bg, app)
        self.hook_url = f"{self.url}/hook"


# A call the gateway never answers fails the test with the SDK's timeout error, saying
# which call, instead of waiting out the SDK's 600 s into the test's own timeout.
CLIENT_TIMEOUT = 60


@dataclass
class Gateway:
    """A running gateway and a key to call it with."""

    bg: BackgroundLoop
    app: GatewayApp
    server: uvicorn.Server
    serving: Future[None]
    base_url: str
    key: str

    @property
    def runtime(self):  # type: ignore[no-untyped-def]
        return self.app.runtime

    def client(self, **options: Any) -> openai.OpenAI:
        options = {"timeout": CLIENT_TIMEOUT, "api_key": self.key, **options}
        return openai.OpenAI(base_url=self.base_url, max_retries=0, **options)

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        options = {"timeout": CLIENT_TIMEOUT, **options}
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.key, max_retries=0, **options
        )

    def new_key(self, name: str, models: list[str] | None = None) -> str:
        assert self.runtime.database is not None
        secret, _ = self.bg.run(create_key(self.runtime.database, name, models))
        self.bg.run(self.runtime.keys.reload())
        return secret

    def flush_ledger(self) -> None:
        assert self.runtime.ledger is not None
        self.bg.run(self.runtime.ledger.flush())

    def ledger_rows(self, where: str = "1=1") -> list[dict[str, Any]]:
        from metergate.metering.ledger import COLUMNS

        self.flush_ledger()
        assert self.runtime.database is not None
        rows = self.bg.run(
            self.runtime.database.fetch(
                f"SELECT {', '.join(COLUMNS)} FROM requests WHERE {where} ORDER BY id"
            )
        )
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels` (0 when absent)."""
        total = 0.0
        for family in self.runtime.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def keys_cli(self, *args: str, code: int = 0) -> str:
        """Run `metergate keys ARGS -c <this gateway's config>`; its output, once it
        exited with `code`."""
        from typer.testing import CliRunner

        from metergate.cli import app

        result = CliRunner().invoke(
            app, ["keys", *args, "-c", self.runtime.source], env={"COLUMNS": "200"}
        )
        assert result.exit_code == code, result.output
        return result.output

    def stop(self) -> None:
        self.server.should_exit = True
        self.serving.result(30)


def write_config(config: dict[str, Any] | str, workdir: Path) -> Path:
    """Write a test config to `workdir/gateway.yaml`, its ledger and the ledger's spool in
    `workdir` by default (not under the directory the tests run in)."""
    raw = yaml.safe_load(config) if isinstance(config, str) else dict(config)
    ledger = dict(raw.get("ledger") or {"url": f"sqlite:///{workdir / 'ledger.db'}"})
    ledger.setdefault("spool_directory", str(workdir / "ledger-spool"))
    raw["ledger"] = ledger
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start_gateway(
    bg: BackgroundLoop, config: dict[str, Any] | str, workdir: Path, key_name: str = "test"
) -> Gateway:
    """Start a gateway on a free port with its ledger in `workdir`, and make it a key."""
    path = write_config(config, workdir)
    loaded = read_config(path)
    app = GatewayApp(loaded.config, loaded.text, loaded.source)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan="on",
            log_level="warning",
            access_log=False,
            loop="none",
            http="metergate.api.protocol:GuardedHttpToolsProtocol",  # what `serve` runs
        )
    )
    serving = bg.submit(server.serve())

    async def wait_started() -> None:
        for _ in range(500):
            if server.started:
                return
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        raise TimeoutError("gateway did not start")

    bg.run(wait_started())
    gateway = Gateway(bg, app, server, serving, f"http://127.0.0.1:{port}/v1", "")
    gateway.key = gateway.new_key(key_name)
    return gateway


def two_gateways(
    bg: BackgroundLoop, config: dict[str, Any], workdir: Path, started: list[Gateway]
) -> tuple[Gateway, Gateway]:
    """Two gateways on one config (so one ledger): two processes of a fleet, each with its
    own memory. They are appended to `started`, for the caller to stop."""
    for name in ("a", "b"):
        started.append(start_gateway(bg, config, workdir / name, key_name=f"gw-{name}"))
    return started[-2], started[-1]


def simulated_config(**settings: Any) -> dict[str, Any]:
    """One simulated provider and model `sim` with the given simulated settings."""
    return {
        "providers": {"sim": {"type": "simulated", "simulated": settings}},
        "upstreams": {
            "sim-up": {
                "provider": "sim",
                "model": "sim-model",
                "price": {"input": 1.0, "cached_input": 0.5, "output": 2.0},
            }
        },
        "models": {"sim": {"upstreams": ["sim-up"]}},
    }


def counts_at_once(target: Callable[..., None], argsets: list[tuple[Any, ...]]) -> list[int]:
    """Run `target(*args, start, counts)` for each of `argsets` in a spawned process of its
    own (as uvicorn starts its workers), all let go at one instant by the barrier
    `start`; the count each puts on the queue `counts`."""
    spawn = multiprocessing.get_context("spawn")
    start, counts = spawn.Barrier(len(argsets)), spawn.Queue()
    processes = [spawn.Process(target=target, args=(*args, start, counts)) for args in argsets]
    for process in processes:
        process.start()
    got = [counts.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
    return got
