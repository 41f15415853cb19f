"""Multi-process metrics: the workers' value class and the merged /metrics renderer say
exactly what prometheus_client's own files and MultiProcessCollector would.

Real processes write the files: some with metergate's value class, one with
prometheus_client's own, some still running, one dead. The reference is
prometheus_client's `MultiProcessCollector` + `generate_latest`, run on a copy of the
directory from which `mark_process_dead` removed the dead process's `live*` files (what
prometheus_client expects someone to do; metergate decides liveness by pid instead).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from metergate.metering import multiprocess_exposition
from metergate.metering.multiprocess_exposition import MultiProcessExposition

MODES = (
    "all",
    "liveall",
    "sum",
    "livesum",
    "max",
    "livemax",
    "min",
    "livemin",
    "mostrecent",
    "livemostrecent",
)

# One writer process: creates the metrics, then runs the steps it is sent on stdin.
WRITER = textwrap.dedent(
    """
    import os, sys
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, values
    flavour, w = sys.argv[1], int(sys.argv[2])
    if flavour == "metergate":
        import metergate.metering.metrics  # installs the value class
        assert getattr(values.ValueClass, "_metergate_directory", None), values.ValueClass
    else:
        assert values.ValueClass.__name__ == "MmapedValue", values.ValueClass
    r = CollectorRegistry()
    requests = Counter("t_requests", "Requests.\\nSecond line, a \\\\ too.", ["model", "key"],
                       registry=r)
    plain = Counter("t_plain", "No labels.", registry=r)
    seconds = Histogram("t_seconds", "Durations.", ["model"], buckets=(0.1, 1, 10), registry=r)
    sizes = Summary("t_size", "Sizes.", registry=r)
    gauges = {mode: Gauge("t_gauge_" + mode, "A gauge.", ["model"], multiprocess_mode=mode,
                          registry=r) for mode in sys.argv[3].split(",")}

    def step(n):
        if n == 1:
            for i in range(3):
                requests.labels(f"m{i}", f'k"{w}\\n\\\\').inc(w + i + 0.5)
                seconds.labels(f"m{i}").observe(0.05 * (w + 1) * (i + 1))
                seconds.labels(f"m{i}").observe(5)
            plain.inc(w)
            sizes.observe(100 + w)
            for mode, gauge in gauges.items():
                gauge.labels("shared").set(w * 10 - 5)
                gauge.labels(f"own-{w}").set(w + 0.25)
            gauges["mostrecent"].labels("never-set")  # at 0, timestamp 0: not shown
        elif n == 2:  # many new series: the files grow past their first 64 KiB
            for i in range(600):
                requests.labels(f"model-{i:04d}-" + "x" * 60, f"key-{w}").inc(i)
            seconds.labels("m0").observe(0.5)
            plain.inc(1)
            for gauge in gauges.values():
                gauge.labels("shared").set(w * 3.5)
            requests.labels("m1", "new").inc(7)
        elif n == 3:  # values only: no new series in any file
            plain.inc(2)
            seconds.labels("m1").observe(20)
        elif n == 4:  # a few values far apart in a grown file, one of them twice
            for i in (0, 299, 599, 299):
                requests.labels(f"model-{i:04d}-" + "x" * 60, f"key-{w}").inc(0.25)
        elif n == 5:  # nearly every value at once
            for i in range(600):
                requests.labels(f"model-{i:04d}-" + "x" * 60, f"key-{w}").inc(1)

    for line in sys.stdin:
        if line.strip() == "exit":
            break
        step(int(line))
        print("done", flush=True)
    """
)


class Writer:
    def __init__(self, directory: Path, flavour: str, index: int) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, flavour, str(index), ",".join(MODES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.process.pid

    def step(self, n: int) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "done"

    def exit(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("exit\n")
            self.process.stdin.flush()
            assert self.process.wait(30) == 0


@pytest.fixture
def writers(tmp_path: Path) -> Iterator[tuple[Path, list[Writer]]]:
    directory = tmp_path / "metrics"
    directory.mkdir()
    started = [Writer(directory, "metergate", i) for i in range(3)]
    started.append(Writer(directory, "prometheus_client", 3))
    try:
        yield directory, started
    finally:
        for writer in started:
            writer.exit()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, dict[str, tuple[str, str]]]:
    samples: Samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = (family.type, family.documentation)
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, key
            samples[key] = sample.value
    return samples, families


def same(ours: Samples, expected: Samples) -> bool:
    """The same samples; values equal up to the order floats were added in (the files are
    read in another order than prometheus_client's, so a sum may differ in its last bit)."""
    assert ours.keys() == expected.keys(), (
        ours.keys() - expected.keys(),
        expected.keys() - ours.keys(),
    )
    for key, value in ours.items():
        assert math.isclose(value, expected[key], rel_tol=1e-12, abs_tol=1e-12), (key, value)
    return True


def reference(directory: Path, dead: list[int], scratch: Path) -> str:
    """prometheus_client's view, with the dead processes marked dead as it expects."""
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(directory, scratch)
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(scratch))
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(scratch))
    return generate_latest(registry).decode()


def test_merged_exposition_matches_multiprocess_collector(
    writers: tuple[Path, list[Writer]], tmp_path: Path
) -> None:
    directory, procs = writers
    for writer in procs:
        writer.step(1)
    procs[0].exit()  # a worker that died: its counters still count, its live gauges not
    dead = [procs[0].pid]
    ours = MultiProcessExposition(str(directory))

    first, first_families = parse(ours.render().decode())
    expected, expected_families = parse(reference(directory, dead, tmp_path / "ref"))
    assert same(first, expected)
    assert first_families == expected_families
    # what the comparison covers: every kind, the dead worker's counts, both flavours
    requests = [v for (name, _), v in first.items() if name == "t_requests_total"]
    assert len(requests) == 12 and sum(requests) == sum(
        w + i + 0.5 for w in range(4) for i in range(3)
    )
    assert first[("t_gauge_livesum", (("model", "shared"),))] == 5 + 15 + 25
    assert first[("t_gauge_sum", (("model", "shared"),))] == -5 + 5 + 15 + 25
    assert ("t_gauge_all", (("model", f"own-{procs[0].pid}"),)) not in first
    assert first[("t_gauge_all", (("model", "own-0"), ("pid", str(procs[0].pid))))] == 0.25
    assert ("t_gauge_mostrecent", (("model", "never-set"),)) not in first
    assert first[("t_seconds_count", (("model", "m0"),))] == 8
    assert first[("t_seconds_bucket", (("le", "+Inf"), ("model", "m0")))] == 8

    # the same renderer again: only what was appended is parsed, the files grew past
    # their first mapping, changed values show and unchanged lines are reused
    for writer in procs[1:]:
        writer.step(2)
    second, second_families = parse(ours.render().decode())
    expected, expected_families = parse(reference(directory, dead, tmp_path / "ref"))
    assert same(second, expected)
    assert second_families == expected_families
    assert len(second) > len(first) + 1800
    assert second[("t_plain_total", ())] == first[("t_plain_total", ())] + 3
    assert all(
        os.path.getsize(p) > 65536
        for p in directory.glob("counter_*.db")
        if str(procs[0].pid) not in p.name
    )

    # the console's samples are the same merged values
    names = {"t_requests_total", "t_seconds_bucket", "t_gauge_livemax"}
    picked = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in ours.samples(names)}
    assert picked == {key: value for key, value in second.items() if key[0] in names}

    # files nobody wrote to since: the same text; a value written to a series that
    # was there already shows on the next scrape (the series in the files unchanged)
    assert ours.render() == ours.render()
    for writer in procs[1:]:
        writer.step(3)
    third, _ = parse(ours.render().decode())
    expected, _ = parse(reference(directory, dead, tmp_path / "ref"))
    assert same(third, expected)
    assert third.keys() == second.keys()
    assert third[("t_plain_total", ())] == second[("t_plain_total", ())] + 6
    inf_bucket = ("t_seconds_bucket", (("le", "+Inf"), ("model", "m1")))
    assert third[inf_bucket] == second[inf_bucket] + 3


@pytest.mark.parametrize("copies", ["all", "one file", "none"])
def test_values_that_moved_anywhere_in_the_files_show_on_the_next_scrape(
    writers: tuple[Path, list[Writer]],
    tmp_path: Path,
    copies: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scrape reads again only the blocks of a file whose bytes changed since its copy:
    a value in the middle of a file of many blocks, at its end, or nearly all of them
    moving at once (the files read whole, then copied again once calm) each show as
    prometheus_client reads them; so they do for files past the bound on copies."""
    bound = {"all": 1 << 30, "one file": 300_000, "none": 0}[copies]
    monkeypatch.setattr(multiprocess_exposition, "_COPIES", bound)
    directory, procs = writers
    for step in (1, 2):
        for writer in procs:
            writer.step(step)
    ours = MultiProcessExposition(str(directory))
    before, _ = parse(ours.render().decode())
    assert same(before, parse(reference(directory, [], tmp_path / "ref"))[0])
    assert all(p.stat().st_size > 4 * 16384 for p in directory.glob("counter_*.db"))

    def requests(shown: Samples, i: int, w: int) -> float:
        labels = (("key", f"key-{w}"), ("model", f"model-{i:04d}-" + "x" * 60))
        return shown[("t_requests_total", labels)]

    for writer in procs[1:3]:
        writer.step(4)
    after, _ = parse(ours.render().decode())
    assert same(after, parse(reference(directory, [], tmp_path / "ref"))[0])
    moved = {key for key in after if after[key] != before[key]}
    assert len(moved) == 6  # 3 series in each of 2 files
    assert requests(after, 299, 1) == requests(before, 299, 1) + 0.5
    assert requests(after, 599, 2) == requests(before, 599, 2) + 0.25

    for writer in procs:
        writer.step(5)
    busy, _ = parse(ours.render().decode())
    assert same(busy, parse(reference(directory, [], tmp_path / "ref"))[0])
    assert all(requests(busy, i, 3) == requests(after, i, 3) + 1 for i in range(600))
    assert ours.render() == ours.render()  # calm again: copied

    procs[1].step(4)
    last, _ = parse(ours.render().decode())
    assert same(last, parse(reference(directory, [], tmp_path / "ref"))[0])
    assert requests(last, 299, 1) == requests(busy, 299, 1) + 0.5

    # the console reads the merged samples between two scrapes: the next scrape still
    # shows what moved since the last one
    assert ours.render() == ours.render()
    procs[2].step(3)
    plain = ("t_plain_total", ())
    console = {(s.name, ()): s.value for s in ours.samples({"t_plain_total"})}
    assert console[plain] == last[plain] + 2
    scraped, _ = parse(ours.render().decode())
    assert same(scraped, parse(reference(directory, [], tmp_path / "ref"))[0])
    assert scraped[plain] == console[plain]


def test_a_restarted_worker_with_the_same_pid_carries_on(tmp_path: Path) -> None:
    """A file already there for this pid: its counters continue, never restart at 0."""
    script = textwrap.dedent(
        """
        from prometheus_client import CollectorRegistry, Counter, values
        import metergate.metering.metrics
        first = Counter("t_total_things", "Things.", ["k"], registry=CollectorRegistry())
        first.labels("a").inc(5)
        values.ValueClass.close_all_files()
        from metergate.metering.multiprocess import value_class
        import os
        values.ValueClass = value_class(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        again = Counter("t_total_things", "Things.", ["k"], registry=CollectorRegistry())
        again.labels("a").inc(2)
        print(again.labels("a")._value.get())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "7.0"
    shown, _ = parse(MultiProcessExposition(str(tmp_path)).render().decode())
    assert shown == {("t_total_things_total", (("k", "a"),)): 7.0}


def test_a_worker_with_a_dead_workers_pid_starts_its_gauges_afresh(tmp_path: Path) -> None:
    """A replacement that got a dead worker's pid opens that worker's files: its counters
    carry on, but the dead worker's gauges neither show as the new one's (a circuit the
    new one never opened, a budget its config no longer has) nor are they a base its
    in-flight count would go up and down from."""
    script = textwrap.dedent(
        """
        from prometheus_client import values
        from metergate.metering.metrics import Metrics
        dead = Metrics()
        dead.circuit_state.labels("b1").set(2)
        dead.budget_limit.labels("removed").set(5)
        dead.active("m").inc(3)
        dead.requests.labels("m", "b1", "k", "success", "chat").inc(7)
        values.ValueClass.close_all_files()  # as if it died, and another took its pid
        from metergate.metering.multiprocess import value_class
        import os
        values.ValueClass = value_class(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        again = Metrics()
        again.circuit_state.labels("b1").set(0)
        again.active("m").inc(1)
        again.requests.labels("m", "b1", "k", "success", "chat").inc(2)
        print("ready", flush=True)
        input()
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"  # alive while it is read
        shown, families = parse(MultiProcessExposition(str(tmp_path)).render().decode())
    finally:
        process.kill()
        process.wait(30)
    names = {name for name, (kind, _) in families.items() if kind == "gauge"}
    assert {key: value for key, value in shown.items() if key[0] in names} == {
        ("metergate_circuit_state", (("upstream", "b1"),)): 0,
        ("metergate_active_requests", (("model", "m"),)): 1,
        ("metergate_ledger_pending_rows", ()): 0,  # made anew (no labels): at 0, as it was
    }
    labels = {"model": "m", "upstream": "b1", "key": "k", "outcome": "success", "api": "chat"}
    assert shown[("metergate_requests_total", tuple(sorted(labels.items())))] == 9


# A worker whose gauge series come and go (an MCP server a reload adds, then removes).
SETTER = textwrap.dedent(
    """
    import sys, warnings
    import metergate.metering.metrics  # installs the value class
    from prometheus_client import CollectorRegistry, Gauge
    from metergate.metering.multiprocess import remove_series
    r = CollectorRegistry()
    gauges = [Gauge("t_up_" + mode, "Up.", ["server"], multiprocess_mode=mode, registry=r)
              for mode in sys.argv[1].split(",")]
    warnings.simplefilter("error")  # prometheus_client's "not implemented" warning: none
    for line in sys.stdin:
        command, *args = line.split()
        if command == "exit":
            break
        for gauge in gauges:
            if command == "set":
                gauge.labels(args[0]).set(float(args[1]))
            else:
                remove_series(gauge, args[0])
        print("done", flush=True)
    """
)


def test_a_gauge_series_a_worker_removed_leaves_the_merged_metrics(tmp_path: Path) -> None:
    """prometheus_client's files cannot delete a series: `remove_series` marks it, and
    the merged /metrics shows it only while another worker that counts still has it."""
    modes = ("livesum", "livemin", "max", "all", "mostrecent")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", SETTER, ",".join(modes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    view = MultiProcessExposition(str(tmp_path))

    def tell(worker: int, line: str) -> None:
        process = workers[worker]
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(line + "\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "done"

    def shown(server: str) -> dict[str, Any]:
        samples, _ = parse(view.render().decode())
        found: dict[str, Any] = {}
        for (name, labels), value in samples.items():
            if dict(labels).get("server") == server:
                mode = name.removeprefix("t_up_")
                pid = dict(labels).get("pid")
                found[mode if pid is None else f"{mode}:{pid == str(workers[0].pid)}"] = value
        return found

    try:
        tell(0, "set a 1")
        tell(0, "set b 5")
        tell(1, "set a 3")
        tell(1, "set b 7")
        everywhere = {"livesum": 4, "livemin": 1, "max": 3, "all:True": 1, "all:False": 3}
        assert shown("a") == {**everywhere, "mostrecent": 3}
        tell(0, "remove a")  # the other worker still has it
        assert shown("a") == {"livesum": 3, "livemin": 3, "max": 3, "all:False": 3}
        assert shown("b") == {
            "livesum": 12, "livemin": 5, "max": 7, "all:True": 5, "all:False": 7, "mostrecent": 7
        }  # fmt: skip
        tell(1, "set a 4")
        assert shown("a")["mostrecent"] == 4
        tell(1, "remove a")  # now no worker has it
        assert shown("a") == {}
        assert len(shown("b")) == 6
        tell(0, "set a 2")  # added again
        assert shown("a") == {"livesum": 2, "livemin": 2, "max": 2, "all:True": 2, "mostrecent": 2}
    finally:
        for worker in workers:
            if worker.poll() is None:
                assert worker.stdin is not None
                worker.stdin.write("exit\n")
                worker.stdin.flush()
                worker.wait(30)


def test_a_fork_after_metrics_exist_fails_loudly(tmp_path: Path) -> None:
    """A forked child must not write into its parent's file (both would count): its first
    write raises, and the parent's values are untouched and still writable."""
    script = textwrap.dedent(
        """
        import os
        from prometheus_client import CollectorRegistry, Counter
        from metergate.metering.metrics import Metrics
        from metergate.metering.multiprocess import ForkedWrite
        metrics = Metrics()
        metrics.requests.labels("m", "u", "k", "success", "chat").inc()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                metrics.requests.labels("m", "u", "k", "success", "chat").inc()
            except ForkedWrite:
                code |= 1
            try:
                Counter("t_new", "New.", registry=CollectorRegistry())
            except ForkedWrite:
                code |= 2
            try:
                metrics.trace_spans_dropped.inc()  # a locked value
            except ForkedWrite:
                code |= 4
            os._exit(10 + code)
        _, status = os.waitpid(pid, 0)
        metrics.requests.labels("m", "u", "k", "success", "chat").inc()
        print(os.waitstatus_to_exitcode(status))
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(10 + 1 + 2 + 4)
    shown, _ = parse(MultiProcessExposition(str(tmp_path)).render().decode())
    key = (
        "metergate_requests_total",
        (("api", "chat"), ("key", "k"), ("model", "m"), ("outcome", "success"), ("upstream", "u")),
    )
    assert shown[key] == 2.0


def test_a_metrics_file_that_cannot_grow_keeps_new_series_in_memory(tmp_path: Path) -> None:
    """No space for a worker's metrics file to grow (a full filesystem; here a file size
    limit, which fails the same way): a new series is counted in memory, said once, and
    the request goes on. The file was grown sparse, written through its mapping, so a
    full tmpfs killed the worker with SIGBUS between answering and writing the ledger
    row; it is now given its blocks first, and a refusal is an error to handle."""
    script = textwrap.dedent(
        """
        import logging, resource
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        from metergate.metering.metrics import Metrics
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        metrics = Metrics()
        for n in range(2_000):  # far more series than 64 KiB holds
            metrics.requests.labels(f"model-{n:04d}", "u", "k", "success", "chat").inc(n)
        kept = metrics.requests.labels("model-1999", "u", "k", "success", "chat")
        print(kept._value.get())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1999.0"  # counted, in memory
    assert done.stderr.count("metrics file in") == 1, done.stderr  # said once
    assert "cannot grow" in done.stderr and "the ledger and budgets are not affected" in done.stderr
    shown, _ = parse(MultiProcessExposition(str(tmp_path)).render().decode())
    models = {dict(labels)["model"] for name, labels in shown if name == "metergate_requests_total"}
    assert "model-0000" in models and "model-1999" not in models  # the file's, as far as it went


def test_metrics_written_from_threads_stay_exact(tmp_path: Path) -> None:
    """The export thread and the event loop both count dropped spans: no increment lost.
    CPython 3.11 happens not to switch threads inside `value += amount`; an opcode tracer
    lets it switch between any two bytecodes (as other interpreters may), which loses
    increments unless the value holds its lock."""
    script = textwrap.dedent(
        """
        import sys, threading
        sys.setswitchinterval(1e-6)
        from metergate.metering.metrics import Metrics
        metrics = Metrics()

        def tracer(frame, event, arg):
            if frame.f_code.co_name == "inc":
                frame.f_trace_opcodes = True
                return lambda *args: None
            return None

        def work():
            sys.settrace(tracer)
            for _ in range(20_000):
                metrics.trace_spans_dropped.inc()

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    shown, _ = parse(MultiProcessExposition(str(tmp_path)).render().decode())
    assert shown[("metergate_trace_spans_dropped_total", ())] == 80_000


@pytest.mark.parametrize("size", [0, 4])
def test_a_file_a_worker_has_only_just_created_is_skipped(
    writers: tuple[Path, list[Writer]], tmp_path: Path, size: int
) -> None:
    """A worker creates its file before it writes the header: a scrape in between finds
    it shorter than a header, and renders the others (it used to fail with a 500)."""
    directory, procs = writers
    for writer in procs:
        writer.step(1)
    ours = MultiProcessExposition(str(directory))
    ours.render()  # the groups exist, as in a gateway that has been scraped before
    newcomer = directory / "counter_999999.db"  # a pid that is not running
    newcomer.write_bytes(b"\0" * size)
    shown, _ = parse(ours.render().decode())
    newcomer.unlink()  # prometheus_client's collector cannot read it either
    expected, _ = parse(reference(directory, [], tmp_path / "ref"))
    assert same(shown, expected)


# A worker with the gateway's own metrics, set as a config (`sys.argv[1]`) and its state
# make them, then waiting on stdin until told to exit (or killed).
GATEWAY_WORKER = textwrap.dedent(
    """
    import json, sys
    from metergate.metering.metrics import Metrics
    from metergate.mcp.metrics import ClientMetrics
    from prometheus_client import CollectorRegistry
    state = json.loads(sys.argv[1])
    metrics = Metrics()
    up = ClientMetrics(CollectorRegistry()).up
    metrics.build_info.labels("1.0", state["config"]).set(1)
    metrics.circuit_state.labels("b1").set(state["circuit"])
    for budget, (limit, spent) in state["budgets"].items():
        metrics.budget_limit.labels(budget).set(limit)
        metrics.budget_spent.labels(budget).set(spent)
    metrics.model_price.labels("b1", "output").set(state["price"])
    metrics.rollout_weight.labels("r", "b1").set(state["weight"])
    metrics.active(model="m").inc(state["active"])
    metrics.ledger_pending.set(state["pending"])
    metrics.redis_up().set(state["redis"])
    up.labels("tools").set(state["redis"])
    metrics.requests.labels("m", "b1", "k", "success", "chat").inc(state["requests"])
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def test_a_killed_workers_gauges_leave_the_merged_metrics_and_its_counts_stay(
    tmp_path: Path,
) -> None:
    """A worker SIGKILLed with a circuit open, on a config a reload has changed since (a
    lower limit, a budget removed, another version), its budget spend from a past
    period: its file keeps all of it, and none of its gauges may show once it is dead,
    while its requests still count."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def start(**state: Any) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", GATEWAY_WORKER, json.dumps(state)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        return process

    old = {"monthly": (100, 90), "removed": (5, 1)}
    killed = start(
        config="v1", circuit=2, budgets=old, price=30, weight=1, active=3, pending=4,
        redis=0, requests=7,
    )  # fmt: skip
    alive = start(
        config="v2", circuit=0, budgets={"monthly": (50, 0)}, price=10, weight=0.5, active=1,
        pending=2, redis=1, requests=5,
    )  # fmt: skip
    view = MultiProcessExposition(str(tmp_path))
    try:
        both, _ = parse(view.render().decode())
        assert both[("metergate_circuit_state", (("upstream", "b1"),))] == 2  # while it runs
        assert both[("metergate_active_requests", (("model", "m"),))] == 4

        killed.kill()
        assert killed.wait(30) == -signal.SIGKILL
        shown, families = parse(view.render().decode())
        names = {name for name, (kind, _) in families.items() if kind == "gauge"}
        gauges = {key: value for key, value in shown.items() if key[0] in names}
        assert gauges == {
            ("metergate_build_info", (("config_version", "v2"), ("version", "1.0"))): 1,
            ("metergate_circuit_state", (("upstream", "b1"),)): 0,
            ("metergate_budget_limit_usd", (("budget", "monthly"),)): 50,
            ("metergate_budget_spent_usd", (("budget", "monthly"),)): 0,
            (
                "metergate_model_price_usd_per_million_tokens",
                (("type", "output"), ("upstream", "b1")),
            ): 10,
            ("metergate_rollout_weight", (("rollout", "r"), ("target", "b1"))): 0.5,
            ("metergate_active_requests", (("model", "m"),)): 1,
            ("metergate_ledger_pending_rows", ()): 2,
            ("metergate_redis_up", ()): 1,
            ("metergate_mcp_server_up", (("mcp_server_name", "tools"),)): 1,
        }
        requests = ("metergate_requests_total", tuple(sorted({
            "model": "m", "upstream": "b1", "key": "k", "outcome": "success", "api": "chat"
        }.items())))  # fmt: skip
        assert shown[requests] == 7 + 5  # the dead worker's count stays
    finally:
        for process in (killed, alive):
            if process.poll() is None:
                process.kill()
            process.wait(30)
