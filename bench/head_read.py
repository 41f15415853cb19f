"""What the upstream client pays to read an answer, by how many header lines it has.

    .venv/bin/python bench/head_read.py --baseline bde508d [--answers 20000] [--rounds 7]

One connection of `providers/h1.py` reads the same whole answer over and over (reset,
feed, take; no socket, no event-loop turn): nginx's 9 header lines as the suite's
upstream sends them, and 24, about what OpenAI's API sends (its rate-limit, processing
time and proxy headers). This tree's client against `--baseline`'s, loaded from that
commit; rounds interleaved, microseconds per answer, the median of `--rounds`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from metergate.providers import h1

REPO = Path(__file__).resolve().parent.parent
BODY = b"x" * 300
NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 16:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 300\r\nConnection: keep-alive\r\n"
    b"Keep-Alive: timeout=60\r\nX-Request-Id: abc\r\nCache-Control: no-cache\r\n\r\n" + BODY
)
MANY = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-Header-%d: value-%d-abcdefghijkl\r\n" % (n, n) for n in range(22))
    + b"Content-Type: application/json\r\nContent-Length: 300\r\n\r\n"
    + BODY
)


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def client_at(commit: str, workdir: Path) -> ModuleType:
    """`providers/h1.py` as it was at `commit`, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{commit}:src/metergate/providers/h1.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    path = workdir / "h1_baseline.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("h1_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["h1_baseline"] = module
    spec.loader.exec_module(module)
    return module


def per_answer_us(module: Any, answer: bytes, answers: int) -> float:
    conn = module._Connection(asyncio.get_running_loop(), 1 << 20)
    conn.transport = _Transport()
    began = time.perf_counter()
    for _ in range(answers):
        conn._reset(False)
        conn.idle_since = 0.0
        conn.data_received(answer)
        conn.take()
    assert conn.status == 200 and conn.done.done()
    return (time.perf_counter() - began) / answers * 1e6


async def measure(baseline: ModuleType, answers: int, rounds: int) -> list[tuple[str, ...]]:
    rows = []
    for name, answer in (("9 (nginx)", NGINX), ("24 (about OpenAI's)", MANY)):
        times: dict[str, list[float]] = {"baseline": [], "this tree": []}
        for _ in range(rounds):
            times["baseline"].append(per_answer_us(baseline, answer, answers))
            times["this tree"].append(per_answer_us(h1, answer, answers))
        before, after = (statistics.median(times[k]) for k in ("baseline", "this tree"))
        rows.append((name, f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}x"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--answers", type=int, default=20_000, help="answers per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        baseline = client_at(args.baseline, Path(workdir))
        rows = asyncio.run(measure(baseline, args.answers, args.rounds))
    print(f"| header lines | {args.baseline} (µs) | this tree (µs) | this tree / baseline |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
