"""Which HTTP server and which upstream HTTP client for metergate's hot path?

    .venv/bin/python bench/stack/compare.py run [--duration 4] [--runs 3] [--quick]

A minimal proxy (request in -> orjson.loads -> replace "model" -> forward to nginx ->
orjson.loads the answer's usage -> return the upstream body as JSON) is run under every
combination of server and upstream client, each as one process pinned to CPU 0, with nginx
and wrk on CPU 1 (bench/benchlib). For each: max requests/s (wrk -t1 -c64) and p50/p99
at -c1, medians of interleaved runs, as ratios to the bare floor and to nginx direct.

The same file is the proxy (`serve`, and `asgi_app` / `rsgi_app` for granian), a
correctness check of every client (`check`: chunked, Connection: close, keep-alive reuse,
stale pooled connection), and the microbenchmarks of the metering hot path (`micro`).
Everything listens on 127.0.0.1 and every process started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))  # benchlib
DEPS = HERE / ".deps"  # extra clients installed with `pip install --target` (see README)
if DEPS.is_dir():
    sys.path.append(str(DEPS))

UPSTREAM_MODEL = "bench-model"
AUTH = "Bearer sk-bench"
TIMEOUT = 60.0  # seconds, per upstream request, for the clients that take one

# --------------------------------------------------------------------------------------
# Upstream clients: each has `async post(payload: bytes) -> (status, body: bytes)`.
# --------------------------------------------------------------------------------------


class AiohttpGateway:
    """aiohttp exactly as src/metergate/providers/http.py uses it."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self.url = url
        connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=300, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers={"content-type": "application/json", "authorization": AUTH},
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )
        self.timeout = aiohttp.ClientTimeout(total=600, sock_connect=5, sock_read=60)

    async def post(self, payload: bytes) -> tuple[int, bytes]:
        async with self.session.post(self.url, data=payload, timeout=self.timeout) as response:
            return response.status, await response.read()


class AiohttpLean:
    """aiohttp with everything optional off: no timeouts, no decompression, no auto headers."""

    def __init__(self, url: str) -> None:
        import aiohttp
        from yarl import URL

        self.url = URL(url)  # parsed once
        connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=None, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers={"content-type": "application/json", "authorization": AUTH},
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(),  # all None: no timer handles per request
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def post(self, payload: bytes) -> tuple[int, bytes]:
        async with self.session.post(self.url, data=payload) as response:
            return response.status, await response.read()


class Httpx:
    def __init__(self, url: str) -> None:
        import httpx

        self.url = url
        self.client = httpx.AsyncClient(
            http1=True,
            http2=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
            timeout=httpx.Timeout(TIMEOUT, connect=5.0),
            headers={"content-type": "application/json", "authorization": AUTH},
            trust_env=False,
        )

    async def post(self, payload: bytes) -> tuple[int, bytes]:
        response = await self.client.post(self.url, content=payload)
        return response.status_code, response.content


class Aiosonic:
    def __init__(self, url: str) -> None:
        import aiosonic
        from aiosonic.pools import PoolConfig

        self.url = url
        connector = aiosonic.TCPConnector(
            pool_configs={":default": PoolConfig(size=256, max_conn_requests=None)}
        )
        self.client = aiosonic.HTTPClient(connector=connector)
        self.headers = {"content-type": "application/json", "authorization": AUTH}

    async def post(self, payload: bytes) -> tuple[int, bytes]:
        response = await self.client.post(self.url, data=payload, headers=self.headers)
        return response.status_code, await response.content()


class Pyreqwest:
    """Rust reqwest/hyper on a tokio runtime thread (pinned to the same CPU here)."""

    def __init__(self, url: str) -> None:
        from datetime import timedelta

        from pyreqwest.client import ClientBuilder

        self.url = url
        self.client = (
            ClientBuilder()
            .max_connections(256)
            .http1_only()
            .gzip(False)
            .timeout(timedelta(seconds=TIMEOUT))
            .default_headers({"content-type": "application/json", "authorization": AUTH})
            .build()
        )

    async def post(self, payload: bytes) -> tuple[int, bytes]:
        response = await self.client.post(self.url).body_bytes(payload).build().send()
        return response.status, bytes(await response.bytes())


class _Stale(ConnectionError):
    """A pooled connection closed before any byte of the answer: safe to resend once."""


class _BareConn(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; httptools parses (and de-chunks) the answers."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.chunks: list[bytes] = []
        self.status = 0
        self.got_bytes = False
        self.headers_done = False
        self.delimited = False  # Content-Length or chunked seen: EOF is not the end
        self.closed = False
        self.reused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import httptools

        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionError("unexpected upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self.headers_done and not self.delimited:  # body delimited by EOF
            self._complete(False)
        elif not self.got_bytes:
            self._fail(_Stale("connection closed before the answer"))
        else:
            self._fail(ConnectionError("connection closed in the middle of the answer"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self.delimited = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self._complete(self.parser.should_keep_alive())

    # own
    def _complete(self, keep_alive: bool) -> None:
        waiter, self.waiter = self.waiter, None
        body = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, body, keep_alive))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _timed_out(self) -> None:
        self._fail(TimeoutError("upstream did not answer in time"))
        if self.transport is not None:
            self.transport.abort()

    async def request(self, data: bytes, timeout: float) -> tuple[int, bytes, bool]:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        self.chunks = []
        self.headers_done = self.delimited = self.got_bytes = False
        self.waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, self._timed_out)
        self.transport.write(data)  # type: ignore[union-attr]
        try:
            return await waiter
        finally:
            timer.cancel()


class BareClient:
    """The floor: a LIFO pool of keep-alive connections to one host, no limit, no TLS."""

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.idle: collections.deque[_BareConn] = collections.deque()
        self.prefix = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nAuthorization: {AUTH}\r\n"
            "Content-Length: "
        ).encode()

    async def _connection(self) -> _BareConn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(_BareConn, self.host, self.port), 5.0
        )
        return conn

    async def post(self, payload: bytes) -> tuple[int, bytes]:
        data = b"%b%d\r\n\r\n%b" % (self.prefix, len(payload), payload)
        for attempt in range(2):
            conn = await self._connection()
            try:
                status, body, keep_alive = await conn.request(data, self.timeout)
            except _Stale:
                # The server closed an idle connection as we reused it: resend once on a
                # fresh one (nothing of the request can have been processed visibly... in
                # practice; a non-idempotent POST is a judgement call, see README).
                if conn.reused and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.close()  # cancelled or failed half way: its state is unknown
                raise
            if keep_alive and not conn.closed:
                self.idle.append(conn)
            else:
                conn.close()
            return status, body
        raise AssertionError("unreachable")


CLIENTS = {
    "aiohttp-gw": AiohttpGateway,
    "aiohttp-lean": AiohttpLean,
    "httpx": Httpx,
    "aiosonic": Aiosonic,
    "pyreqwest": Pyreqwest,
    "bare": BareClient,
}

# --------------------------------------------------------------------------------------
# The proxy logic, shared by every server.
# --------------------------------------------------------------------------------------

_client = None
TOKENS = [0, 0]  # so the usage parse is not dead code


def client():
    global _client
    if _client is None:  # created lazily inside the running loop, on the first request
        _client = CLIENTS[os.environ["PROXY_CLIENT"]](os.environ["PROXY_UPSTREAM"])
    return _client


async def proxy(body: bytes) -> tuple[int, bytes]:
    request = orjson.loads(body)
    request["model"] = UPSTREAM_MODEL
    status, answer = await client().post(orjson.dumps(request))
    usage = orjson.loads(answer).get("usage") if status == 200 else None
    if usage:
        TOKENS[0] += usage.get("prompt_tokens", 0)
        TOKENS[1] += usage.get("completion_tokens", 0)
    return status, answer


GC_PAUSES: list[float] = []  # seconds of every collection of generation 2 (and count of others)
GC_COUNTS = [0, 0, 0]
_gc_start = [0.0]


def _gc_callback(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        GC_COUNTS[info["generation"]] += 1
        if info["generation"] == 2:
            GC_PAUSES.append(time.perf_counter() - _gc_start[0])


def apply_gc_mode() -> None:
    """PROXY_GC: '' (default), 'freeze' (gc.freeze() after startup), 'threshold'."""
    mode = os.environ.get("PROXY_GC", "")
    if mode == "switch":  # GIL switch interval 5 ms -> 0.5 ms (threads: granian, pyreqwest)
        sys.setswitchinterval(0.0005)
    # Realistic heap: the gateway's imports (pydantic models, aiosqlite, ...) are in memory.
    if os.environ.get("PROXY_GATEWAY_IMPORTS"):
        import metergate.api.app  # noqa: F401
    if mode == "freeze":
        gc.collect()
        gc.freeze()
    elif mode == "threshold":
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
    gc.callbacks.append(_gc_callback)


def stats() -> bytes:
    return orjson.dumps(
        {
            "gc_counts": GC_COUNTS,
            "gen2_pauses_ms": sorted(round(p * 1e3, 3) for p in GC_PAUSES)[-5:],
            "gc_threshold": gc.get_threshold(),
            "frozen": gc.get_freeze_count(),
            "tokens": TOKENS,
        }
    )


# --------------------------------------------------------------------------------------
# Servers: ASGI (uvicorn, granian), RSGI (granian), bare asyncio.Protocol + httptools.
# --------------------------------------------------------------------------------------

JSON_START = b"application/json"


async def asgi_app(scope, receive, send) -> None:
    kind = scope["type"]
    if kind == "http":
        if scope["method"] == "POST":
            message = await receive()
            body = message.get("body", b"")
            while message.get("more_body", False):
                message = await receive()
                body += message.get("body", b"")
            status, out = await proxy(body)
        else:
            status, out = 200, stats()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", JSON_START),
                    (b"content-length", b"%d" % len(out)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})
    elif kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                apply_gc_mode()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


class RsgiApp:
    def __rsgi_init__(self, loop) -> None:
        apply_gc_mode()

    async def __rsgi__(self, scope, proto) -> None:
        if scope.method == "POST":
            status, out = await proxy(await proto())
        else:
            status, out = 200, stats()
        proto.response_bytes(status, [("content-type", "application/json")], out)


rsgi_app = RsgiApp()


class BareServerProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive server on httptools; one task per request, no pipelining order."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        asyncio.get_running_loop().create_task(self.handle(method, body, keep_alive))

    async def handle(self, method: bytes, body: bytes, keep_alive: bool) -> None:
        try:
            status, out = await proxy(body) if method == b"POST" else (200, stats())
        except Exception:
            status, out = 502, b'{"error":{"message":"upstream failed"}}'
        if self.transport is None:
            return
        reason = b"OK" if status == 200 else b"X"
        self.transport.write(
            b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b"
            % (status, reason, len(out), b"" if keep_alive else b"connection: close\r\n", out)
        )
        if not keep_alive:
            self.transport.close()


def serve(args: argparse.Namespace) -> None:
    os.environ["PROXY_CLIENT"] = args.client
    os.environ["PROXY_UPSTREAM"] = args.upstream
    if args.server.startswith("uvicorn"):
        import uvicorn

        uvicorn.run(
            asgi_app,
            host="127.0.0.1",
            port=args.port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level="warning",
            proxy_headers=args.server != "uvicorn-noproxy",
            backlog=4096,
        )
    elif args.server == "bare":
        import uvloop

        async def main() -> None:
            loop = asyncio.get_running_loop()
            apply_gc_mode()
            server = await loop.create_server(
                BareServerProtocol, "127.0.0.1", args.port, backlog=4096
            )
            async with server:
                await server.serve_forever()

        uvloop.run(main())
    else:
        raise SystemExit(f"unknown server {args.server}")


# --------------------------------------------------------------------------------------
# Orchestration.
# --------------------------------------------------------------------------------------

SERVERS = ("uvicorn", "granian-asgi", "granian-rsgi", "bare")
CORE_CLIENTS = ("aiohttp-gw", "aiohttp-lean", "httpx", "bare")
EXTRA_CLIENTS = ("aiosonic", "pyreqwest")


def targets_matrix(quick: bool) -> list[tuple[str, str, str]]:
    """(label, server, client[, gc]) of every proxy process to run."""
    rows: list[tuple[str, str, str]] = []
    for server in SERVERS:
        for name in CORE_CLIENTS:
            rows.append((server, name, ""))
    for server in ("uvicorn", "bare"):
        for name in EXTRA_CLIENTS:
            rows.append((server, name, ""))
    rows.append(("uvicorn-noproxy", "aiohttp-gw", ""))
    rows.append(("uvicorn-noproxy", "bare", ""))
    for mode in ("default", "freeze", "threshold"):
        rows.append(("uvicorn", "aiohttp-gw", mode))
    rows.append(("granian-rsgi", "bare", "switch"))
    rows.append(("uvicorn", "pyreqwest", "switch"))
    if quick:
        rows = [r for r in rows if r[1] in ("aiohttp-gw", "bare")][:6]
    return rows


def label(server: str, name: str, mode: str) -> str:
    if mode == "switch":
        return f"{server} + {name} (switchinterval 0.5ms)"
    return f"{server} + {name}" + (f" (gc {mode})" if mode else "")


def command_for(server: str, name: str, port: int, upstream_url: str) -> list[str]:
    if server.startswith("granian"):
        granian = str(Path(sys.executable).parent / "granian")
        interface = server.split("-")[1]
        return [
            granian,
            "--interface", interface,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
            "--runtime-threads", "1",
            "--runtime-mode", "st",
            "--loop", "uvloop",
            "--http", "1",
            "--no-ws",
            "--backlog", "4096",
            "--log-level", "warning",
            "--working-dir", str(HERE),
            f"compare:{interface}_app",
        ]  # fmt: skip
    return [
        sys.executable, str(Path(__file__)), "serve",
        "--server", server, "--client", name, "--port", str(port), "--upstream", upstream_url,
    ]  # fmt: skip


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in (
        "uvicorn", "granian", "uvloop", "httptools", "aiohttp", "httpx", "httpcore",
        "aiosonic", "pyreqwest", "orjson", "prometheus_client",
    ):  # fmt: skip
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run(args: argparse.Namespace) -> int:
    from benchlib import procs, upstream, wrk

    procs.install_signal_exit()
    procs.ensure_tools()
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, other_cpu = (str(cpus[0]), str(cpus[1])) if len(cpus) > 1 else (None, None)
    work = Path(tempfile.mkdtemp(prefix="stack-bench-"))
    work.chmod(0o755)  # nginx's worker runs as nobody when started as root
    results: dict[tuple[str, str], list[wrk.WrkResult]] = {}
    gcstats: dict[str, dict] = {}
    with procs.Processes() as processes:
        nginx = upstream.start_nginx(processes, work, other_cpu)
        upstream_url = nginx.base + upstream.CHAT_PATH
        targets: dict[str, str] = {"nginx direct": upstream_url}
        started = {}
        for server, name, mode in targets_matrix(args.quick):
            if args.only and label(server, name, mode) not in args.only:
                continue
            port = procs.free_port()
            env = {**os.environ, "PROXY_CLIENT": name, "PROXY_UPSTREAM": upstream_url}
            env["PROXY_GC"] = mode
            if mode in ("default", "freeze", "threshold"):
                env["PROXY_GATEWAY_IMPORTS"] = "1"
            key = label(server, name, mode)
            command = procs.pinned(command_for(server, name, port, upstream_url), proxy_cpu)
            log = work / f"{key.replace(' ', '_').replace('/', '_')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("wb") as out:
                popen = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env,
                )  # fmt: skip
            entry = procs.Started(key, popen, log)
            processes.started.append(entry)
            started[key] = entry
            targets[key] = f"http://127.0.0.1:{port}{upstream.CHAT_PATH}"
        request = b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
        for key, url in targets.items():
            if key in started:
                procs.wait_ready(started[key], url.replace(upstream.CHAT_PATH, "/healthz"), 60)
            answer = procs.http(url, request, {"Content-Type": "application/json"})
            ok = (
                answer.status == 200
                and answer.body == upstream.CHAT_BODY
                and answer.headers.get("content-type", "").startswith("application/json")
            )
            if not ok:
                raise procs.BenchError(f"{key}: {answer.status} {answer.headers} {answer.body!r}")
        print(f"{len(targets)} targets answer correctly; warming up", flush=True)
        for url in targets.values():
            wrk.run(url, connections=64, seconds=args.warmup, token="x", cpus=other_cpu)
        loads = (("c64", 64), ("c1", 1))
        for index in range(args.runs):
            for key, url in targets.items():
                for load, connections in loads:
                    r = wrk.run(
                        url, connections=connections, seconds=args.duration, token="x",
                        cpus=other_cpu,
                    )  # fmt: skip
                    results.setdefault((key, load), []).append(r)
                    print(
                        f"run {index + 1} {key:<42} {load:<4} {r.rps:>9.0f}/s "
                        f"p50 {r.p50_ms:.3f} p99 {r.p99_ms:.3f} err {r.errors}",
                        flush=True,
                    )
        for key in started:
            gcstats[key] = json.loads(
                procs.http(targets[key].replace(upstream.CHAT_PATH, "/gcstats")).body
            )
    shutil.rmtree(work, ignore_errors=True)
    micro = run_micro()
    write_results(args, results, targets, gcstats, micro)
    return 0


def med(results, key: str, load: str, field: str) -> float:
    return float(statistics.median(getattr(r, field) for r in results[(key, load)]))


def write_results(args, results, targets, gcstats, micro) -> None:
    floor = "bare + bare"
    has_floor = (floor, "c64") in results
    nginx_rps = med(results, "nginx direct", "c64", "rps")
    floor_rps = med(results, floor, "c64", "rps") if has_floor else float("nan")
    floor_p50 = med(results, floor, "c1", "p50_ms") if has_floor else float("nan")
    lines = [
        "# Server x upstream-client comparison (minimal proxy)",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `bench/stack/compare.py "
        f"{' '.join(sys.argv[1:])}`. Medians of {args.runs} interleaved "
        "runs. One proxy process pinned to CPU 0, nginx + wrk on CPU 1, wrk -t1; "
        "req/s at -c64, latency at -c1. `floor` = bare server + bare client; "
        "errors = non-2xx + socket errors summed over all runs.",
        "",
        "| server + client | req/s (c64) | x floor | x nginx | p50 c1 ms | p99 c1 ms "
        "| p50 - floor ms | errors | runs req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = sorted(
        (k for k in targets),
        key=lambda k: -med(results, k, "c64", "rps"),
    )
    for key in order:
        rps = med(results, key, "c64", "rps")
        p50 = med(results, key, "c1", "p50_ms")
        p99 = med(results, key, "c1", "p99_ms")
        errors = sum(r.errors for load in ("c64", "c1") for r in results[(key, load)])
        runs = " / ".join(f"{r.rps:.0f}" for r in results[(key, "c64")])
        lines.append(
            f"| {key} | {rps:,.0f} | {rps / floor_rps:.2f} | {rps / nginx_rps:.3f} | "
            f"{p50:.3f} | {p99:.3f} | {p50 - floor_p50:+.3f} | {errors} | {runs} |"
        )
    lines += ["", "## gc per proxy process over the whole run", ""]
    lines += ["| target | collections gen0/1/2 | longest gen2 pauses ms | threshold | frozen |"]
    lines += ["|---|---|---|---|---:|"]
    for key, s in gcstats.items():
        lines.append(
            f"| {key} | {'/'.join(map(str, s['gc_counts']))} | {s['gen2_pauses_ms']} | "
            f"{s['gc_threshold']} | {s['frozen']} |"
        )
    lines += ["", "## Metering hot-path microbenchmarks (one process, CPU 0)", ""]
    lines += ["| operation | ns per request |", "|---|---:|"]
    lines += [f"| {name} | {ns:,.0f} |" for name, ns in micro.items()]
    checked = subprocess.run(
        [sys.executable, str(Path(__file__)), "check"], capture_output=True, text=True, timeout=120
    )
    lines += ["", "## Client correctness (`compare.py check`)", "", "```"]
    lines += [line for line in checked.stdout.splitlines() if line.strip()]
    lines += ["```"]
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in versions().items()]
    out = args.output
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {out}")


# --------------------------------------------------------------------------------------
# Microbenchmarks of the metering hot path (question 3).
# --------------------------------------------------------------------------------------

MICRO_CODE = r"""
import collections, os, sys, time, timeit
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
disable_created_metrics()
r = CollectorRegistry()
L = ("bench", "nginx-model")
LK = ("bench", "nginx-model", "key1")
req = Counter("req", "", ["model", "upstream", "key", "outcome"], registry=r).labels(*LK, "success")
dur = Histogram("dur", "", ["model", "upstream"], registry=r,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
).labels(*L)
att = Counter("att", "", ["upstream", "outcome"], registry=r).labels("nginx-model", "success")
ovh = Histogram("ovh", "", registry=r,
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1))
tokens = Counter("tok", "", ["model", "upstream", "key", "type"], registry=r)
tok = [tokens.labels(*LK, t) for t in ("input", "cached_input", "output")]
cost = Counter("cost", "", ["model", "upstream", "key"], registry=r).labels(*LK)
act = Gauge("act", "", ["model"], registry=r, multiprocess_mode="livesum").labels("bench")
t0, t1, t2 = tok
def metrics():
    act.inc()
    req.inc()
    dur.observe(0.0123)
    att.inc()
    ovh.observe(0.00021)
    t0.inc(11)
    t1.inc(0)
    t2.inc(7)
    cost.inc(0.000025)
    act.dec()
class Plain:
    __slots__ = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")
    def __init__(self):
        for n in self.__slots__: setattr(self, n, 0)
pl = Plain()
def plain():
    pl.a += 1; pl.b += 1; pl.c += 0.0123; pl.d += 1; pl.e += 0.00021
    pl.f += 11; pl.g += 0; pl.h += 7; pl.i += 0.000025; pl.j -= 1
q = collections.deque()
lst = []
row = ("2024-01-01T00:00:00", "key1", "bench", "nginx-model", 11, 0, 7, 0.000025, "success", 12.3)
def dq():
    q.append(row)
    if len(q) > 100000: q.clear()
def ls():
    lst.append(row)
    if len(lst) > 100000: lst.clear()
def dq_build():
    q.append(("2024-01-01T00:00:00", "key1", "bench", "nginx-model", 11, 0, 7, 0.000025,
              "success", time.time()))
    if len(q) > 100000: q.clear()
def best(fn, n):
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e9
out = {}
out["metrics"] = best(metrics, 20000)
out["plain"] = best(plain, 200000)
out["deque"] = best(dq, 200000)
out["list"] = best(ls, 200000)
out["deque_build"] = best(dq_build, 200000)
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
async def app(scope, receive, send):
    pass
mw = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")
H = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"content-type", b"application/json"),
     (b"authorization", b"Bearer mgk_x"), (b"content-length", b"62")]
SC = {"type": "http", "client": ("127.0.0.1", 50000), "scheme": "http", "headers": H}
SCX = dict(SC, headers=H + [(b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-proto", b"https")])
def drive(a, sc):
    co = a(dict(sc), None, None)
    try:
        co.send(None)
    except StopIteration:
        pass
out["asgi_call_plain"] = best(lambda: drive(app, SC), 200000)
out["asgi_call_proxyheaders"] = best(lambda: drive(mw, SC), 200000)
out["asgi_call_proxyheaders_xff"] = best(lambda: drive(mw, SCX), 200000)
import json; print(json.dumps(out))
"""


def run_micro() -> dict[str, float]:
    cpus = sorted(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cpus[0])] if len(cpus) > 1 else []
    results: dict[str, list[float]] = {}
    for _ in range(3):
        for mp in (False, True):
            env = dict(os.environ)
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            with tempfile.TemporaryDirectory() as tmp:
                if mp:
                    env["PROMETHEUS_MULTIPROC_DIR"] = tmp
                done = subprocess.run(
                    [*pin, sys.executable, "-c", MICRO_CODE], env=env, capture_output=True,
                    text=True, timeout=300, check=True,
                )  # fmt: skip
            values = json.loads(done.stdout)
            tag = "multiprocess (PROMETHEUS_MULTIPROC_DIR set)" if mp else "single process"
            results.setdefault(f"10 metric updates, cached children, {tag}", []).append(
                values["metrics"]
            )
            if not mp:
                results.setdefault(
                    "reference: 10 plain `+=` on slot attributes (no prometheus)", []
                ).append(values["plain"])
                results.setdefault("deque.append(prebuilt 10-tuple)", []).append(values["deque"])
                results.setdefault("list.append(prebuilt 10-tuple)", []).append(values["list"])
                results.setdefault("deque.append(10-tuple built per call, time.time())", []).append(
                    values["deque_build"]
                )
                results.setdefault(
                    "uvicorn ProxyHeadersMiddleware added per request (no X-Forwarded-*)", []
                ).append(values["asgi_call_proxyheaders"] - values["asgi_call_plain"])
                results.setdefault(
                    "uvicorn ProxyHeadersMiddleware added per request (X-Forwarded-For + -Proto)",
                    [],
                ).append(values["asgi_call_proxyheaders_xff"] - values["asgi_call_plain"])
    return {k: statistics.median(v) for k, v in results.items()}


# --------------------------------------------------------------------------------------
# Correctness check of every client against a tricky local upstream.
# --------------------------------------------------------------------------------------

ANSWER = b'{"id":"x","usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'


async def aclose(c) -> None:
    for attr in ("session", "client"):
        closer = getattr(getattr(c, attr, None), "close", None) or getattr(
            getattr(c, attr, None), "aclose", None
        )
        if closer is not None:
            result = closer()
            if asyncio.iscoroutine(result):
                await result
    for conn in getattr(c, "idle", ()):
        conn.close()


async def check_clients(names: list[str]) -> int:
    """Each client against a Python upstream answering by path: Content-Length, chunked
    (split in 3 chunks), Connection: close (EOF-delimited); then keep-alive reuse (at most one
    connection for 5 sequential requests), and a pooled connection the server closed while
    idle (the next request must still succeed)."""
    accepted = [0]
    conns: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        conns.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path == b"/chunked":
                    parts = [ANSWER[:10], ANSWER[10:40], ANSWER[40:]]
                    body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"transfer-encoding: chunked\r\n\r\n" + body
                    )
                elif path == b"/close":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"connection: close\r\n\r\n" + ANSWER
                    )
                    await writer.drain()
                    writer.close()
                    return
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%b" % (len(ANSWER), ANSWER)
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    failures = 0
    for name in names:
        verdicts = []
        for path in ("/length", "/chunked", "/close"):
            c = CLIENTS[name](f"http://127.0.0.1:{port}{path}")
            try:
                answers = [await asyncio.wait_for(c.post(b'{"a":1}'), 5) for _ in range(3)]
                ok = all(a == (200, ANSWER) for a in answers)
                verdicts.append(f"{path} {'ok' if ok else f'WRONG {answers[0]!r:.40}'}")
                failures += not ok
            except Exception as exc:
                verdicts.append(f"{path} FAILED {type(exc).__name__}: {exc}")
                failures += 1
            await aclose(c)
        c = CLIENTS[name](f"http://127.0.0.1:{port}/length")
        before = accepted[0]
        for _ in range(5):
            await c.post(b"{}")
        reused = accepted[0] - before
        verdicts.append(f"keep-alive: {reused} connection(s) for 5 requests")
        failures += reused != 1
        for w in conns:  # the server drops every idle connection
            w.close()
        conns.clear()
        await asyncio.sleep(0.05)
        try:
            answer = await asyncio.wait_for(c.post(b"{}"), 5)
            verdicts.append(f"after idle close: {'ok' if answer == (200, ANSWER) else 'WRONG'}")
        except Exception as exc:
            verdicts.append(f"after idle close: FAILED {type(exc).__name__}")
            failures += 1
        print(f"{name:<13} " + "; ".join(verdicts), flush=True)
        await aclose(c)
    server.close()
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run one proxy (used by `run`)")
    s.add_argument("--server", required=True)
    s.add_argument("--client", required=True, choices=list(CLIENTS))
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--upstream", required=True)
    r = sub.add_parser("run", help="the whole comparison")
    r.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    r.add_argument("--runs", type=int, default=3)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--quick", action="store_true", help="a few targets, to try the script")
    r.add_argument("--only", nargs="*", help="only these targets (exact labels as in results.md)")
    r.add_argument("--output", type=Path, default=HERE / "results.md")
    sub.add_parser("micro", help="metering microbenchmarks only")
    c = sub.add_parser("check", help="correctness of every client")
    c.add_argument("clients", nargs="*", default=list(CLIENTS))
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)
        return 0
    if args.command == "micro":
        print(json.dumps(run_micro(), indent=1))
        return 0
    if args.command == "check":
        import uvloop

        return uvloop.run(check_clients(args.clients))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
