"""What the suite loads: direct nginx, metergate, the peer gateways (LiteLLM, Portkey) and
the floor proxy; the request bodies; and the check that each answers what nginx sent.

A target is its three endpoints (the plain answer, the 50-chunk stream, the slow stream),
the bearer token it is sent, and any headers a gateway needs to route (Portkey names its
upstream per request), so every load (wrk, the asyncio probe, one-off checks) sends the
same request to each.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from benchlib import procs, upstream
from benchlib.report import Check

DIRECT_TOKEN = "sk-bench"
UNARY_BODY = b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = (
    b'{"model":"bench-stream","messages":[{"role":"user","content":"hi"}],"stream":true,'
    b'"stream_options":{"include_usage":true}}'
)
SLOW_BODY = STREAM_BODY.replace(b"bench-stream", b"bench-slow")
EXPECTED_COST_HEADER = "0.000025000"  # 11 input x $1/M + 7 output x $2/M
UPSTREAM_CONTENT = "Hello from the bench upstream."

DIRECT, METERGATE, LITELLM, PORTKEY = "direct", "metergate", "litellm", "portkey"
FLOOR_LABEL = "floor"
STACK_PROXY = Path(__file__).resolve().parent.parent / "stack" / "compare.py"
PEERS = (LITELLM, PORTKEY)  # the other gateways, in the report's column order
NAMES = {
    DIRECT: "direct (nginx)",
    METERGATE: "metergate",
    LITELLM: "LiteLLM",
    PORTKEY: "Portkey",
    FLOOR_LABEL: "floor (bench/stack uvicorn + bare)",
}


@dataclass(frozen=True)
class Target:
    """One thing to load: where its three endpoints are, its token, its process, and the
    extra request headers ("Name: value") of each endpoint kind ("unary", "stream", "slow")."""

    name: str
    token: str
    unary: str
    stream: str
    slow: str
    pid: int | None = None
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def headers(self, kind: str) -> tuple[str, ...]:
        return self.extra.get(kind, ())

    def http_headers(self, kind: str) -> dict[str, str]:
        """The headers of a one-off request (`procs.http`) to the `kind` endpoint."""
        found = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        for line in self.headers(kind):
            name, _, value = line.partition(":")
            found[name.strip()] = value.strip()
        return found


def content_events(body: bytes) -> int:
    return sum(1 for event in body.split(b"\n\n") if b'"content"' in event)


def verify(targets: dict[str, Target], floor: str | None) -> list[Check]:
    """Fail loudly unless every target answers what the upstream sent; note what each adds."""
    checks = []
    for name in (DIRECT, METERGATE):
        target = targets[name]
        answer = procs.http(target.unary, UNARY_BODY, target.http_headers("unary"))
        if answer.status != 200 or answer.body != upstream.CHAT_BODY:
            raise procs.BenchError(f"{name} answered {answer.status}: {answer.body[:300]!r}")
        streamed = procs.http(target.stream, STREAM_BODY, target.http_headers("stream"))
        if streamed.status != 200 or streamed.body != upstream.STREAM_BODY:
            raise procs.BenchError(
                f"{name} stream: HTTP {streamed.status}, {len(streamed.body)} bytes"
            )
    checks.append(
        Check(
            "direct and metergate answer 200 with the upstream body and stream byte for byte", True
        )
    )
    metergate = targets[METERGATE]
    cost = procs.http(metergate.unary, UNARY_BODY, metergate.http_headers("unary")).headers.get(
        "x-metergate-cost-usd"
    )
    checks.append(
        Check(
            "metergate prices the request at 11 x $1/M + 7 x $2/M",
            cost == EXPECTED_COST_HEADER,
            f"x-metergate-cost-usd: {cost}",
        )
    )
    if floor is not None:
        answer = procs.http(floor, UNARY_BODY, {"Authorization": "Bearer x"})
        if answer.status != 200 or answer.body != upstream.CHAT_BODY:
            raise procs.BenchError(f"the floor proxy answered {answer.status}")
    for name in PEERS:
        if name in targets:
            checks.append(verify_peer(targets[name]))
    if LITELLM in targets:
        checks.append(litellm_metrics(targets[LITELLM]))
    return checks


def verify_peer(target: Target) -> Check:
    """A peer gateway answers 200 with the upstream's content and usage (it may re-serialise
    the JSON) and relays every chunk of the stream; raise when it does not."""
    label = NAMES[target.name]
    answer = procs.http(target.unary, UNARY_BODY, target.http_headers("unary"))
    try:
        data = orjson.loads(answer.body) if answer.status == 200 else {}
    except orjson.JSONDecodeError:
        data = {}
    content = data.get("choices", [{}])[0].get("message", {}).get("content")
    usage = data.get("usage", {}).get("total_tokens")
    if answer.status != 200 or content != UPSTREAM_CONTENT or usage != 18:
        raise procs.BenchError(f"{label} answered {answer.status}: {answer.body[:300]!r}")
    streamed = procs.http(target.stream, STREAM_BODY, target.http_headers("stream"))
    events = content_events(streamed.body)
    done = streamed.body.rstrip().endswith(b"data: [DONE]")
    if streamed.status != 200 or events < upstream.STREAM_CHUNKS or not done:
        raise procs.BenchError(
            f"{label} stream: HTTP {streamed.status}, {events} chunks: {streamed.body[:300]!r}"
        )
    same = "byte for byte" if answer.body == upstream.CHAT_BODY else "re-serialised"
    return Check(
        f"{label} answers 200 with the upstream's content and usage ({same}), and relays "
        "every chunk of the stream up to [DONE]",
        True,
        f"{events} content chunks",
    )


def litellm_metrics(target: Target) -> Check:
    metrics = procs.http(target.unary.replace("/v1/chat/completions", "/metrics/"))
    series = sum(1 for line in metrics.body.splitlines() if line.startswith(b"litellm_proxy_total"))
    return Check(
        "LiteLLM's Prometheus callback is on (litellm_proxy_total_requests_metric)",
        metrics.status == 200 and series > 0,
        f"HTTP {metrics.status}, {series} series",
    )


def start_floor(
    processes: procs.Processes,
    workdir: Path,
    chat_url: str,
    cpus: str | None,
    prefix: Sequence[str] = (),
    ready_timeout: float = 60,
    extra_env: dict[str, str] | None = None,
) -> tuple[str, int]:
    """bench/stack's minimal proxy on uvicorn with its bare httptools client: the floor
    (`prefix`: a command to run it under, e.g. valgrind; `extra_env`: added to its
    environment)."""
    port = procs.free_port()
    command = [
        *prefix,
        sys.executable,
        str(STACK_PROXY),
        "serve",
        "--server",
        "uvicorn",
        "--client",
        "bare",
        "--port",
        str(port),
        "--upstream",
        chat_url,
    ]
    env = {**os.environ, "PROXY_CLIENT": "bare", "PROXY_UPSTREAM": chat_url, "PROXY_GC": ""}
    env.update(extra_env or {})
    started = processes.start("floor", procs.pinned(command, cpus), workdir / "floor.log", env)
    procs.wait_ready(started, f"http://127.0.0.1:{port}/healthz", timeout=ready_timeout)
    return f"http://127.0.0.1:{port}{upstream.CHAT_PATH}", started.popen.pid
