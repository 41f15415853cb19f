"""What a rate-limited request pays for buckets shared by the workers of a host.

    .venv/bin/python bench/rate_limit_lock.py [--requests 20000] [--rounds 5]

A limited request takes its rate limits once (check and take) and debits its tokens
once; both run here, in a loop, against a key's rpm and tpm buckets: kept by the process
(a dict, one worker) and in the workers' shared table (`limits.host`: a file lock and
the mapped file), alone and with a second process doing the same at the same time on
another key (both let go by a barrier; the slower's time). Microseconds per request,
the median of `--rounds`; `bench/results/rate-limit-lock.md`.
"""

from __future__ import annotations

import argparse
import multiprocessing.synchronize
import tempfile
import time
from pathlib import Path

from benchlib import report, together
from metergate.config.model import RateLimitsConfig
from metergate.limits.host import HostTats, create_table
from metergate.limits.rate import RateLimiter

BENCH = Path(__file__).resolve().parent
# one request a microsecond and a million tokens a second: nothing is ever refused
LIMITS = {"keys": {"*": {"rpm": 60_000_000, "tpm": 60_000_000_000}}}


def per_request_us(
    path: str | None,
    key: str,
    requests: int,
    start: multiprocessing.synchronize.Barrier | None = None,
) -> float:
    config = RateLimitsConfig.model_validate(LIMITS)
    limiter = RateLimiter(config, host=HostTats(Path(path)) if path else None)
    buckets = limiter.applicable(key, "model")
    if start is not None:
        start.wait()
    began = time.perf_counter()
    for _ in range(requests):
        now = time.monotonic_ns() / 1000
        with limiter.lock:
            limiter.take(buckets, limiter.check(buckets, now))
        with limiter.lock:
            limiter.debit(buckets, 30, now)
    return (time.perf_counter() - began) / requests * 1e6


def contended(path: str, requests: int) -> float:
    """Two processes at once, each on its own key: the slower's time per request."""
    return together.slowest_at_once(
        per_request_us, [(path, "alice", requests), (path, "bob", requests)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "rate-limit-lock.md")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"own (dict)": [], "shared": [], "shared, 2 processes": []}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.rounds):  # interleaved, so a slow moment touches all three
            path = str(Path(scratch, f"t{len(runs['shared'])}"))
            create_table(Path(path))
            runs["own (dict)"].append(per_request_us(None, "alice", args.requests))
            runs["shared"].append(per_request_us(path, "alice", args.requests))
            runs["shared, 2 processes"].append(contended(path, args.requests))
    report.publish_medians(
        "Rate limits shared by the workers: cost per limited request",
        __doc__,
        "buckets",
        runs,
        args.output,
    )


if __name__ == "__main__":
    main()
