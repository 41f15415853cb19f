"""Budgets shared by the workers of one host: `serve --workers N` without Redis counts
every worker's spend and holds against each budget (`metergate.budgets.host`), where
each worker used to count its own (so N workers could spend N limits)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml

from metergate.budgets import BudgetBook, Reservation
from metergate.budgets.host import HostBudgets, create_table, release_worker
from metergate.config.model import BudgetConfig
from metergate.errors import BudgetExceeded
from metergate.limits import host as host_rates
from metergate.metering.estimate import WorstCase
from metergate.metering.metrics import Metrics
from tests.harness import counts_at_once, simulated_config, write_config
from tests.services import GatewayProcess, create_key_sync, fill, small_filesystem

NANO = 1_000_000_000
ADMIN_KEY = "host-budgets-admin-key-0123456789"
CAP = BudgetConfig(limit_usd=Decimal(1), alert_at_percent=[50, 80])  # $1, hard


def cost(nano: int) -> WorstCase:
    return WorstCase(nano=nano, byte_pico=0, prompt_pico=0, token_pico=0, max_tokens=0)


class Worker:
    """One worker's book and view of the host's tables, as a worker process has them."""

    def __init__(self, tables: Path, number: int, config: BudgetConfig = CAP) -> None:
        self.metrics = Metrics()
        self.book = BudgetBook({"cap": config}, self.metrics)
        self.lock = host_rates.HostTats(tables / "rates")
        self.host = HostBudgets(tables / "budgets", number, self.lock)

    def reserve(self, nano: int) -> Reservation:
        """As `Gate.admit` does: under the admission lock when a budget is hard."""
        budgets = tuple(self.book.budgets)
        lock = self.lock if self.host.needs_lock(budgets) else contextlib.nullcontext()
        with lock:
            return self.host.reserve(self.book, budgets, cost(nano))

    def settle(self, reservation: Reservation, nano: int) -> None:
        """As `Gate.settle` does: no lock, then the spend shown."""
        self.host.show(self.book, self.host.settle(self.book, reservation, nano, time.time()))

    def alerts(self, percent: int) -> float:
        """metergate_budget_alerts_total for `percent`, as this worker counted it."""
        labels = {"budget": "cap", "threshold": str(percent)}
        return self.metrics.registry.get_sample_value("metergate_budget_alerts_total", labels) or 0

    def close(self) -> None:
        self.host.close()
        self.lock.close()


def make_tables(tmp_path: Path, workers: int = 2, capacity: int = 64) -> Path:
    host_rates.create_table(tmp_path / "rates", capacity=4)
    create_table(tmp_path / "budgets", workers, capacity=capacity)
    return tmp_path


def spend_all(
    tables: str,
    number: int,
    start: multiprocessing.synchronize.Barrier,
    counts: multiprocessing.queues.Queue[int],
) -> None:
    """In a process of its own, as worker `number`: admit $0.01 requests until refused,
    each settled at what it held; how many it got."""
    worker = Worker(Path(tables), number)
    start.wait()
    admitted = 0
    while True:
        try:
            reservation = worker.reserve(NANO // 100)
        except BudgetExceeded:
            break
        worker.settle(reservation, NANO // 100)
        admitted += 1
    counts.put(admitted)


def test_two_processes_spend_a_hard_limit_once_between_them(tmp_path: Path) -> None:
    """Each tries to spend the whole $1 at $0.01 a request, at the same time: together
    they get 100 requests, where books of their own each got 100."""
    tables = make_tables(tmp_path)
    got = counts_at_once(spend_all, [(str(tables), number) for number in range(2)])
    assert sum(got) == 100, got


SOFT = BudgetConfig(limit_usd=Decimal(1), hard=False, alert_at_percent=list(range(10, 101, 10)))


def spend_soft(
    tables: str,
    number: int,
    start: multiprocessing.synchronize.Barrier,
    counts: multiprocessing.queues.Queue[int],
) -> None:
    """In a process of its own, as worker `number`: 500 requests of $0.001 under a soft
    budget (no lock); how many thresholds it announced."""
    worker = Worker(Path(tables), number, SOFT)
    start.wait()
    for _ in range(500):
        worker.settle(worker.reserve(NANO // 1000), NANO // 1000)
    counts.put(sum(int(worker.alerts(percent)) for percent in SOFT.alert_at_percent))


def test_two_processes_spending_on_a_soft_budget_lose_nothing_and_announce_once(
    tmp_path: Path,
) -> None:
    """Without a lock each writes only its own column: the spend is every request's,
    and each of the ten thresholds is announced by one of them."""
    tables = make_tables(tmp_path)
    announced = counts_at_once(spend_soft, [(str(tables), number) for number in range(2)])
    assert sum(announced) == 10, announced
    view = Worker(tables, 0, SOFT)
    reservation = view.reserve(0)
    view.settle(reservation, 0)
    assert view.book.budgets[0].spent_nano == NANO  # 1,000 x $0.001
    assert view.book.budgets[0].reserved_nano == 0
    view.close()


def test_holds_count_across_workers_until_a_dead_workers_are_let_go(tmp_path: Path) -> None:
    tables = make_tables(tmp_path)
    first, second = Worker(tables, 0), Worker(tables, 1)
    first.reserve(NANO * 6 // 10)  # in flight on worker 0: $0.60 held
    with pytest.raises(BudgetExceeded, match=r"held by requests in flight \$0\.600000"):
        second.reserve(NANO // 2)
    first.close()  # worker 0 dies with its request in flight
    released = release_worker(tables / "budgets", 0)
    assert released == NANO * 6 // 10
    second.reserve(NANO // 2)  # what it held is free again
    second.close()


def test_what_every_worker_holds_is_read_for_the_console(tmp_path: Path) -> None:
    """Any worker answers the console: each reads every worker's holds on a budget, not
    its own alone; a budget no worker placed holds nothing."""
    tables = make_tables(tmp_path)
    first, second = Worker(tables, 0), Worker(tables, 1)
    (budget,) = second.book.budgets  # never used by worker 1
    assert second.host.held_nano(budget) == 0
    held = first.reserve(NANO * 6 // 10)
    assert second.host.held_nano(budget) == first.host.held_nano(budget) == NANO * 6 // 10
    second.reserve(NANO // 10)
    assert first.host.held_nano(first.book.budgets[0]) == NANO * 7 // 10
    first.settle(held, NANO // 2)
    assert second.host.held_nano(budget) == NANO // 10
    first.close()
    second.close()


def test_each_threshold_is_announced_by_one_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tables = make_tables(tmp_path)
    first, second = Worker(tables, 0), Worker(tables, 1)
    caplog.set_level(logging.WARNING, logger="metergate.budgets")
    for worker, nano in ((first, 55), (second, 10), (second, 20), (first, 5)):
        reservation = worker.reserve(nano * NANO // 100)
        worker.settle(reservation, nano * NANO // 100)
    crossings = [r.getMessage() for r in caplog.records if "passed" in r.getMessage()]
    assert len(crossings) == 2, crossings
    assert "passed 50%: $0.55 of $1.00" in crossings[0]
    assert "passed 80%: $0.85 of $1.00" in crossings[1]
    assert (first.alerts(50), second.alerts(50)) == (1, 0)
    assert (first.alerts(80), second.alerts(80)) == (0, 1)
    # each shows the host's spend as of its last settle
    assert first.book.budgets[0].spent_nano == 0.9 * NANO
    assert second.book.budgets[0].spent_nano == 0.85 * NANO
    first.close()
    second.close()


def test_a_late_claim_with_an_older_spend_announces_nothing_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker 1 read the spend at 55 % and claims after worker 0 announced 80 %: the
    mark stays at 80 %, so its next settle announces nothing again."""
    tables = make_tables(tmp_path)
    first, second = Worker(tables, 0), Worker(tables, 1)
    caplog.set_level(logging.WARNING, logger="metergate.budgets")
    first.settle(first.reserve(NANO * 85 // 100), NANO * 85 // 100)  # announces 50 and 80
    budget = second.book.budgets[0]
    second.reserve(0)  # finds the slot
    assert budget.host_slot is not None
    assert second.host._claim(budget.host_slot[1], budget, NANO * 55 // 100) == set()
    second.settle(second.reserve(NANO // 100), NANO // 100)
    crossings = [r.getMessage() for r in caplog.records if "passed" in r.getMessage()]
    assert len(crossings) == 2, crossings
    first.close()
    second.close()


def test_the_first_worker_seeds_the_spend_and_a_full_table_counts_apart(tmp_path: Path) -> None:
    tables = make_tables(tmp_path, capacity=1)
    first, second = Worker(tables, 0), Worker(tables, 1)
    first.book.budgets[0].spent_nano = NANO * 9 // 10  # what it read from the ledger
    second.book.budgets[0].spent_nano = 0  # read before a row, say: the table wins
    first.reserve(0)
    with pytest.raises(BudgetExceeded, match=r"spent \$0\.900000"):
        second.reserve(NANO // 5)
    # one slot, taken: a second budget is counted by each worker on its own
    other = BudgetConfig(limit_usd=Decimal(1), period="day")
    third, fourth = Worker(tables, 0, other), Worker(tables, 1, other)
    reservation = third.reserve(NANO * 9 // 10)
    assert reservation.slots == (None,)
    fourth.reserve(NANO * 9 // 10)
    for worker in (first, second, third, fourth):
        worker.close()


def test_a_budget_for_each_key_is_shared_key_by_key(tmp_path: Path) -> None:
    """Alice's share is one across the workers; Bob's is his own."""
    tables = make_tables(tmp_path)
    each = BudgetConfig(scope="key", target="*", limit_usd=Decimal(1))
    first, second = Worker(tables, 0, each), Worker(tables, 1, each)

    def hold(worker: Worker, key: str, nano: int) -> None:
        with worker.lock:
            worker.host.reserve(worker.book, worker.book.applicable(key, "sim"), cost(nano))

    hold(first, "alice", NANO * 7 // 10)
    with pytest.raises(BudgetExceeded, match="budget 'cap' \\(key alice, per month\\)"):
        hold(second, "alice", NANO * 4 // 10)
    hold(second, "bob", NANO * 7 // 10)
    first.close()
    second.close()


# -- `serve --workers 2` ---------------------------------------------------------------


@pytest.mark.parametrize("zone", ["Etc/UTC", "Asia/Tokyo"])
def test_a_budget_rebuilt_while_requests_run_counts_them_in_every_worker(
    tmp_path: Path, zone: str
) -> None:
    """A reload gives the budget another time zone while requests run, and the workers
    apply it one after the other. A request that reserved on the replaced budget settles
    on the rebuilt one's slot, so every worker counts it; its hold goes from the slot it
    was put in. The same period under another name (Etc/UTC for UTC) is the same slot,
    so a worker that applies the reload late counts there too; Tokyo's day is another
    period, with a slot of its own."""
    tables = make_tables(tmp_path)
    workers = [Worker(tables, 0), Worker(tables, 1)]
    moved = CAP.model_copy(update={"timezone": zone})

    def reload(worker: Worker) -> None:
        book = BudgetBook({"cap": moved}, worker.metrics, carry=worker.book)
        book.take_over()
        worker.book = book

    try:
        in_flight = workers[0].reserve(NANO // 10)
        reload(workers[0])
        spent = NANO // 10
        if zone == "Etc/UTC":  # the other worker, not reloaded yet, spends meanwhile
            workers[1].settle(workers[1].reserve(NANO // 20), NANO // 20)
            spent += NANO // 20
        reload(workers[1])
        workers[0].settle(in_flight, NANO // 10)
        (rebuilt,) = workers[1].book.budgets
        assert workers[1].host.held_nano(rebuilt) == 0
        with pytest.raises(BudgetExceeded) as refused:
            workers[1].reserve(NANO)  # the whole limit: refused, saying what was spent
        said = f"spent ${spent / NANO:.6f}, held by requests in flight $0.000000"
        assert said in str(refused.value)
    finally:
        for worker in workers:
            worker.close()


def test_the_host_tables_have_their_disk_before_it_fills(tmp_path: Path) -> None:
    """The workers write the tables through a mapping: made sparse, a page first written
    after the disk filled killed the worker with SIGBUS (a new key's rate-limit bucket,
    say), answered requests cut off. They are made with their blocks, so a full disk
    later changes nothing for them."""
    with small_filesystem(tmp_path / "small", "4m") as small:
        host_rates.create_table(small / "rates")
        create_table(small / "budgets", workers=2)
        fill(small)
        script = textwrap.dedent(
            f"""
            import mmap, os
            for name in ("rates", "budgets"):
                fd = os.open({str(small)!r} + "/" + name, os.O_RDWR)
                mapped = mmap.mmap(fd, 0)
                for at in range(0, len(mapped), mmap.PAGESIZE):  # every page, as workers may
                    mapped[at] = 1
                mapped.close()
            print("written")
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout.strip()) == (0, "written"), done


def budget_config(
    tmp_path: Path, limit_usd: float, latency_ms: float = 0, admin_key: str | None = None
) -> tuple[Path, str]:
    """A hard global budget over the simulated models `sim` (answering after
    `latency_ms`) and `quick` (at once), and a key for them."""
    config = simulated_config(latency_ms=latency_ms)
    if admin_key is not None:
        config["admin"] = {"api_key": admin_key}
    config["providers"]["fast"] = {"type": "simulated"}
    config["upstreams"]["fast-up"] = {**config["upstreams"]["sim-up"], "provider": "fast"}
    config["models"]["quick"] = {"upstreams": ["fast-up"]}
    config["budgets"] = {"cap": {"limit_usd": limit_usd, "alert_at_percent": [50]}}
    path = write_config(config, tmp_path)
    secret = create_key_sync(yaml.safe_load(path.read_text())["ledger"]["url"], "alice")
    return path, secret


def ask(
    http: httpx.Client, gateway: GatewayProcess, secret: str, model: str = "sim"
) -> httpx.Response:
    """A request on a connection of its own, so that either worker may take it."""
    return http.post(
        f"{gateway.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}", "Connection": "close"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
    )


def worst_case(refusal: httpx.Response) -> Decimal:
    """What the gateway said the refused request might cost."""
    found = re.search(
        r"this request may cost up to \$([0-9.]+)", refusal.json()["error"]["message"]
    )
    assert found, refusal.text
    return Decimal(found[1])


def test_serve_with_two_workers_spends_a_hard_budget_once(tmp_path: Path) -> None:
    """One request after another, each on a new connection: both workers admit them
    until the budget's spend (every worker's) leaves no room for one more's worst case,
    where each worker used to admit until its own spend did. A restart finds the budget
    spent (from the ledger)."""
    path, secret = budget_config(tmp_path, 0.001)
    gateway = GatewayProcess(path, tmp_path, workers=2)
    try:
        gateway.wait_ready()
        with httpx.Client(timeout=30) as http:
            replies = [ask(http, gateway, secret) for _ in range(60)]
        gateway.process.send_signal(signal.SIGTERM)  # the workers write their last rows
        assert gateway.wait(60) == 0
    finally:
        gateway.kill_all()
    statuses = [reply.status_code for reply in replies]
    assert set(statuses) == {200, 429}, statuses
    admitted = statuses.count(200)
    assert statuses == [200] * admitted + [429] * (60 - admitted)
    costs = {Decimal(r.headers["x-metergate-cost-usd"]) for r in replies if r.status_code == 200}
    (each,) = costs  # the same prompt and answer every time
    worst = worst_case(replies[-1])
    limit = Decimal("0.001")
    assert (admitted - 1) * each + worst <= limit < admitted * each + worst, (admitted, each)
    assert "budget 'cap'" in replies[-1].json()["error"]["message"]
    assert gateway.log().count("passed 50%") == 1

    again = GatewayProcess(path, tmp_path, workers=2)
    try:
        again.wait_ready()
        with httpx.Client(timeout=30) as http:
            assert ask(http, again, secret).status_code == 429
    finally:
        again.kill_all()


def test_a_worker_killed_with_a_request_in_flight_lets_its_hold_go(tmp_path: Path) -> None:
    """The budget fits one request's worst case: while a slow one is in flight, the next
    is refused for what it holds. Its worker is killed (both are, to be sure of it); the
    supervisor lets the dead worker's holds go, so the budget admits again."""
    path, secret = budget_config(tmp_path, 0.0002, latency_ms=600_000)
    gateway = GatewayProcess(path, tmp_path, workers=2)
    try:
        gateway.wait_ready()
        workers = gateway.worker_pids()
        with httpx.Client(timeout=120) as http, ThreadPoolExecutor(1) as pool:
            slow = pool.submit(ask, http, gateway, secret)
            refused = poll_until(lambda: ask(http, gateway, secret, "quick"), 429)
            assert "held by requests in flight" in refused.json()["error"]["message"]
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            with pytest.raises(httpx.TransportError):
                slow.result(60)
        deadline = time.monotonic() + 60
        while len(gateway.worker_pids() - workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        gateway.wait_ready()
        with httpx.Client(timeout=30) as http:
            answer = poll_until(lambda: ask(http, gateway, secret, "quick"), 200)
    finally:
        gateway.kill_all()
    assert answer.status_code == 200
    assert "requests in flight held $0.000115 of budgets: let go" in gateway.log()


def test_the_console_of_either_worker_shows_the_hold_of_a_request_on_the_other(
    tmp_path: Path,
) -> None:
    """While a slow request is in flight on one worker, the overview's budget says what it
    holds whichever worker answers (each question on a connection of its own)."""
    path, secret = budget_config(tmp_path, 1.0, latency_ms=600_000, admin_key=ADMIN_KEY)
    gateway = GatewayProcess(path, tmp_path, workers=2)

    def held(http: httpx.Client) -> int:
        answer = http.get(
            f"{gateway.base_url}/admin/api/overview",
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Connection": "close"},
        )
        (budget,) = answer.raise_for_status().json()["budgets"]
        return int(budget["reserved_nano"])

    try:
        gateway.wait_ready()
        with httpx.Client(timeout=120) as http, ThreadPoolExecutor(1) as pool:
            slow = pool.submit(ask, http, gateway, secret)
            deadline = time.monotonic() + 30
            while (first := held(http)) == 0:
                assert time.monotonic() < deadline, "the slow request held nothing"
                time.sleep(0.05)
            seen = [held(http) for _ in range(16)]
            gateway.kill_all()
            with pytest.raises(httpx.TransportError):
                slow.result(60)
    finally:
        gateway.kill_all()
    assert seen == [first] * 16


def poll_until(call: Callable[[], httpx.Response], status: int) -> httpx.Response:
    """`call()` until it answers `status` (or 30 s pass: then fail with its answer)."""
    deadline = time.monotonic() + 30
    while True:
        reply = call()
        if reply.status_code == status or time.monotonic() > deadline:
            assert reply.status_code == status, reply.text
            return reply
        time.sleep(0.05)


def test_sigttin_starts_no_worker_beyond_the_budget_tables_columns(tmp_path: Path) -> None:
    """The budgets' table has a column for each of the N workers the gateway started
    with: one more is refused, saying so; after SIGTTOU takes one away, SIGTTIN brings
    it back into the freed column."""
    path, secret = budget_config(tmp_path, 1)
    gateway = GatewayProcess(path, tmp_path, workers=2)
    try:
        gateway.wait_ready()
        os.kill(gateway.pid, signal.SIGTTIN)
        poll_log(gateway, "SIGTTIN: not starting a worker beyond the 2")
        assert len(gateway.worker_pids()) == 2
        os.kill(gateway.pid, signal.SIGTTOU)
        poll_workers(gateway, 1)
        os.kill(gateway.pid, signal.SIGTTIN)
        poll_workers(gateway, 2)
        gateway.wait_ready()
        with httpx.Client(timeout=30) as http:
            statuses = {ask(http, gateway, secret, "quick").status_code for _ in range(6)}
    finally:
        gateway.kill_all()
    assert statuses == {200}


def poll_log(gateway: GatewayProcess, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in gateway.log():
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.05)


def poll_workers(gateway: GatewayProcess, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(gateway.worker_pids()) != count:
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.1)
