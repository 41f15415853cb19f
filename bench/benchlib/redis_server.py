"""A redis-server on loopback for the workloads that keep budgets in Redis."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis
import yaml

from benchlib import procs
from benchlib.procs import BenchError, free_port


def start(processes: procs.Processes, work: Path) -> str:
    """Start an in-memory redis-server; return its URL once it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is needed (scripts/test installs it)")
    port = free_port()
    command = [binary, "--port", str(port), "--save", "", "--appendonly", "no"]
    processes.start("redis", [*command, "--bind", "127.0.0.1"], work / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                return url
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise BenchError(f"redis-server on port {port} did not start") from None
            time.sleep(0.05)


def with_redis(config: Path, url: str, out: Path, prefix: str = "mg:") -> Path:
    """The config with budgets and rate limits kept in Redis, written to `out`."""
    raw = yaml.safe_load(config.read_text())
    raw["redis"] = {"url": url, "key_prefix": prefix}
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out
