"""The parent process of `serve --workers N`: uvicorn's supervisor, with what the
gateway's operators rely on.

- `kill -HUP` re-reads the config file, as with one worker, instead of uvicorn's restart
  of every worker: the signal goes to one serving worker, which applies the file (or logs
  why it refuses it, changing nothing) and records the version; the other workers follow
  the recorded version within two seconds.
- Every worker joins the gateway (`api/factory.py`): it starts from the config `serve`
  checked and recorded, and takes the version the gateway runs before it serves. So a
  worker that dies (an OOM kill, say), replaced as uvicorn does and said in the log as a
  warning with how it ended, comes back on the running config, whatever the file holds
  by then (edited but not reloaded, or broken). A replacement that cannot start (in a
  ledger outage) is tried again while the other workers serve, where uvicorn would stop
  the whole gateway. A first worker that cannot start stops it, with exit status 3
  (uvicorn: 0), so that a process manager sees a failed start.
- The workers share their rate limits and budgets through tables in the supervisor's
  private directory (`limits.host`, `budgets.host`). Worker N (of 0 to N - 1) keeps its
  number for life, and its replacement takes it over: what a dead (or, after SIGTTOU,
  stopped) worker's requests held on the budgets is let go first. SIGTTIN (one worker
  more) is refused past the number the gateway started with, which the budgets' table
  has columns for.
- On SIGTERM, a worker that has not stopped once its grace for requests in flight and
  the ledger's last commit have passed is hung, and is killed: uvicorn would wait on it
  for ever.
- A worker stops when the supervisor dies, however it dies (it would serve on alone,
  holding the port), and the next start with `--workers` removes the private directory
  a killed supervisor left behind (`private_dir`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from socket import socket
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from metergate.api.factory import (
    CONFIG_COPY,
    CONFIG_SOURCE,
    HOST_DIR,
    JOINING,
    SUPERVISOR,
    WORKER,
)
from metergate.budgets import host as host_budgets
from metergate.cli.common import bind_or_exit, with_database
from metergate.config import LoadedConfig
from metergate.limits import host as host_rates
from metergate.private_dir import private_directory
from metergate.storage import config_versions

log = logging.getLogger("metergate")
RETRY_SECONDS = 5


class Supervisor(Multiprocess):
    def __init__(
        self, config: uvicorn.Config, sockets: list[socket], tables: Path, stop_within: float
    ) -> None:
        super().__init__(config, sockets)
        self.tables = tables  # of the rate limits and budgets the workers share
        self.columns = self.processes_num  # workers the budgets' table has columns for
        self.stop_within = stop_within  # seconds a worker has to stop after SIGTERM

    def init_processes(self) -> None:
        for slot in range(self.processes_num):
            self.processes.append(self._start(slot))
        self._first = set(self.processes)  # those whose failed start stops the gateway
        self._start_at: dict[int, float] = {}  # slot -> when to try a replacement again
        self.failed_start = False

    def handle_hup(self) -> None:
        for process in self.processes:
            if process.pid is not None and process.is_ready(timeout=1):
                os.kill(process.pid, signal.SIGHUP)
                log.info("SIGHUP: worker %d re-reads the config file", process.pid)
                return
        log.warning("SIGHUP: no worker is serving, so the config file was not re-read")

    def keep_subprocess_alive(self) -> None:
        """Replace a worker that died or hangs, as uvicorn does, except that a replacement
        that cannot start (the ledger database is down, say) is tried again every
        `RETRY_SECONDS` while the other workers serve; uvicorn would stop the gateway.
        A first worker that cannot start still stops it: the gateway never ran."""
        if self.should_exit.is_set():
            return
        for slot, process in enumerate(self.processes):
            due = self._start_at.get(slot)
            if due is not None:
                if time.monotonic() >= due:
                    del self._start_at[slot]
                    self._replace(slot)
                continue
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            hung = process.process.is_alive()  # running, yet no answer to the health check
            process.kill()  # the hung one; one gone already is left as it is
            process.join()
            if self.should_exit.is_set():
                return
            if hung:
                log.warning(
                    "worker %s hung (no answer to the health check in %s s): killed, replacing it",
                    process.pid,
                    self.config.timeout_worker_healthcheck,
                )
                self._replace(slot)
            elif process.exitcode != STARTUP_FAILURE:
                log.warning("worker %s died (%s); replacing it", process.pid, _ending(process))
                self._replace(slot)
            elif process in self._first:
                log.error("worker %s could not start; stopping the gateway", process.pid)
                self.failed_start = True
                self.should_exit.set()
                return
            else:
                log.warning(
                    "worker %s could not start (its log above says why); trying again in %d s",
                    process.pid,
                    RETRY_SECONDS,
                )
                self._start_at[slot] = time.monotonic() + RETRY_SECONDS

    def join_all(self) -> None:
        """Wait for the workers to stop, as uvicorn does, but not for ever: one still
        running `stop_within` seconds after SIGTERM is hung (uvicorn would wait on it,
        and the gateway would never exit), and is killed."""
        deadline = time.monotonic() + self.stop_within
        for process in self.processes:
            process.process.join(max(0.0, deadline - time.monotonic()))
            if process.process.exitcode is None:
                log.warning(
                    "worker %s did not stop within %g s of SIGTERM: killed (its requests "
                    "in flight and unflushed ledger rows are lost)",
                    process.pid,
                    self.stop_within,
                )
                process.kill()
                process.join()

    def handle_ttin(self) -> None:
        """One worker more, as uvicorn does, up to the number the gateway started with
        (after a SIGTTOU): past it the budgets' table has no column for another."""
        slot = len(self.processes)
        if slot >= self.columns:
            log.warning(
                "SIGTTIN: not starting a worker beyond the %d the gateway started with "
                "(restart it with more --workers)",
                self.columns,
            )
            return
        self.processes_num += 1
        self.processes.append(self._start(slot))

    def handle_ttou(self) -> None:
        """One worker fewer, as uvicorn does; what it held, should a request not have
        settled as it stopped, is let go with it."""
        slot = len(self.processes) - 1
        super().handle_ttou()
        if len(self.processes) == slot:
            self._start_at.pop(slot, None)  # a retry of its start is not due any more
            self._release(slot)

    def _replace(self, slot: int) -> None:
        self.processes[slot] = self._start(slot)

    def _start(self, slot: int) -> Process:
        """Worker `slot`, in the column its predecessor (if any) held: what that one's
        requests held on the budgets goes first, as the requests went with it."""
        self._release(slot)
        os.environ[WORKER] = str(slot)  # read by the worker as it starts (spawned)
        process = Process(self.config, self.sockets)
        process.start()
        return process

    def _release(self, slot: int) -> None:
        released = host_budgets.release_worker(self.tables / host_budgets.BUDGETS_FILE, slot)
        if released:
            log.warning(
                "worker %d's requests in flight held $%.6f of budgets: let go",
                slot,
                released / 1e9,
            )


def _ending(process: Process) -> str:
    code = process.exitcode
    assert code is not None  # joined
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def run_workers(
    loaded: LoadedConfig,
    workers: int,
    options: dict[str, Any],
    announce: Callable[[], None] = lambda: None,
) -> None:
    """Serve with `workers` processes sharing one socket and one set of metric files.

    The config is recorded as started here, once the socket is bound, and every worker
    joins it: were each worker to record it, a slow one could record it after a reload
    another worker took at once, and take the gateway back to it."""
    config = uvicorn.Config(
        "metergate.api.factory:create_app", factory=True, workers=workers, **options
    )
    socket = bind_or_exit(config)  # a port in use ends here, before anything is recorded
    announce()
    with_database(
        loaded.config,
        lambda database: config_versions.record(database, loaded.text, loaded.source, "started"),
        create=True,
    )
    with private_directory() as private:
        copy = Path(private, "config.yaml")
        copy.write_text(loaded.text, encoding="utf-8")
        copy.chmod(0o600)  # it holds what the file holds, literal secrets included
        metrics = Path(private, "metrics")
        metrics.mkdir()
        os.environ[SUPERVISOR] = str(os.getpid())
        os.environ[CONFIG_SOURCE] = loaded.source
        os.environ[CONFIG_COPY] = str(copy)
        os.environ[JOINING] = "1"
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)  # any worker's scrape sums all
        tables = Path(private, "tables")
        tables.mkdir()
        host_rates.create_table(tables / host_rates.RATES_FILE)  # before any worker maps it
        host_budgets.create_table(tables / host_budgets.BUDGETS_FILE, workers)
        os.environ[HOST_DIR] = str(tables)
        # the grace for requests in flight, then the ledger's last commit (or its spool)
        stop_within = (
            loaded.config.server.shutdown_grace_seconds
            + 2 * loaded.config.ledger.timeout_seconds
            + 5
        )
        supervisor = Supervisor(config, [socket], tables, stop_within)
        supervisor.run()
    if supervisor.failed_start:
        raise SystemExit(STARTUP_FAILURE)  # uvicorn's supervisor would exit 0
