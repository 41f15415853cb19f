"""Start, wait for and always stop the processes a benchmark needs; install missing tools.

Every process is started in its own session so that stopping it also stops anything it
forked (nginx's worker), and `Processes` is a context manager so a failure, Ctrl-C or
SIGTERM half way still stops everything that was started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

APT_PACKAGES = ("nginx-light", "wrk")
TOOLS = {"nginx": "/usr/sbin/nginx", "wrk": "/usr/bin/wrk", "taskset": "/usr/bin/taskset"}


class BenchError(RuntimeError):
    """A problem that makes the numbers meaningless: the run stops and says why."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class CpuLayout:
    gateway: str | None  # every gateway (metergate, peers, floor), one at a time busy
    other: str | None  # nginx, wrk, py-spy and this process's probes
    cpus: tuple[int, ...] = ()  # every CPU the run may use (the workers step spreads)

    def describe(self) -> str:
        if self.gateway is None:
            return "not pinned"
        return (
            f"every gateway under test on CPU {self.gateway}, one loaded at a time; nginx, "
            f"wrk, py-spy and the asyncio probes on CPU {self.other}"
        )


def cpu_layout(pin: bool) -> CpuLayout:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or _which("taskset") is None:
        return CpuLayout(None, None, tuple(cpus))
    return CpuLayout(str(cpus[0]), ",".join(map(str, cpus[1:])), tuple(cpus))


def tool(name: str) -> str:
    """Path of an external tool, from PATH or its Debian location (sbin may not be on PATH)."""
    found = shutil.which(name)
    if found is None and name in TOOLS and Path(TOOLS[name]).exists():
        found = TOOLS[name]
    if found is None:
        raise BenchError(f"{name} is not installed")
    return found


def ensure_tools() -> None:
    """Install nginx and wrk from Debian when missing, so a clean CI machine can run this.

    A package's postinst must not start a system-wide nginx on port 80, so while
    installing a policy-rc.d that forbids starting services is put in place when none exists.
    """
    missing = [name for name in ("nginx", "wrk") if _which(name) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise BenchError(f"missing {', '.join(missing)}: run `apt-get install -y nginx-light wrk`")
    print(f"installing {' '.join(APT_PACKAGES)} (missing: {', '.join(missing)})", flush=True)
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if made_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
            check=True,
            env=env,
            timeout=900,
        )
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def tool_version(command: Sequence[str]) -> str:
    """First line a `--version` style command prints, or "unknown"."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _which(name: str) -> str | None:
    with contextlib.suppress(BenchError):
        return tool(name)
    return None


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """Prefix a command with `taskset -c CPUS` when pinning is on."""
    return [tool("taskset"), "-c", cpus, *command] if cpus else list(command)


@dataclass
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class Processes:
    """The long-running processes of one benchmark; leaving the `with` stops them all."""

    started: list[Started] = field(default_factory=list)

    def start(
        self,
        name: str,
        command: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> Started:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else dict(env),
            )
        entry = Started(name, popen, log)
        self.started.append(entry)
        return entry

    def stop(self, entry: Started, grace: float = 20.0) -> int:
        """SIGTERM the process group and wait (the gateway flushes its ledger on the way out)."""
        popen = entry.popen
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"{entry.name} did not stop in {grace:.0f}s; killing it", file=sys.stderr)
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait(5)
            # A forked child (nginx's worker) may outlive its parent by a moment.
            _signal_group(popen.pid, signal.SIGKILL)
        if entry in self.started:
            self.started.remove(entry)
        return popen.returncode

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for entry in reversed(list(self.started)):
            self.stop(entry)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def wait_ready(entry: Started, url: str, timeout: float = 30.0) -> None:
    """Poll `url` until it answers 200; fail with the process's log if it dies or hangs."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if entry.popen.poll() is not None:
            raise BenchError(
                f"{entry.name} exited with {entry.popen.returncode} while starting:\n"
                + tail(entry.log)
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except OSError as error:
            last = str(error)
        time.sleep(0.1)
    raise BenchError(
        f"{entry.name} not ready at {url} after {timeout:.0f}s ({last}):\n{tail(entry.log)}"
    )


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def http(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10
) -> HttpAnswer:
    """One plain HTTP request (POST when a body is given) that returns errors as answers."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpAnswer(
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as error:
        return HttpAnswer(
            error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()
        )


def install_signal_exit() -> None:
    """Turn SIGTERM (and SIGHUP) into SystemExit so `finally`/`with` blocks still stop processes."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)


def finish(workdir: Path, passed: bool, keep: bool) -> int:
    """Remove a run's work dir unless it failed or was asked for; the exit status."""
    if passed and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work dir kept for inspection: {workdir}", file=sys.stderr)
    return 0 if passed else 1
