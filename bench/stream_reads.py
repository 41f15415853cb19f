"""What a streamed token costs: the gateway's CPU per upstream read, a token an event.

    .venv/bin/python bench/stream_reads.py [--baseline REV] [--streams 20] [--events 1000]
                                           [--gap-ms 1] [--rounds 5]

OpenAI's API sends a streamed answer a token an event, each in its own packet, so a
relay makes a read and a write per token; the suite's nginx stream arrives in one read
and hides that. Here an upstream (`benchlib/token_upstream.py`) writes `--events` token
chunks `--gap-ms` apart on each of `--streams` streams at once, through:

- metergate, this tree, with the suite's config (key, metrics, ledger, prices, a hard
  budget);
- with `--baseline`, another commit's metergate the same way (`benchlib/baseline.py`);
- the floor: a byte relay on uvloop's protocols (a read and a write per event, nothing
  parsed, `token_upstream.py relay`).

Rounds interleave the targets. Per target: CPU µs per token event (user + system of
every thread, from /proc), and the read system calls per event (/proc/PID/io `syscr`:
about 1 when every event came in a read of its own, as in service). Medians of
`--rounds`; every stream must deliver every event and its usage, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchlib import baseline, procfs, report
from benchlib.gateway import THIS_TREE, Install, create_key, start_gateway, write_config
from benchlib.procs import BenchError, Processes, free_port, wait_ready

HERE = Path(__file__).resolve().parent
TOKEN_UPSTREAM = HERE / "benchlib" / "token_upstream.py"
MODEL = "bench-stream"


@dataclass
class Target:
    name: str
    port: int
    pid: int
    key: str = "sk-none"
    cpu_us: list[float] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="also measure this commit's metergate")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--events", type=int, default=1000, help="token events per stream")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="between a stream's events")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "stream-reads.md")
    return parser.parse_args(argv)


def read_syscalls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise BenchError(f"no syscr in /proc/{pid}/io")


async def _stream(port: int, key: str, events: int) -> int:
    """One streamed chat request over a raw connection; the token events it delivered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = (
        b'{"model":"%s","stream":true,"stream_options":{"include_usage":true},'
        b'"messages":[{"role":"user","content":"hi"}]}' % MODEL.encode()
    )
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (key.encode(), len(body), body)
    )
    parts = []
    try:
        while not (parts and parts[-1].endswith(b"0\r\n\r\n")):
            data = await reader.read(1 << 16)
            if not data:
                break
            parts.append(data)
    finally:
        writer.close()
    answer = b"".join(parts)
    if not answer.startswith(b"HTTP/1.1 200") or b'"usage"' not in answer:
        raise BenchError(f"a stream did not complete: {answer[:300]!r} ... {answer[-300:]!r}")
    return answer.count(b'"content":" word"')


async def measure(target: Target, streams: int, events: int) -> None:
    pid = target.pid
    cpu, reads = procfs.cpu_seconds(pid), read_syscalls(pid)
    got = await asyncio.gather(*(_stream(target.port, target.key, events) for _ in range(streams)))
    spent, read = procfs.cpu_seconds(pid) - cpu, read_syscalls(pid) - reads
    if sum(got) != streams * events:
        raise BenchError(f"{target.name}: {sum(got)} token events of {streams * events}")
    target.cpu_us.append(spent / sum(got) * 1e6)
    target.reads.append(read / sum(got))


def start_metergate(
    processes: Processes, workdir: Path, upstream: int, name: str, install: Install
) -> Target:
    workdir.mkdir(parents=True)
    config = write_config(workdir, upstream)
    data = yaml.safe_load(config.read_text())
    for provider in data["providers"].values():  # every model's provider: this upstream
        provider["base_url"] = f"http://127.0.0.1:{upstream}/v1"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    key = create_key(config, install)
    gateway = start_gateway(processes, config, None, install=install)
    return Target(name, gateway.port, gateway.process.popen.pid, key)


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Target], str]:
    python = sys.executable
    with Processes() as processes:
        upstream = free_port()
        command = [python, str(TOKEN_UPSTREAM), "serve", str(upstream), str(args.events)]
        started = processes.start("upstream", [*command, str(args.gap_ms)], workdir / "up.log")
        wait_ready(started, f"http://127.0.0.1:{upstream}/")
        relay_port = free_port()
        command = [python, str(TOKEN_UPSTREAM), "relay", str(relay_port), str(upstream)]
        relay = processes.start("relay", command, workdir / "relay.log")
        wait_ready(relay, f"http://127.0.0.1:{relay_port}/")
        targets = [
            start_metergate(processes, workdir / "current", upstream, "metergate", THIS_TREE)
        ]
        how = ""
        if args.baseline:
            tree = baseline.export(args.baseline, workdir / "baseline-tree")
            how = f"`{tree.commit[:12]}` ({tree.subject}), run via {tree.how}"
            name = f"metergate {tree.commit[:9]}"
            targets.append(
                start_metergate(processes, workdir / "base", upstream, name, tree.install)
            )
        targets.append(Target("byte relay (floor)", relay_port, relay.popen.pid))
        for target in targets:  # warm up: connections, code paths, the ledger
            asyncio.run(measure(target, min(args.streams, 4), args.events))
            target.cpu_us.clear()
            target.reads.clear()
        for round_ in range(args.rounds):
            for target in targets if round_ % 2 == 0 else targets[::-1]:
                asyncio.run(measure(target, args.streams, args.events))
                print(f"{target.name}: {target.cpu_us[-1]:.1f} µs/event", flush=True)
    return targets, how


def render(args: argparse.Namespace, targets: list[Target], how: str, seconds: float) -> str:
    floor = statistics.median(targets[-1].cpu_us)
    current = statistics.median(targets[0].cpu_us)
    rows = []
    for target in targets:
        cpu = statistics.median(target.cpu_us)
        rows.append(
            [
                target.name,
                f"{cpu:.1f}",
                f"{min(target.cpu_us):.1f} to {max(target.cpu_us):.1f}",
                f"{cpu / floor:.2f}x",
                f"{cpu / current:.3f}x",
                f"{statistics.median(target.reads):.2f}",
            ]
        )
    delivered = report.Check(
        "every stream delivered all its token events and its usage (else the run stops)", True
    )
    commit, subject = baseline.head()
    command = " ".join(sys.argv[1:])
    lines = [
        "# What a streamed token costs: CPU per upstream read",
        "",
        f"- metergate: `{commit}` ({subject}), the suite's config (every feature on)",
        *([f"- baseline: {how}"] if how else []),
        f"- {args.streams} streams at once, {args.events:,} token events each, "
        f"{args.gap_ms:g} ms apart, each its own write; medians of {args.rounds} interleaved "
        f"rounds ({seconds:.0f} s in all)",
        f"- Reproduce: `.venv/bin/python bench/stream_reads.py {command}`",
        "",
        report.table(
            [
                "target",
                "CPU µs per token event",
                "rounds",
                "vs the byte relay",
                "vs this tree",
                "reads per event",
            ],
            rows,
            "lrrrrr",
        ),
        "",
        "CPU is every thread's user and system time (/proc, 10 ms ticks: a round's total is "
        "a few hundred ms). Reads per event near 1 confirm that every event came in a read "
        "of its own; the gateway's other reads (the ledger's thread, the caller's request) "
        "add a little.",
        "",
        *report.checks_and_environment([delivered], report.environment("not pinned")),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stream-reads-") as tmp:
        targets, how = run(args, Path(tmp))
    text = render(args, targets, how, time.monotonic() - began)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
