"""Fleet workload: what Redis costs on the hot path, and a fleet behind a load balancer.

Same nginx upstream and wrk load as the suite, all features on (auth, metrics, ledger,
prices, a hard budget), measured in one run, interleaved, medians:

1. one gateway worker with budgets in process vs the same worker with `redis:` (budget
   holds and settles in Redis): requests/s at -c64 and p50/p99 at one connection;
2. a fleet: 2 replicas x 2 workers sharing Redis and one ledger, behind nginx.

Usage: .venv/bin/python bench/fleet.py [--runs 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchlib import gateway, procs, redis_server, upstream, wrk
from benchlib.procs import free_port

ROOT = Path(__file__).parent
LB = """worker_processes 1;
pid {prefix}/lb.pid;
error_log {prefix}/lb-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  upstream fleet {{ {servers} keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fleet; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "fleet.md")
    args = parser.parse_args()
    procs.ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="metergate-fleet-", dir="/tmp"))
    work.chmod(0o755)
    with procs.Processes() as processes:
        nginx = upstream.start_nginx(processes, work, "1")
        redis_url = redis_server.start(processes, work)
        local_dir, shared_dir = work / "local", work / "shared"
        local_dir.mkdir()
        shared_dir.mkdir()
        local = gateway.write_config(local_dir, nginx.port)
        shared = redis_server.with_redis(
            gateway.write_config(shared_dir, nginx.port), redis_url, shared_dir / "redis.yaml"
        )
        key_local, key_shared = gateway.create_key(local), gateway.create_key(shared)
        one_local = gateway.start_gateway(processes, local, "0")
        one_shared = gateway.start_gateway(processes, shared, "0")
        replicas = [gateway.start_gateway(processes, shared, None, workers=2) for _ in range(2)]
        lb_port = free_port()
        (work / "lb").mkdir()
        servers = " ".join(f"server 127.0.0.1:{r.port};" for r in replicas)
        (work / "lb" / "nginx.conf").write_text(
            LB.format(prefix=work / "lb", servers=servers, port=lb_port)
        )
        processes.start(
            "lb",
            [
                procs.tool("nginx"),
                "-p",
                str(work / "lb"),
                "-c",
                str(work / "lb" / "nginx.conf"),
                "-g",
                "daemon off;",
            ],
            work / "lb" / "stdout.log",
        )
        procs.wait_ready(processes.started[-1], f"http://127.0.0.1:{lb_port}/healthz")
        targets = {
            "1 worker, budgets in process": (one_local.base, key_local),
            "1 worker, budgets in Redis": (one_shared.base, key_shared),
            "fleet: 2 replicas x 2 workers, Redis, nginx": (
                f"http://127.0.0.1:{lb_port}",
                key_shared,
            ),
        }
        results: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
        for _ in range(args.runs):
            for name, (base, key) in targets.items():
                url = f"{base}/v1/chat/completions"
                saturated = wrk.run(url, connections=64, seconds=args.duration, token=key, cpus="1")
                single = wrk.run(url, connections=1, seconds=args.duration, token=key, cpus="1")
                for field, value in (
                    ("rps", saturated.rps),
                    ("p50", single.p50_ms),
                    ("p99", single.p99_ms),
                ):
                    results[name].setdefault(field, []).append(value or 0.0)
    lines = [
        "# Fleet workload: the cost of Redis on the hot path",
        "",
        f"Medians of {args.runs} interleaved runs of {args.duration} s; nginx upstream, wrk "
        "-t1 (-c64 for requests/s, -c1 for latency); single workers pinned to CPU 0, the "
        "fleet unpinned (it has 4 processes on 2 cores). Reproduce: "
        "`.venv/bin/python bench/fleet.py`.",
        "",
        "| target | requests/s (-c64) | p50, 1 connection (ms) | p99, 1 connection (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, fields in results.items():
        lines.append(
            f"| {name} | {statistics.median(fields['rps']):,.0f} | "
            f"{statistics.median(fields['p50']):.3f} | "
            f"{statistics.median(fields['p99']):.3f} |"
        )
    report = "\n".join(lines) + "\n"
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
