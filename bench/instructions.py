"""Instructions per request: metergate against the floor proxy (and another commit).

    .venv/bin/python bench/instructions.py [--baseline REV] [--requests 2000] [--runs 3]

Each server runs under valgrind's callgrind (`benchlib/callgrind.py`) with nginx as its
upstream: metergate with the suite's config (every feature on), the floor as the suite
starts it, and with `--baseline` another commit's metergate as `bench/ab.py` exports it.
After a warm-up the counters are zeroed, a fixed number of requests is sent over kept-alive
connections (`--connections`, each waiting for its answer), and the counts are dumped;
`--runs` such windows per server. The result, user-space instructions per request split
by shared object, moves by well under 1 % between runs, where requests/s on this machine
move by ±10 %: it shows changes of a few percent that wrk cannot. It does not count the
kernel's work, cache misses or waiting, so requests/s stay the measure of the targets.

About 2 minutes per server (valgrind runs Python ~50x slower). Everything listens on
127.0.0.1 and every process started here is stopped; `bench/results/instructions.md`.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchlib import baseline, callgrind, procs, report, upstream
from benchlib import gateway as gw
from benchlib.report import Check, table
from benchlib.targets import DIRECT_TOKEN, FLOOR_LABEL, STREAM_BODY, UNARY_BODY, start_floor

BENCH = Path(__file__).resolve().parent
CURRENT, BASELINE = "metergate", "baseline"
READY_SECONDS = 600  # a server's start under valgrind (imports run ~50x slower)
TOP_FUNCTIONS = 25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="also count this commit's metergate")
    parser.add_argument("--requests", type=int, default=2000, help="requests per window (2000)")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before counting (1000)")
    parser.add_argument("--runs", type=int, default=3, help="counted windows per server (3)")
    parser.add_argument("--connections", type=int, default=1, help="kept-alive connections (1)")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor proxy")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="streamed chat completions (the 50-chunk SSE stream; no floor: it relays none)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--output", type=Path, default=None, help="the report's path")
    args = parser.parse_args(argv)
    if args.output is None:
        name = "instructions-stream.md" if args.stream else "instructions.md"
        args.output = BENCH / "results" / name
    return args


@dataclass
class Counted:
    name: str
    runs: list[callgrind.Profile]

    @property
    def per_request(self) -> float:
        return statistics.median(p.total for p in self.runs)


@dataclass(frozen=True)
class Server:
    """A started server under callgrind: where to send requests, with what."""

    pid: int
    port: int
    path: str
    headers: dict[str, str]


def count(name: str, server: Server, dumps: Path, args: argparse.Namespace) -> Counted:
    body = STREAM_BODY if args.stream else UNARY_BODY

    def load(requests: int) -> None:
        callgrind.counted_load(
            server.port, server.path, server.headers, body, requests, args.connections
        )

    load(args.warmup)
    profiles = []
    for run in range(1, args.runs + 1):
        callgrind.control(server.pid, "-z")
        load(args.requests)
        callgrind.control(server.pid, "-d", f"{name}-run{run}")
        dump = _last_dump(dumps, len(profiles) + 1)
        profiles.append(_per_request(callgrind.parse(dump), args.requests))
        print(f"{name} run {run}: {profiles[-1].total:,} instructions per request", flush=True)
    return Counted(name, profiles)


def _last_dump(out: Path, index: int) -> Path:
    """callgrind writes the n-th dump to `out`.n (and the end-of-run one to `out`)."""
    path = out.with_name(f"{out.name}.{index}")
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not path.exists():
        raise procs.BenchError(f"callgrind wrote no dump {path}")
    return path


def _per_request(profile: callgrind.Profile, requests: int) -> callgrind.Profile:
    functions = {k: round(v / requests) for k, v in profile.functions.items()}
    return callgrind.Profile(round(profile.total / requests), functions)


def ledger_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(
            db.execute("SELECT count(*) FROM requests WHERE outcome = 'success'").fetchone()[0]
        )


def rows(counted: list[Counted]) -> list[list[str]]:
    floor = next((c.per_request for c in counted if c.name == FLOOR_LABEL), None)
    groups = callgrind.GROUP_NAMES
    out = []
    for c in counted:
        by_group = {g: statistics.median(p.by_group().get(g, 0) for p in c.runs) for g in groups}
        out.append(
            [
                c.name,
                f"{c.per_request:,.0f}",
                ", ".join(f"{p.total:,}" for p in c.runs),
                f"{c.per_request / floor:.2f}x" if floor else "",
                *(f"{by_group[g]:,.0f}" for g in groups),
            ]
        )
    return out


def render(
    args: argparse.Namespace,
    counted: list[Counted],
    tree: baseline.Tree | None,
    checks: list[Check],
    env: list[tuple[str, str]],
) -> str:
    groups = callgrind.GROUP_NAMES
    commit, subject = baseline.head()
    lines = [
        "# Instructions per request, under callgrind",
        "",
        f"- metergate: `{commit}` ({subject}), the suite's config (every feature on)",
    ]
    if tree is not None:
        lines.append(f"- baseline: `{args.baseline}` = `{tree.commit[:12]}` ({tree.subject})")
    lines += [
        "",
        f"User-space instructions per request (every thread), median of {args.runs} windows of "
        f"{args.requests:,} requests after a {args.warmup}-request warm-up, "
        f"{args.connections} kept-alive connection(s), nginx upstream, "
        + ("streamed (50 chunks, usage in the last). " if args.stream else "whole answers. ")
        + "Reproduce: `.venv/bin/python bench/instructions.py"
        + (" --stream" if args.stream else "")
        + (f" --baseline {args.baseline}`." if args.baseline else "`."),
        "",
        table(
            ["server", "per request", "runs", "vs floor", *groups],
            rows(counted),
            "lrrr" + "r" * len(groups),
        ),
    ]
    named = {c.name: c for c in counted}
    if BASELINE in named:
        ratio = named[CURRENT].per_request / named[BASELINE].per_request
        lines += ["", f"metergate / baseline: **{ratio:.3f}x**"]
    top = named[CURRENT].runs[0].top(TOP_FUNCTIONS)
    lines += [
        "",
        f"## metergate's {TOP_FUNCTIONS} costliest functions (self, first window)",
        "",
        table(
            ["function", "object", "per request", "share"],
            [
                [f"`{f}`", o, f"{c:,}", f"{100 * c / named[CURRENT].runs[0].total:.1f} %"]
                for f, o, c in top
            ],
            "llrr",
        ),
        "",
        *report.checks_and_environment(checks, env),
    ]
    return "\n".join(lines)


def start_metergate(
    processes: procs.Processes, home: Path, nginx_port: int, install: gw.Install, out: Path
) -> Server:
    home.mkdir()
    config = gw.write_config(home, nginx_port)
    key = gw.create_key(config, install)
    under = gw.Install(tuple(callgrind.wrap(install.command(), out)), install.env)
    gateway = gw.start_gateway(processes, config, None, install=under, ready_timeout=READY_SECONDS)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return Server(gateway.process.popen.pid, gateway.port, upstream.CHAT_PATH, headers)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_signal_exit()
    procs.ensure_tools()
    if callgrind.missing():
        print(
            f"missing {', '.join(callgrind.missing())}: apt-get install valgrind", file=sys.stderr
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="metergate-instructions-"))
    workdir.chmod(0o755)  # nginx's worker runs as `nobody` when started as root
    passed = False
    try:
        env = report.environment("not pinned (instructions do not depend on placement)")
        tree = None
        if args.baseline is not None:
            tree = baseline.export(args.baseline, workdir / "baseline-tree")
        counted: list[Counted] = []
        checks: list[Check] = []
        with procs.Processes() as processes:
            nginx = upstream.start_nginx(processes, workdir, None)
            chat = f"http://127.0.0.1:{nginx.port}{upstream.CHAT_PATH}"
            starts: list[tuple[str, Callable[[Path], Server]]] = [
                (
                    CURRENT,
                    lambda out: start_metergate(
                        processes, workdir / CURRENT, nginx.port, gw.THIS_TREE, out
                    ),
                ),
            ]
            if tree is not None:
                install = tree.install
                starts.append(
                    (
                        BASELINE,
                        lambda out: start_metergate(
                            processes, workdir / BASELINE, nginx.port, install, out
                        ),
                    )
                )
            if not (args.no_floor or args.stream):

                def floor(out: Path) -> Server:
                    url, pid = start_floor(
                        processes, workdir, chat, None, callgrind.wrap((), out), READY_SECONDS
                    )
                    port = int(url.split(":")[2].split("/")[0])
                    headers = {"Authorization": f"Bearer {DIRECT_TOKEN}"}
                    return Server(pid, port, upstream.CHAT_PATH, headers)

                starts.append((FLOOR_LABEL, floor))
            for name, start in starts:
                out = workdir / f"{name}.callgrind"
                server = start(out)
                counted.append(count(name, server, out, args))
                entry = next(e for e in processes.started if e.popen.pid == server.pid)
                processes.stop(entry, grace=120)  # the ledger is flushed on the way out
                if name in (CURRENT, BASELINE):
                    expected = args.warmup + args.runs * args.requests
                    found = ledger_rows(workdir / name / "ledger.db")
                    checks.append(
                        Check(
                            f"{name}: one ledger row per request sent",
                            found == expected,
                            f"{found:,} rows, {expected:,} requests",
                        )
                    )
        text = render(args, counted, tree, checks, env)
        passed = report.publish(text, args.output, checks)
    except procs.BenchError as error:
        print(f"INSTRUCTIONS FAILED: {error}", file=sys.stderr)
    return procs.finish(workdir, passed, args.keep)


if __name__ == "__main__":
    sys.exit(main())
