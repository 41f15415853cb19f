"""What OpenTelemetry tracing costs on the hot path: the same gateway with `tracing:` off,
on (every request sampled, exported to a local OTLP collector), and on with the
collector down (spans dropped and counted).

Same nginx upstream, wrk load and "every feature on" config as the suite (auth, metrics,
ledger, prices, a hard budget); gateways pinned to CPU 0, nginx, wrk and the collector
to CPU 1; targets interleaved within each run; medians.

Usage: .venv/bin/python bench/tracing.py [--runs 3] [--duration 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchlib import gateway, procs, tracing_micro, upstream, wrk
from benchlib.procs import free_port, http

ROOT = Path(__file__).parent


def traced(config: Path, endpoint: str | None, rate: float, out: Path) -> Path:
    raw = yaml.safe_load(config.read_text())
    if endpoint is not None:
        raw["tracing"] = {"enabled": True, "endpoint": endpoint, "sample_rate": rate}
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def metric(base: str, name: str) -> float:
    answer = http(f"{base}/metrics")
    total = 0.0
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "tracing.md")
    args = parser.parse_args()
    procs.ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="metergate-tracing-", dir="/tmp"))
    work.chmod(0o755)
    with procs.Processes() as processes:
        nginx = upstream.start_nginx(processes, work, "1")
        sink_port = free_port()
        sink = processes.start(
            "otlp-sink",
            procs.pinned(
                [sys.executable, str(ROOT / "benchlib" / "otlp_sink.py"), str(sink_port)], "1"
            ),
            work / "sink.log",
        )
        procs.wait_ready(sink, f"http://127.0.0.1:{sink_port}/count")
        collector = f"http://127.0.0.1:{sink_port}/v1/traces"
        endpoints: dict[str, tuple[str | None, float]] = {
            "tracing off": (None, 1.0),
            "tracing on (sample_rate 1)": (collector, 1.0),
            "tracing on (sample_rate 0.1)": (collector, 0.1),
            "tracing on, collector down": (f"http://127.0.0.1:{free_port()}/v1/traces", 1.0),
        }
        targets: dict[str, tuple[str, str]] = {}
        for index, (name, (endpoint, rate)) in enumerate(endpoints.items()):
            directory = work / f"gw{index}"
            directory.mkdir()
            config = traced(
                gateway.write_config(directory, nginx.port), endpoint, rate, directory / "gw.yaml"
            )
            key = gateway.create_key(config)
            started = gateway.start_gateway(processes, config, "0")
            targets[name] = (started.base, key)
        targets = {"direct (nginx)": (nginx.base, "sk-bench"), **targets}
        results: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
        completed: dict[str, int] = {name: 0 for name in targets}
        for _ in range(args.runs):
            for name, (base, key) in targets.items():
                url = base + (
                    upstream.CHAT_PATH if name.startswith("direct") else "/v1/chat/completions"
                )
                saturated = wrk.run(url, connections=64, seconds=args.duration, token=key, cpus="1")
                single = wrk.run(url, connections=1, seconds=args.duration, token=key, cpus="1")
                completed[name] += saturated.requests + single.requests
                for field, value in (
                    ("rps", saturated.rps),
                    ("p50", single.p50_ms),
                    ("p99", single.p99_ms),
                    ("errors", float(saturated.errors + single.errors)),
                ):
                    results[name].setdefault(field, []).append(value or 0.0)
        spans: dict[str, tuple[float, float]] = {}
        for name, (base, _) in targets.items():
            if "tracing on" in name:
                dropped = metric(base, "metergate_trace_spans_dropped_total")
                rate = endpoints[name][1]
                spans[name] = (2.0 * completed[name] * rate, dropped)
        received = float(http(f"http://127.0.0.1:{sink_port}/count").body)
    lines = report(args, results, spans, received)
    lines += "\nCPU per request, in process (`benchlib/tracing_micro.py`, min of 5 rounds):\n\n"
    lines += "".join(f"- {name}: {value:.1f}\n" for name, value in tracing_micro.measure().items())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(lines)
    print(lines)


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, list[float]]],
    spans: dict[str, tuple[float, float]],
    received: float,
) -> str:
    median = statistics.median
    off = results["tracing off"]
    lines = [
        "# What tracing costs",
        "",
        f"Medians of {args.runs} interleaved runs of {args.duration} s; nginx upstream; wrk -t1 "
        "(-c64 for requests/s, -c1 for latency); gateways (1 worker, every feature on) pinned "
        "to CPU 0, nginx, wrk and the OTLP collector to CPU 1. Reproduce: "
        "`.venv/bin/python bench/tracing.py`.",
        "",
        "| target | requests/s (-c64) | vs off | p50, 1 connection (ms) | p99, 1 connection (ms) "
        "| wrk errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, fields in results.items():
        ratio = median(fields["rps"]) / median(off["rps"])
        lines.append(
            f"| {name} | {median(fields['rps']):,.0f} | {ratio:.3f}x | {median(fields['p50']):.3f} "
            f"| {median(fields['p99']):.3f} | {sum(fields['errors']):.0f} |"
        )
    lines += ["", "Every run (requests/s at -c64; p50 / p99 ms at -c1):", ""]
    for name, fields in results.items():
        runs = zip(fields["rps"], fields["p50"], fields["p99"], strict=True)
        text = "; ".join(f"{rps:,.0f}, {p50:.3f} / {p99:.3f}" for rps, p50, p99 in runs)
        lines.append(f"- {name}: {text}")
    lines += ["", "| traced target | spans made (2 per sampled request, ~) | dropped (metric) |"]
    lines += ["| --- | ---: | ---: |"]
    for name, (made, dropped) in spans.items():
        lines.append(f"| {name} | {made:,.0f} | {dropped:,.0f} |")
    lines += ["", f"The collector received {received:,.0f} spans in all."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
