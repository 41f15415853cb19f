"""Sample a running gateway with py-spy and rank where its CPU time goes.

`py-spy record -f raw` writes collapsed stacks, one line per distinct stack:
`root;caller;...;leaf COUNT`, each frame `function (file:line)`. From them:

- inclusive % of a function: share of samples with the function anywhere on the stack
  (counted once per sample even when it recurses);
- self % of a line: share of samples whose innermost frame is that line.

Idle samples (the event loop waiting in epoll) are left out by py-spy, so shares are of
the time the process was busy. Time spent in C code (uvloop, httptools, the kernel's
send/recv) is charged to the innermost Python frame below it, e.g. uvloop's own work
shows as self time of `run_until_complete` or of the callback that called into it.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import BenchError, pinned

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Profile:
    samples: int
    inclusive: list[tuple[tuple[str, str], int]]  # ((function, file), samples)
    self_lines: list[tuple[Frame, int]]
    self_by_package: list[tuple[str, int]]


PY_SPY = "py-spy>=0.4"  # also the `bench` extra in pyproject.toml


def py_spy(python: str) -> str:
    return str(Path(python).parent / "py-spy")


def ensure_installed(python: str) -> None:
    """Install py-spy beside `python` on first use: `scripts/test` does not need it."""
    if Path(py_spy(python)).exists():
        return
    print(f"installing {PY_SPY} into {Path(python).parent.parent} (once)", flush=True)
    step = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", PY_SPY]
    done = subprocess.run(step, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not Path(py_spy(python)).exists():
        raise BenchError(f"{' '.join(step)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def start(
    py_spy_bin: str,
    pid: int,
    seconds: int | None,
    output: Path,
    cpus: str | None,
    rate: int = 200,
) -> subprocess.Popen[bytes]:
    """Begin sampling `pid` for `seconds` (None: until SIGINT); the caller loads it meanwhile.

    `--gil`: only samples of the thread holding the GIL, i.e. where Python (or C called
    from it, such as uvloop and httptools) is running. Without it, py-spy counts the
    ledger's aiosqlite thread, blocked in `SimpleQueue.get()`, as busy all the time.
    """
    command = [py_spy_bin, "record", "--pid", str(pid), "--rate", str(rate), "--gil"]
    command += ["--full-filenames", "--format", "raw", "--output", str(output)]
    if seconds is not None:
        command += ["--duration", str(seconds)]
    return subprocess.Popen(pinned(command, cpus), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(
    recorder: subprocess.Popen[bytes], output: Path, timeout: float = 60, interrupt: bool = False
) -> None:
    """Wait for py-spy to write its output (after SIGINT when recording without duration)."""
    if interrupt:
        recorder.send_signal(signal.SIGINT)
    out, _ = recorder.communicate(timeout=timeout)
    if recorder.returncode != 0 or not output.exists():
        raise BenchError(f"py-spy failed ({recorder.returncode}): {out.decode(errors='replace')}")


def parse_frame(text: str) -> Frame:
    match = _FRAME.match(text)
    if match is None:
        return Frame(text, "?", 0)
    return Frame(match["function"], short_path(match["file"]), int(match["line"] or 0))


def short_path(path: str) -> str:
    """`metergate/api/chat.py`, `uvicorn/server.py`, `asyncio/tasks.py`: from a full path."""
    for marker in ("/site-packages/", "/src/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    match = re.search(r"/lib/python3\.\d+/(.*)$", path)
    return match.group(1) if match else path


def package_of(file: str) -> str:
    """A coarse owner of a file for the by-package summary."""
    if file.startswith("metergate/"):
        parts = file.split("/")
        return "/".join(parts[:2]) if len(parts) > 2 else file
    head = file.split("/", 1)[0]
    if head.endswith(".py"):
        return "stdlib/" + head
    if head in ("asyncio", "concurrent", "json", "logging", "email", "http", "urllib"):
        return "stdlib/" + head
    return head


def analyse(raw: Path, top: int = 30) -> Profile:
    inclusive: Counter[tuple[str, str]] = Counter()
    self_lines: Counter[Frame] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [parse_frame(part) for part in stack.split(";")]
        total += count
        for key in {(f.function, f.file) for f in frames}:
            inclusive[key] += count
        leaf = frames[-1]
        self_lines[leaf] += count
        by_package[package_of(leaf.file)] += count
    # Frames on (nearly) every stack are the process's roots (CLI, uvicorn.run,
    # asyncio.run; other threads take the last percent or so): their inclusive share
    # says nothing, their self time is kept.
    rooted = [(k, c) for k, c in inclusive.most_common() if c < 0.98 * total]
    return Profile(total, rooted[:top], self_lines.most_common(top), by_package.most_common())


def shares(raw: Path, categories: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Per category, the share of samples with a frame whose file or function contains
    one of the category's markers anywhere on the stack (inclusive, counted once)."""
    counts = dict.fromkeys(categories, 0)
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        total += int(count_text)
        frames = [parse_frame(part) for part in stack.split(";")]
        for name, markers in categories.items():
            if any(m in f.file or m in f.function for f in frames for m in markers):
                counts[name] += int(count_text)
    return {name: count / total if total else 0.0 for name, count in counts.items()}


def first_lines(functions: list[tuple[str, str]], raw: Path) -> dict[tuple[str, str], int]:
    """The lowest line number seen per function: close to its `def` (for file:line)."""
    lowest: dict[tuple[str, str], int] = {}
    wanted = set(functions)
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, _ = line.rpartition(" ")
        for part in stack.split(";"):
            frame = parse_frame(part)
            key = (frame.function, frame.file)
            if key in wanted and frame.line and frame.line < lowest.get(key, 1 << 30):
                lowest[key] = frame.line
    return lowest
