"""Real PostgreSQL and Redis servers for tests, started on loopback in temp dirs.

Each server is started once per test session (lazily, by the first test that needs it)
and stopped at the end; tests never touch system services. A test that wants a clean
PostgreSQL asks for `fresh_postgres_url` and gets a database of its own, which costs a
`CREATE DATABASE` (tens of milliseconds), not a server start.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` OS user
(`runuser`), with its data in a temp dir owned by that user. Tests skip only when the
binaries are missing; `scripts/test` installs them, so CI always runs them.

The fixtures are thin wrappers over process-wide singletons: a test module may import
them directly (`from tests.services import postgres_url`) as well as conftest.py, and
the session still starts one server of each kind, stopped when the last user releases it.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 30.0


def binary(name: str) -> str:
    """A server binary from Debian's packages; skip when missing (scripts/test installs them)."""
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin") if Path(f"{d}/{name}").exists()), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/test installs it)")
    return found


def certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (as an operator's own CA)."""
    openssl = binary("openssl")
    ca_key, ca, key, csr, cert = (
        directory / name for name in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    run = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    subprocess.run(
        [*run, "-subj", "/CN=metergate test CA", "-keyout", ca_key, "-out", ca],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", key, "-out", csr],
        check=True,
        capture_output=True,
    )  # fmt: skip
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run(
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "2", "-extfile", extensions, "-out", cert],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return ca, cert, key


def free_port() -> int:
    """A loopback port nobody listens on right now (a start retries if it is taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_bindir() -> Path | None:
    """Where initdb/pg_ctl/postgres live: Debian's versioned dir, pg_config, or PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            candidates.append(
                subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
                ).stdout.strip()
            )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for candidate in candidates:
        path = Path(candidate)
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return path
    return None


class PostgresServer:
    """One PostgreSQL cluster: initdb'ed in a temp dir, listening on 127.0.0.1 only."""

    user = "postgres"  # the database superuser; trust auth, loopback only

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = 0
        self._os_user: str | None = None
        if os.geteuid() == 0:
            self._os_user = "postgres"
            try:
                self._pw = pwd.getpwnam(self._os_user)
            except KeyError:
                pytest.skip("running as root and there is no `postgres` OS user to run PostgreSQL")
        self.root = Path(tempfile.mkdtemp(prefix="metergate-pg-"))  # under /tmp: traversable
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.sockets.mkdir()
        if self._os_user is not None:
            for path in (self.root, self.sockets):
                os.chown(path, self._pw.pw_uid, self._pw.pw_gid)
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._frozen: list[int] = []
        self.started = False

    def _run(self, *args: str, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._os_user is not None:
            command = ["runuser", "-u", self._os_user, "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.root, check=False
        )

    def start(self) -> None:
        done = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        last_error = ""
        for _ in range(3):  # the free port may be taken between picking and binding
            self.port = free_port()
            done = self._pg_ctl_start()
            if done.returncode == 0:
                self.started = True
                self.psql("postgres", "SELECT 1")
                return
            last_error = f"{done.stdout}\n{done.stderr}\n{self._log_tail()}"
        raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        options = " ".join(
            (
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.sockets}",
                "-c fsync=off",  # tests do not survive power loss; speed matters more
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            )
        )
        return self._run(
            str(self.bindir / "pg_ctl"),
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "-o",
            options,
            timeout=START_TIMEOUT + 10,
        )

    def pause(self) -> None:
        """Stop the server as an outage would, keeping its data and port for `resume`."""
        done = self._run(
            str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed:\n{done.stdout}\n{done.stderr}")

    def _processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, WAL writer, ...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [postmaster, *map(int, children)]

    def freeze(self) -> None:
        """Stop every process of the server (SIGSTOP) without closing anything, as a hung
        host or a network dropping packets looks to clients: connections open, no answer."""
        self._frozen = self._processes()
        for pid in self._frozen:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []

    def resume(self) -> None:
        done = self._pg_ctl_start()
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not restart:\n{done.stderr}\n{self._log_tail()}")
        self.psql("postgres", "SELECT 1")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        """Run one statement with psql over TCP (no event loop needed); return its output."""
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; return its URL."""
        with self._lock:
            name = f"{prefix}_{next(self._names)}"
        self.psql("postgres", f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            self.psql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        self.thaw()  # a test that failed while it was frozen
        if self.started:
            self.started = False
            done = self._run(
                str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"
            )
            if done.returncode != 0:  # last resort: the postmaster's pid from its pid file
                with contextlib.suppress(OSError, ValueError, IndexError):
                    pid = int((self.data / "postmaster.pid").read_text().split()[0])
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """One redis-server, in memory only (no RDB, no AOF), listening on 127.0.0.1."""

    def __init__(self, binary: str, extra_args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.extra_args = list(extra_args)  # e.g. a unix socket or a TLS port besides
        self.root = Path(tempfile.mkdtemp(prefix="metergate-redis-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        last_error = ""
        for _ in range(3):
            self.port = free_port()
            log = open(self.root / "redis.log", "wb")  # noqa: SIM115 - handed to the child
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.root),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
            log.close()
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.process.poll() is None:
                if self.ping():
                    return
                time.sleep(0.02)
            last_error = (self.root / "redis.log").read_text(errors="replace")[-2000:]
            self.stop_process()
        raise RuntimeError(f"redis-server did not start:\n{last_error}")

    def ping(self) -> bool:
        """True when the server answers PING (raw RESP: no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def flushall(self) -> None:
        """Empty every database, so a test starts from a clean server."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            if not sock.recv(64).startswith(b"+OK"):
                raise RuntimeError("redis FLUSHALL failed")

    def stop_process(self) -> None:
        terminate(self.process)
        self.process = None

    def stop(self) -> None:
        self.stop_process()
        shutil.rmtree(self.root, ignore_errors=True)


def terminate(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a server and wait for it; SIGKILL it if it has not gone after 10 s."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class _Shared:
    """A lazily started server shared by every fixture that uses it, stopped by the last."""

    def __init__(self) -> None:
        self.server: PostgresServer | RedisServer | None = None
        self.users = 0
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.server is not None:
                server, self.server = self.server, None
                server.stop()

    def stop_at_exit(self) -> None:
        """Backup for an interrupted session: never leave a server behind."""
        if self.server is not None:
            self.server.stop()
            self.server = None


_postgres = _Shared()
_redis = _Shared()
atexit.register(_postgres.stop_at_exit)
atexit.register(_redis.stop_at_exit)


@contextlib.contextmanager
def _use(shared: _Shared, make: Callable[[], PostgresServer | RedisServer]) -> Iterator[Any]:
    """Start the shared server on first use; the last user to leave stops it."""
    with shared.lock:
        if shared.server is None:
            server = make()
            try:
                server.start()
            except BaseException:
                server.stop()
                raise
            shared.server = server
        shared.users += 1
        server = shared.server
    try:
        yield server
    finally:
        shared.release()


def _make_postgres() -> PostgresServer:
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries are not installed (scripts/test installs them)")
    return PostgresServer(bindir)


def _make_redis() -> RedisServer:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/test installs it)")
    return RedisServer(binary)


def running_postgres() -> contextlib.AbstractContextManager[PostgresServer]:
    """The session's PostgreSQL server, started on first use (skip if not installed)."""
    return _use(_postgres, _make_postgres)


def running_redis() -> contextlib.AbstractContextManager[RedisServer]:
    """The session's redis-server, started on first use (skip if not installed)."""
    return _use(_redis, _make_redis)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (see `fresh_postgres_url` for a per-test database)."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database shared by the whole session: `postgresql://postgres@127.0.0.1:PORT/db`."""
    return postgres_server.create_database("session")


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """An empty database of this test's own, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """`redis://127.0.0.1:PORT/0` of the session's in-memory redis-server."""
    return redis_server.url


# --- the gateway as a real process ---------------------------------------------------------


def create_key_sync(ledger_url: str, name: str) -> str:
    """Make a gateway key in a ledger database before a gateway process starts; return it.

    Runs on an event loop of its own thread, so it works from sync and async tests alike
    (and costs far less than starting `metergate keys create` as a process).
    """
    import asyncio

    from metergate.storage.database import open_database
    from metergate.storage.keys import create_key

    async def create() -> str:
        database = await open_database(ledger_url)
        try:
            secret, _ = await create_key(database, name)
        finally:
            await database.close()
        return secret

    result: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(create()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]
    return result[0]


def _limit_files(limits: tuple[int, int]) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


class GatewayProcess:
    """`python -m metergate serve` in a session of its own, so that it and every worker it
    spawns can be killed together whatever a test does to it."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        *,
        workers: int = 1,
        open_files: tuple[int, int] | None = None,
    ) -> None:
        """`open_files`: the (soft, hard) limit of open files it starts with."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gateway-{self.port}.log"
        command = [sys.executable, "-m", "metergate", "serve", "--config", str(config)]
        command += ["--port", str(self.port), "--workers", str(workers)]
        env = {**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # `serve --workers` makes its own
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=None if open_files is None else partial(_limit_files, open_files),
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll GET /readyz until it answers 200; fail with the log if the deadline passes."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"gateway not ready after {timeout} s:\n{self.log()}")

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def worker_pids(self) -> set[int]:
        """The live worker processes of `--workers N` (children running multiprocessing's
        spawn_main; not the resource tracker, not one that died)."""
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
                if int(fields[1]) == self.pid and fields[0] != "Z" and b"spawn_main" in cmdline:
                    found.add(int(stat.parent.name))
        return found

    def kill_all(self) -> None:
        """Kill the process group (the server and its workers); safe to call repeatedly."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


class ServerProcess:
    """A server binary on a free loopback port, in a session of its own, ready when
    `ready_path` answers 200; `stop` ends it. Used for nginx, Prometheus, Alertmanager."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        command: Callable[[int], list[str]],
        ready_path: str = "/-/ready",
    ) -> None:
        self.name, self.workdir, self.command, self.ready_path = name, workdir, command, ready_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        import httpx

        for _ in range(3):  # the free port may be taken between picking and binding
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self.command(self.port),
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.process.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{self.url}{self.ready_path}", timeout=1).status_code == 200:
                        return self
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self) -> None:
        terminate(self.process)
        self.process = None


def run_prometheus(workdir: Path, config: dict[str, Any]) -> ServerProcess:
    """A real Prometheus with `config` as its prometheus.yml, its data in `workdir`."""
    import yaml

    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    return ServerProcess(
        "prometheus",
        workdir,
        lambda port: [
            binary("prometheus"),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
    ).start()


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (made), unmounted after: a disk that a test
    can fill. Mounting needs root; the test is skipped without it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its filesystem is full; the file (remove it to
    free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    return filler
