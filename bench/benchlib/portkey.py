"""Portkey's open-source gateway as the second reference gateway (Node), installed from the
npm registry into `bench/.portkey` (gitignored), started headless on 127.0.0.1.

The install is made once and reused while it holds exactly the pinned packages below;
`ensure_installed` says what it did.

Why these versions: `@portkey-ai/gateway` 1.15.2 is the newest release on the registry.
Its `package.json` asks for `@hono/node-server ^1.3.3` and `hono ^4.9.7`, and a plain
`npm install` takes the newest of those (node-server 1.19.x, pulled in by the newest
`@hono/node-ws` too). From 1.14.0 node-server's
light `Response` keeps the `Headers` object of the `Response` it is built from, and
Portkey builds every streamed answer from the upstream's `fetch` response, whose headers
are immutable: every stream then fails with HTTP 500 ("TypeError: immutable", in
`updateHeaders`). Portkey's own lockfile for 1.15.2 pins `@hono/node-server` 1.13.5,
`@hono/node-ws` 1.2.0 and `hono` 4.9.7, which stream correctly, so those are pinned here
the same way (the rest resolves within Portkey's ranges). Its
postinstall (`patch-package`) only applies patches kept in Portkey's repository and not
published with the package, so the install runs with `--ignore-scripts`.

How it is run: `node build/start-server.js --port=N --headless` (no console UI). It has no
option for the listening address (it would listen on every interface), so the preload
`portkey_loopback.mjs` makes it listen on 127.0.0.1. Every request names its upstream
with headers: `x-portkey-provider: openai` and `x-portkey-custom-host:
http://127.0.0.1:NGINX/<location>/v1`, plus the bearer token that it forwards upstream.
A custom host on loopback is allowed by default (`TRUSTED_CUSTOM_HOSTS` defaults to
localhost, 127.0.0.1, ::1); the bench sets `TRUSTED_CUSTOM_HOSTS=127.0.0.1` explicitly.
Nothing here makes it reach the internet (no Redis, no guardrail plugins, no
portkey.ai-hosted configs or logs); while it runs, the suite samples its sockets every
0.5 s (`EgressWatch`, from `ss`) and fails if one was connected to a non-loopback address.

What it does per request, compared with metergate: routing from headers, its request
log for the (disabled) console (it re-parses every JSON answer for it), and, on streams,
a 25 ms pause before the first chunk is relayed (its stream transformer waits that long
on the first event). What it has no equivalent of in the open-source gateway: gateway
keys (the bearer token is passed to the provider as is), Prometheus metrics, a
per-request ledger, prices and budgets. So it does much less per request than metergate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import BenchError, Processes, Started, free_port, pinned, wait_ready

BENCH = Path(__file__).resolve().parent.parent
HOME = BENCH / ".portkey"
PACKAGES = {
    "@portkey-ai/gateway": "1.15.2",
    "@hono/node-server": "1.13.5",
    "@hono/node-ws": "1.2.0",
    "hono": "4.9.7",
}
MARKER = HOME / "bench-requirements.txt"  # what the install was made from
SERVER = HOME / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
PRELOAD = Path(__file__).resolve().parent / "portkey_loopback.mjs"
TOKEN = "sk-bench"  # forwarded to nginx, which ignores it
LOCATIONS = {"unary": "/v1", "stream": "/stream/v1", "slow": "/slow/v1"}


def node() -> str:
    found = shutil.which("node")
    if found is None:
        raise BenchError("node is not installed: `apt-get install -y nodejs npm`, or --no-portkey")
    return found


def _wanted() -> str:
    return "".join(f"{name}=={version}\n" for name, version in PACKAGES.items())


def ensure_installed() -> str:
    """Install (or reuse) the pinned packages into bench/.portkey; return what it did."""
    pinned_list = ", ".join(f"{n}@{v}" for n, v in PACKAGES.items())
    if SERVER.exists() and MARKER.exists() and MARKER.read_text() == _wanted():
        return f"reused {HOME.relative_to(BENCH.parent)} ({pinned_list})"
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError("npm is not installed: `apt-get install -y nodejs npm`, or --no-portkey")
    print(f"installing {pinned_list} into {HOME} (once)", flush=True)
    HOME.mkdir(parents=True, exist_ok=True)
    MARKER.unlink(missing_ok=True)
    manifest = {"name": "metergate-bench-portkey", "private": True, "dependencies": PACKAGES}
    (HOME / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
    command = [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--omit=dev"]
    done = subprocess.run(
        command, cwd=HOME, capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0 or not SERVER.exists():
        raise BenchError(f"npm install failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    nested = SERVER.parents[1] / "node_modules"
    shadowed = [name for name in PACKAGES if (nested / name).exists()]
    if shadowed:  # the gateway would load its own copy, not the pinned one
        raise BenchError(f"npm nested other versions of {', '.join(shadowed)} under {nested}")
    MARKER.write_text(_wanted())
    return f"installed {pinned_list} into {HOME.relative_to(BENCH.parent)}"


def versions() -> dict[str, str]:
    """What is installed (the pins and what npm resolved around them) and node's version."""
    out = {"node": subprocess.run([node(), "--version"], capture_output=True, text=True).stdout}
    for name in (*PACKAGES, "zod"):
        manifest = HOME / "node_modules" / name / "package.json"
        try:
            out[name] = json.loads(manifest.read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[name] = "not installed"
    return {k: v.strip() for k, v in out.items()}


def headers(upstream_port: int, kind: str) -> tuple[str, ...]:
    """The routing headers of one of the nginx locations ("unary", "stream", "slow")."""
    return (
        "x-portkey-provider: openai",
        f"x-portkey-custom-host: http://127.0.0.1:{upstream_port}{LOCATIONS[kind]}",
    )


@dataclass(frozen=True)
class Portkey:
    process: Started
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(processes: Processes, workdir: Path, cpus: str | None) -> Portkey:
    """`node start-server.js --port=N --headless`, listening on 127.0.0.1 only."""
    port = free_port()
    command = [node(), "--import", PRELOAD.as_uri(), str(SERVER), f"--port={port}", "--headless"]
    env = {**os.environ, "TRUSTED_CUSTOM_HOSTS": "127.0.0.1"}
    for name in ("REDIS_CONNECTION_STRING", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(name, None)
    started = processes.start("portkey", pinned(command, cpus), workdir / "portkey.log", env)
    wait_ready(started, f"http://127.0.0.1:{port}/", timeout=60)
    return Portkey(started, port)


def remote_peers(pid: int) -> list[str]:
    """Peers of the TCP and UDP sockets the process holds to anything but loopback."""
    done = subprocess.run(["ss", "-Htunp"], capture_output=True, text=True, check=False, timeout=30)
    found = []
    for line in done.stdout.splitlines():
        if f"pid={pid}," not in line:
            continue
        fields = line.split()
        peer = fields[5] if len(fields) > 5 else ""
        host = peer.rsplit(":", 1)[0].strip("[]")
        if peer.endswith(":*") or host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1"):
            continue  # not connected, or loopback
        found.append(peer)
    return found


class EgressWatch:
    """Samples `remote_peers(pid)` every `every` seconds while the loads run, so that a
    connection Portkey opened and closed between two loads is seen too."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid = pid
        self.every = every
        self.seen: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.seen.update(remote_peers(self.pid))
            self.samples += 1

    def start(self) -> EgressWatch:
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        self.seen.update(remote_peers(self.pid))
        return sorted(self.seen)
