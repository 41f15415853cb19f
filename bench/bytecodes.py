"""Python bytecodes per request, by function: metergate against the floor proxy.

    .venv/bin/python bench/bytecodes.py [--baseline REV] [--requests 1000]

Each server runs with `benchlib/bytecodehook` on its PYTHONPATH (a `sitecustomize` that
counts, on a signal, every bytecode its main thread executes, per function) and nginx
as its upstream: metergate with the suite's config (every feature on), the floor as the
suite starts it, and with `--baseline` another commit's metergate. After a warm-up the
counting is switched on, a fixed number of requests is sent one after the other over
one kept-alive connection, and the counts are written out.

Where `bench/instructions.py` counts machine instructions by shared object (how much of
the work is the interpreter's), this counts the interpreter's own work by Python
function: which code runs per request, and how much of it. The count is exact and does
not move between runs; what it leaves out is the work of other threads (the ledger's
SQLite thread) and the cost of each bytecode, which varies (a call, a dict lookup, an
add). About a minute per server; `bench/results/bytecodes.md`.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import baseline, callgrind, procs, redis_server, report, upstream
from benchlib import gateway as gw
from benchlib.report import table
from benchlib.targets import FLOOR_LABEL, UNARY_BODY, start_floor

BENCH = Path(__file__).resolve().parent
HOOK = BENCH / "benchlib" / "bytecodehook"
TOP_FUNCTIONS = 30
TOP_AREAS = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="also count this commit's metergate")
    parser.add_argument("--requests", type=int, default=1000, help="requests counted (1000)")
    parser.add_argument("--warmup", type=int, default=500, help="requests before counting")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor proxy")
    parser.add_argument(
        "--redis", action="store_true", help="metergate keeps budgets and rate limits in Redis"
    )
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "bytecodes.md")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Counted:
    name: str
    requests: int
    functions: dict[str, int]  # "file:line:function" -> bytecodes over the window
    seconds: float  # the window's length (the tracing slows the server over tenfold)

    @property
    def per_request(self) -> float:
        return sum(self.functions.values()) / self.requests

    def by_area(self) -> dict[str, float]:
        areas: dict[str, float] = collections.Counter()
        for where, count in self.functions.items():
            areas[area_of(where.rsplit(":", 2)[0])] += count / self.requests
        return dict(areas)

    def top(self, count: int) -> list[tuple[str, float]]:
        ranked = sorted(self.functions.items(), key=lambda item: -item[1])[:count]
        return [(short(where), n / self.requests) for where, n in ranked]


def area_of(path: str) -> str:
    """The package a file belongs to: metergate's subpackage, a library, the stdlib."""
    parts = Path(path).parts
    if "metergate" in parts:
        rest = parts[len(parts) - parts[::-1].index("metergate") :]
        return "metergate/" + (rest[0].removesuffix(".py") if len(rest) > 1 else rest[0])
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "stack" in parts and parts[-1] == "compare.py":
        return "floor proxy (bench/stack)"
    if path.startswith("<"):
        return "generated (dataclass __init__ and the like)"
    return "stdlib " + Path(path).stem


def short(where: str) -> str:
    path, line, function = where.rsplit(":", 2)
    parts = Path(path).parts
    for anchor in ("metergate", "site-packages", "python3.11", "bench"):
        if anchor in parts:
            path = "/".join(parts[parts.index(anchor) + (anchor != "metergate") :])
            break
    return f"{path}:{line} {function}"


def count(
    name: str, pid: int, port: int, headers: dict[str, str], out: Path, args: argparse.Namespace
) -> Counted:
    load = (port, upstream.CHAT_PATH, headers, UNARY_BODY)
    callgrind.counted_load(*load, args.warmup, 1)
    os.kill(pid, signal.SIGUSR1)
    time.sleep(0.3)  # the handler runs at the main thread's next bytecode
    started = time.monotonic()
    callgrind.counted_load(*load, args.requests, 1)
    seconds = time.monotonic() - started
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not out.exists():
        raise procs.BenchError(f"{name} wrote no counts: is {HOOK} on its PYTHONPATH?")
    functions = {}
    for line in out.read_text().splitlines():
        number, where = line.split("\t", 1)
        # Distinct code objects can share a name (every dataclass's generated __init__).
        functions[where] = functions.get(where, 0) + int(number)
    counted = Counted(name, args.requests, functions, seconds)
    print(f"{name}: {counted.per_request:,.0f} bytecodes per request", flush=True)
    return counted


def hooked_env(base: dict[str, str] | None, out: Path) -> dict[str, str]:
    env = dict(base or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(HOOK), env.get("PYTHONPATH"))))
    env["METERGATE_BENCH_BYTECODES"] = str(out)
    return env


def measure_metergate(
    name: str, install: gw.Install, workdir: Path, args: argparse.Namespace
) -> Counted:
    out = workdir / f"{name}.bytecodes"
    with procs.Processes() as processes:
        nginx = upstream.start_nginx(processes, workdir / name, None)
        config = gw.write_config(workdir / name, nginx.port)
        if args.redis:
            url = redis_server.start(processes, workdir / name)
            config = redis_server.with_redis(config, url, config)
        key = gw.create_key(config, install)
        hooked = gw.Install(install.cli, hooked_env(install.env, out))
        gateway = gw.start_gateway(processes, config, None, install=hooked)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return count(name, gateway.process.popen.pid, gateway.port, headers, out, args)


def measure_floor(workdir: Path, args: argparse.Namespace) -> Counted:
    out = workdir / "floor.bytecodes"
    extra = {"PYTHONPATH": str(HOOK), "METERGATE_BENCH_BYTECODES": str(out)}
    with procs.Processes() as processes:
        nginx = upstream.start_nginx(processes, workdir / "floor", None)
        url, pid = start_floor(
            processes, workdir, nginx.base + upstream.CHAT_PATH, None, extra_env=extra
        )
        port = int(url.split(":")[2].split("/")[0])
        headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}
        return count(FLOOR_LABEL, pid, port, headers, out, args)


def render(args: argparse.Namespace, counted: list[Counted], described: str) -> str:
    floor = next((c for c in counted if c.name == FLOOR_LABEL), None)
    areas: dict[str, float] = collections.Counter()
    for c in counted:
        areas.update(c.by_area())
    ranked = [name for name, _ in sorted(areas.items(), key=lambda item: -item[1])][:TOP_AREAS]
    by_area = [c.by_area() for c in counted]
    main = counted[0]
    lines = [
        "# Python bytecodes per request",
        "",
        f"- metergate: {described}, the suite's config (every feature on"
        + ("; budgets and rate limits in Redis" if args.redis else "")
        + ")",
        f"- {args.requests:,} requests after {args.warmup:,} to warm up, one after the other "
        "on one kept-alive connection, nginx upstream; the main thread's bytecodes "
        "(`sys.settrace` with opcode events). Reproduce: "
        "`.venv/bin/python bench/bytecodes.py"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + (" --redis" if args.redis else "")
        + "`.",
        "",
        table(
            ["server", "bytecodes per request", "vs floor", "counted over"],
            [
                [
                    c.name,
                    f"{c.per_request:,.0f}",
                    f"{c.per_request / floor.per_request:.2f}x" if floor else "",
                    f"{c.seconds:.1f} s",
                ]
                for c in counted
            ],
            "lrrr",
        ),
        "",
        "Background tasks that ran during the window (the ledger's flushes every 0.2 s, key "
        "reloads every 2 s) are in the counts; traced, the window is more than ten times "
        "longer than the same requests untraced, so they weigh that much more per request "
        "than they do in service (a few dozen bytecodes per request here).",
        "",
        "## By package",
        "",
        table(
            ["package", *(c.name for c in counted)],
            [[area, *(f"{a.get(area, 0):,.0f}" for a in by_area)] for area in ranked],
            "l" + "r" * len(counted),
        ),
        "",
        f"## metergate's {TOP_FUNCTIONS} busiest functions",
        "",
        table(
            ["function", "bytecodes per request", "share"],
            [
                [f"`{where}`", f"{n:,.0f}", f"{100 * n / main.per_request:.1f} %"]
                for where, n in main.top(TOP_FUNCTIONS)
            ],
            "lrr",
        ),
        "",
        *report.checks_and_environment([], report.environment("not pinned")),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="metergate-bytecodes-"))
    workdir.chmod(0o755)
    counted = [measure_metergate("metergate", gw.THIS_TREE, workdir, args)]
    described = f"`{baseline.head()[0]}`"
    if args.baseline:
        tree = baseline.export(args.baseline, workdir / "trees")
        counted.append(measure_metergate("baseline", tree.install, workdir, args))
        described += f"; baseline `{args.baseline}` = `{tree.commit[:12]}` ({tree.subject})"
    if not args.no_floor:
        counted.append(measure_floor(workdir, args))
    report.publish(render(args, counted, described), args.output, [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
