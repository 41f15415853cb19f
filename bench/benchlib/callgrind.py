"""Instructions per request, counted by valgrind's callgrind: a measure this noisy machine
cannot disturb.

Requests/s on a shared 2-vCPU VM move by ±10 % from run to run, so a change worth 3 %
cannot be shown with wrk. The number of user-space instructions a server executes per
request barely moves (±0.5 % between runs of the same tree): the server runs under
`valgrind --tool=callgrind`, serves a warm-up, its counters are zeroed
(`callgrind_control -z`), it serves a fixed number of requests, and the counts are dumped
(`callgrind_control -d`). Kernel time, cache misses and waits are not in it: it counts
the work, not its price on a given CPU, so it complements the wall-clock runs and does
not replace them.
"""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import BenchError

# The shared objects a profile is split into, by the start of the object file's name.
GROUPS = (
    ("interpreter", ("libpython", "python3")),
    ("uvloop", ("loop.",)),
    ("httptools", ("parser.", "url_parser.")),
    ("SQLite", ("libsqlite3", "_sqlite3.")),
    ("orjson", ("orjson.",)),
    ("libc", ("libc.", "libm.", "ld-linux")),
    ("OpenSSL, hashlib", ("libcrypto", "libssl", "_hashlib.")),
)
OTHER = "other"
GROUP_NAMES = (*(group for group, _ in GROUPS), OTHER)  # a report's columns, in order


def missing() -> list[str]:
    return [name for name in ("valgrind", "callgrind_control") if shutil.which(name) is None]


def wrap(command: Sequence[str], out: Path) -> list[str]:
    """`command` run under callgrind, its dumps written to `out`, `out`.1, ..."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command]


def control(pid: int, *args: str) -> None:
    """`callgrind_control ARGS PID`: -z zeroes the counters, -d dumps them."""
    done = subprocess.run(
        ["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} {pid} failed: {done.stderr}")


@dataclass(frozen=True)
class Profile:
    """Self cost (instructions) of one dump, by function and shared object."""

    total: int
    functions: dict[tuple[str, str], int]  # (function, object file name) -> instructions

    def by_group(self) -> dict[str, int]:
        groups: dict[str, int] = collections.Counter()
        for (_, obj), cost in self.functions.items():
            groups[group_of(obj)] += cost
        return dict(groups)

    def top(self, count: int) -> list[tuple[str, str, int]]:
        ranked = sorted(self.functions.items(), key=lambda item: -item[1])[:count]
        return [(function, obj, cost) for (function, obj), cost in ranked]


def group_of(obj: str) -> str:
    for group, prefixes in GROUPS:
        if obj.startswith(prefixes):
            return group
    return OTHER


_COMPRESSED = re.compile(r"\((\d+)\)(?: (.*))?")


def parse(path: Path) -> Profile:
    """Self costs from a callgrind out file (one event, Ir). A cost line right after a
    `calls=` line is the call's inclusive cost and is not the caller's own."""
    names: dict[str, str] = {}
    objects: dict[str, str] = {}

    def resolve(table: dict[str, str], value: str) -> str:
        found = _COMPRESSED.match(value)
        if found is None:
            return value
        if found.group(2) is not None:
            table[found.group(1)] = found.group(2)
        return table.get(found.group(1), value)

    costs: dict[tuple[str, str], int] = collections.Counter()
    function, obj = "?", "?"
    call_cost_next = False
    with path.open(errors="replace") as lines:
        for line in lines:
            first = line[:1]
            if first.isdigit() or first in "+-*":
                if call_cost_next:
                    call_cost_next = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    costs[(function, obj)] += int(parts[1])
                continue
            key, _, value = line.rstrip("\n").partition("=")
            if key == "fn":
                function = resolve(names, value).split("'")[0]
            elif key == "ob":
                obj = resolve(objects, value).rsplit("/", 1)[-1]
            elif key == "cfn":
                resolve(names, value)
            elif key == "cob":
                resolve(objects, value)
            elif key == "calls":
                call_cost_next = True
    if not costs:
        raise BenchError(f"no costs in {path}: did callgrind dump anything?")
    return Profile(sum(costs.values()), dict(costs))


# The end of a chunked body: an SSE event's data never ends a chunk with "0" (it ends
# "\n\n"), so these bytes cannot appear before the last chunk.
_LAST_CHUNK = b"\r\n0\r\n\r\n"


async def _counted(host: str, port: int, request: bytes, count: int, connections: int) -> None:
    """Send `request` `count` times over `connections` kept-alive connections, each waiting
    for its answer (the whole body, by its content-length or to its last chunk) before
    sending again."""
    left = count

    async def one() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while left > 0:
                left -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise BenchError(f"answer was not a 200: {head[:200]!r}")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                if length is not None:
                    await reader.readexactly(int(length.group(1)))
                elif re.search(rb"(?im)^transfer-encoding: *chunked", head):
                    await reader.readuntil(_LAST_CHUNK)  # a stream, to its end
                else:
                    raise BenchError(f"answer without a length or chunks: {head[:300]!r}")
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))


def counted_load(
    port: int, path: str, headers: dict[str, str], body: bytes, count: int, connections: int
) -> None:
    """Exactly `count` POSTs to 127.0.0.1:`port``path`, all answered 200."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    asyncio.run(_counted("127.0.0.1", port, request, count, connections))
