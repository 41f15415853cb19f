"""LiteLLM's proxy as the reference gateway: installed in its own venv, configured like
metergate (one model per nginx location, a master key, its Prometheus callback on).

The venv (`bench/.litellm-venv`, gitignored) is made once and reused while it holds
exactly the pinned requirements below; `ensure_installed` says what it did.

Why this version: litellm 1.106.12 is the newest release whose `[proxy]` extra installs
from the package index here. From 1.108 the extra needs `litellm-proxy-extras` /
`litellm-proxy` builds that are not published on the index, and 1.107.0 was the
compromised (malicious) release, withdrawn. `prometheus-client` is not part of
`[proxy]` (it comes with the much larger `[proxy-runtime]`), so it is added by itself,
at the version metergate uses.

What could be enabled: the Prometheus callback (open source in this version, no
enterprise flag needed; its `/metrics` asks for a key through the database-backed auth
unless `require_auth_for_metrics_endpoint: false`), the master key, and per-model prices.
Not enabled: virtual keys, spend logs and budgets, which need LiteLLM's PostgreSQL
database through Prisma, whose engine binaries Prisma downloads on first use (there is
no way to fetch them here). So LiteLLM authenticates with its master key only and keeps
no per-request ledger: it does less work per request than metergate does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchlib.procs import BenchError, Processes, Started, free_port, pinned, wait_ready

BENCH = Path(__file__).resolve().parent.parent
VENV = BENCH / ".litellm-venv"
REQUIREMENTS = ("litellm[proxy]==1.106.12", "prometheus-client==0.26.0")
MARKER = VENV / "bench-requirements.txt"  # what the venv was built from
MASTER_KEY = "sk-litellm-bench-master"
PRICE_PER_TOKEN = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
LOCATIONS = {"bench": "/v1", "bench-stream": "/stream/v1", "bench-slow": "/slow/v1"}


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_installed() -> str:
    """Create or reuse the venv; return a line saying which."""
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if python().exists() and MARKER.exists() and MARKER.read_text() == wanted:
        return f"reused {VENV.relative_to(BENCH.parent)} ({', '.join(REQUIREMENTS)})"
    print(f"installing {' '.join(REQUIREMENTS)} into {VENV} (a few minutes, once)", flush=True)
    MARKER.unlink(missing_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    steps = [
        [base, "-m", "venv", str(VENV)],
        [str(python()), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise BenchError(
                f"{' '.join(step)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
    MARKER.write_text(wanted)
    return f"installed {', '.join(REQUIREMENTS)} into {VENV.relative_to(BENCH.parent)}"


def versions() -> dict[str, str]:
    """Versions inside LiteLLM's venv of what matters for its speed."""
    names = ("litellm", "fastapi", "starlette", "uvicorn", "uvloop", "httpx", "aiohttp", "openai")
    code = (
        "import importlib.metadata as m, json\n"
        f"names = {names!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([str(python()), "-c", code], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return {"litellm": "unknown"}
    return dict(yaml.safe_load(done.stdout))


def write_config(workdir: Path, upstream_port: int) -> Path:
    """The LiteLLM equivalent of `gateway.write_config`."""
    base = f"http://127.0.0.1:{upstream_port}"
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": "openai/bench-model",  # any OpenAI-compatible API
                    "api_base": base + path,
                    "api_key": "sk-bench",
                    **PRICE_PER_TOKEN,
                },
            }
            for name, path in LOCATIONS.items()
        ],
        "litellm_settings": {
            "callbacks": ["prometheus"],
            "require_auth_for_metrics_endpoint": False,
        },
        "general_settings": {"master_key": MASTER_KEY},
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(frozen=True)
class LiteLLM:
    process: Started
    port: int
    config: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(processes: Processes, config: Path, cpus: str | None) -> LiteLLM:
    """`litellm --config FILE --num_workers 1`, on 127.0.0.1, logging errors only."""
    port = free_port()
    command = [
        str(VENV / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    env.pop("DATABASE_URL", None)
    started = processes.start("litellm", pinned(command, cpus), config.parent / "litellm.log", env)
    wait_ready(started, f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    return LiteLLM(started, port, config)
