"""What a result is reported with: the environment it was measured in, and the markdown.

Numbers without their machine, versions and command line cannot be compared later, so
they are written next to every table.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import tool

REPO = Path(__file__).resolve().parents[2]
PACKAGES = (
    "metergate",
    "uvicorn",
    "uvloop",
    "httptools",
    "orjson",
    "prometheus_client",
    "aiosqlite",
    "asyncpg",
    "pydantic",
)


@dataclass(frozen=True)
class Check:
    """A sanity check of the run; a failed `required` check makes the run fail."""

    name: str
    ok: bool
    detail: str = ""
    required: bool = True


def outcomes_check(others: dict[str, float], left_bound: float, subject: str = "") -> Check:
    """No request metered with an outcome other than success, but `cancelled` ones up to
    `left_bound`: wrk closes its connections when a run ends, and a request it sent and
    never read is one whose caller left (metered 499, as nginx would log it); each run
    leaves at most its connections in flight."""
    left = others.get("cancelled", 0.0)
    unexpected = {k: v for k, v in others.items() if k != "cancelled" and v}
    return Check(
        f"{subject}no request metered with an outcome other than success, but callers wrk "
        f"left in flight when a run stopped (cancelled, at most {left_bound:,.0f})",
        not unexpected and left <= left_bound,
        ", ".join(f"{k}: {v:.0f}" for k, v in others.items() if v),
    )


@dataclass(frozen=True)
class Row:
    """One line of the summary table: direct and gateway values and how they compare."""

    label: str
    direct: str
    gateway: str
    comparison: str


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def git_commit() -> str:
    head = _run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"])
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def tool_versions() -> dict[str, str]:
    nginx = _run([tool("nginx"), "-v"]).stderr.strip().removeprefix("nginx version: ")
    wrk = _run([tool("wrk"), "-v"]).stdout.splitlines()
    return {"nginx": nginx, "wrk": wrk[0].split(" Copyright")[0] if wrk else "unknown"}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(cpu_layout: str) -> list[tuple[str, str]]:
    packages = ", ".join(f"{name} {version}" for name, version in package_versions().items())
    tools = ", ".join(f"{name} {version}" for name, version in tool_versions().items())
    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("git commit", git_commit()),
        ("python", f"{platform.python_version()} ({sys.implementation.name})"),
        ("packages", packages),
        ("tools", tools),
        (
            "machine",
            f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        ),
        ("CPU layout", cpu_layout),
        ("command", f"`{shlex.join(sys.orig_argv)}`"),
    ]


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A markdown table; `align` has one character per column, `l` or `r`."""
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def checks_and_environment(checks: list[Check], env: list[tuple[str, str]]) -> list[str]:
    """The "Checks" and "Environment" sections of a report, as markdown lines."""
    lines = ["## Checks", ""]
    for check in checks:
        mark = "ok" if check.ok else ("FAILED" if check.required else "warning")
        lines.append(f"- **{mark}**: {check.name}" + (f" ({check.detail})" if check.detail else ""))
    lines += ["", "## Environment", ""]
    lines += [f"- {name}: {value}" for name, value in env]
    return lines


def render(
    title: str,
    method: str,
    summary: list[Row],
    runs: list[list[str]],
    checks: list[Check],
    env: list[tuple[str, str]],
) -> str:
    parts = [f"# {title}", "", method, ""]
    parts += [
        table(
            ["", "direct (nginx)", "through metergate", "gateway vs direct"],
            [[r.label, r.direct, r.gateway, r.comparison] for r in summary],
            "lrrr",
        ),
        "",
    ]
    parts += checks_and_environment(checks, env)
    parts += [
        "",
        "## Every run",
        "",
        table(
            ["target", "load", "run", "requests", "requests/s", "p50 ms", "p99 ms", "errors"],
            runs,
            "lllrrrrr",
        ),
        "",
    ]
    return "\n".join(parts)


def publish_measured(lines: list[str], output: Path) -> None:
    """A report without checks, measured unpinned: `lines`, then the environment."""
    lines = [*lines, *checks_and_environment([], environment("not pinned"))]
    publish("\n".join(lines) + "\n", output, [])


def publish_medians(
    title: str, doc: str | None, kind: str, runs: dict[str, list[float]], output: Path
) -> None:
    """A per-request timing in µs: the median and every round of each kind in `runs`,
    under `title` and the scenario's description (its docstring after the usage)."""
    rows = [
        [name, f"{statistics.median(times):.2f}", ", ".join(f"{t:.2f}" for t in times)]
        for name, times in runs.items()
    ]
    header = [kind, "µs per request, median", "rounds"]
    description = (doc or "").split("\n\n", 2)[2].strip()
    publish_measured([f"# {title}", "", description, "", table(header, rows, "lrl"), ""], output)


def publish(text: str, output: Path, checks: list[Check]) -> bool:
    """Write the report to `output`, print it, and say whether every required check held."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print("\n" + text)
    print(f"written to {output}")
    return all(c.ok for c in checks if c.required)
