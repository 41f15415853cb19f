"""Run metergate against the nginx upstream: config, key, process, metering counters.

The gateway is started through its real CLI (`metergate serve`), exactly as an operator
would, so the benchmark measures the shipped server stack (uvicorn + uvloop + httptools).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchlib.procfs import session_pids
from benchlib.procs import BenchError, Processes, Started, free_port, http, pinned, wait_ready

MODEL = "bench"
STREAM_MODEL = "bench-stream"
SLOW_MODEL = "bench-slow"
PRICE = {"input": 1.0, "output": 2.0}  # USD per million tokens
# Every feature on while measured: a hard budget so large it never refuses, but still
# reserved before and settled after every request (with several workers, in the table
# they share).
BUDGET = {"limit_usd": 1_000_000, "period": "month", "hard": True}
MAX_CONNECTIONS = 2048  # per provider: the memory test holds 1,000 streams open upstream


def metergate_bin() -> str:
    """The CLI of the venv running this script (`.venv/bin/python bench/run.py`)."""
    candidate = Path(sys.executable).parent / "metergate"
    if not candidate.exists():
        raise BenchError(f"{candidate} not found: run with the project's venv python")
    return str(candidate)


def write_config(workdir: Path, upstream_port: int) -> Path:
    """A gateway config whose upstreams are the nginx locations (unary, stream, slow stream),
    with every feature on: key auth, metrics, SQLite ledger, prices, a hard budget."""
    base = f"http://127.0.0.1:{upstream_port}"
    locations = {MODEL: "/v1", STREAM_MODEL: "/stream/v1", SLOW_MODEL: "/slow/v1"}
    config = {
        "server": {"host": "127.0.0.1", "port": 4000},
        "ledger": {"url": f"sqlite:///{workdir / 'ledger.db'}"},
        "providers": {
            f"nginx-{name}": {
                "type": "openai",
                "base_url": base + path,
                "api_key": "sk-bench",
                "max_connections": MAX_CONNECTIONS,
            }
            for name, path in locations.items()
        },
        "upstreams": {
            f"{name}-upstream": {
                "provider": f"nginx-{name}",
                "model": "bench-model",
                "price": dict(PRICE),
            }
            for name in locations
        },
        "models": {name: {"upstreams": [f"{name}-upstream"]} for name in locations},
        "budgets": {"bench-total": dict(BUDGET)},
    }
    path = workdir / "metergate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(frozen=True)
class Install:
    """How to run a metergate: its CLI command and environment (default: this venv's).
    `bench/ab.py` runs another commit's tree through the same python with PYTHONPATH."""

    cli: tuple[str, ...] = ()
    env: dict[str, str] | None = None

    def command(self, *args: str) -> list[str]:
        return [*(self.cli or (metergate_bin(),)), *args]


THIS_TREE = Install()


def create_key(config: Path, install: Install = THIS_TREE) -> str:
    """`metergate keys create`; the secret is the last line of its stdout."""
    done = subprocess.run(
        install.command("keys", "create", "--name", "bench", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        env=install.env,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("mgk_"):
        raise BenchError(f"could not create a key ({done.returncode}):\n{done.stdout}{done.stderr}")
    return lines[-1].strip()


@dataclass(frozen=True)
class Gateway:
    process: Started
    port: int
    config: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_gateway(
    processes: Processes,
    config: Path,
    cpus: str | None,
    workers: int = 1,
    install: Install = THIS_TREE,
    ready_timeout: float = 60,
) -> Gateway:
    port = free_port()
    command = install.command("serve", "--config", str(config), "--port", str(port))
    if workers != 1:  # (an older tree under A/B may predate the option)
        command += ["--workers", str(workers)]
    log = config.parent / "metergate.log"
    started = processes.start("metergate", pinned(command, cpus), log, install.env)
    wait_ready(started, f"http://127.0.0.1:{port}/readyz", timeout=ready_timeout)
    return Gateway(started, port, config)


def requests_by_outcome(gateway: Gateway) -> dict[str, float]:
    """`metergate_requests_total` summed over labels other than `outcome`."""
    answer = http(f"{gateway.base}/metrics")
    if answer.status != 200:
        raise BenchError(f"GET /metrics answered {answer.status}: {answer.body[:300]!r}")
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            if sample.name == "metergate_requests_total":
                outcome = sample.labels.get("outcome", "")
                totals[outcome] = totals.get(outcome, 0.0) + sample.value
    return totals


def worker_pids(leader: int) -> list[int]:
    """The uvicorn worker processes under a `serve --workers N` (spawned by multiprocessing;
    with one worker, the server is the leader itself)."""
    found = []
    for pid in session_pids(leader):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return sorted(found) or [leader]


def wait_workers(gateway: Gateway, workers: int, ledger: Path, timeout: float = 60) -> list[int]:
    """Wait until every worker has opened the ledger (its startup is then nearly done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(gateway.process.popen.pid)
        if workers == 1 or (len(pids) == workers and all(_opened(pid, ledger) for pid in pids)):
            return pids
        time.sleep(0.1)
    raise BenchError(f"{workers} workers not all up after {timeout:.0f} s")


def _opened(pid: int, path: Path) -> bool:
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == str(path):
                    return True
    return False


def multiproc_dir(pid: int) -> Path | None:
    """PROMETHEUS_MULTIPROC_DIR as a worker process sees it (serve sets it for workers)."""
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return Path(item.split(b"=", 1)[1].decode())
    return None
