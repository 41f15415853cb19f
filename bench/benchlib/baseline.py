"""Another commit's metergate, runnable beside the current tree in the same run.

`export` writes the commit's tree with `git archive` into a throwaway directory (the
repository itself is not touched: no worktree, no checkout) and runs it with this venv's
python and `PYTHONPATH=<tree>/src`, which comes before the venv's editable install of
the current tree. That works while the commit needs no package this venv lacks; for one
that does, `venv=True` builds a throwaway venv and installs the commit into it (slower,
a minute or two). Either way the tree actually imported is checked before measuring.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from benchlib.gateway import Install
from benchlib.procs import BenchError

REPO = Path(__file__).resolve().parents[2]
_CLI = "import sys; from metergate.cli import main; sys.argv[0] = 'metergate'; sys.exit(main())"


@dataclass(frozen=True)
class Tree:
    rev: str  # as given, e.g. HEAD~1
    commit: str
    subject: str
    root: Path
    install: Install
    how: str  # PYTHONPATH or venv, for the report


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def module_at(rev: str, path: str, into: Path) -> ModuleType:
    """One module of `src/metergate` (`path`, e.g. "providers/h1.py") as it was at `rev`,
    loaded under a name of its own beside this tree's (for in-process A/Bs of one step;
    its own imports resolve to this tree)."""
    name = "baseline_" + path.removesuffix(".py").replace("/", "_")
    file = into / f"{name}.py"
    file.write_text(_git("show", f"{rev}:src/metergate/{path}"))
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def head() -> tuple[str, str]:
    """The current tree's commit (with a mark when it has uncommitted changes) and subject."""
    commit = _git("rev-parse", "--short=12", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + (" + uncommitted changes" if dirty else ""), _git("log", "-1", "--format=%s")


def export(rev: str, into: Path, venv: bool = False) -> Tree:
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    subject = _git("log", "-1", "--format=%s", commit)
    root = into / f"metergate-{commit[:12]}"
    root.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit], stdout=subprocess.PIPE
    )
    untar = subprocess.run(["tar", "-x", "-C", str(root)], stdin=archive.stdout, timeout=300)
    archive.wait(60)
    if archive.returncode != 0 or untar.returncode != 0:
        raise BenchError(f"could not export {rev} ({commit}) into {root}")
    if venv:
        python = _make_venv(root)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        install, how = Install((python, "-c", _CLI), env), f"its own venv ({python})"
        _check_imports(install, root / ".venv")
    else:
        env = {**os.environ, "PYTHONPATH": str(root / "src")}
        install, how = Install((sys.executable, "-c", _CLI), env), "PYTHONPATH=<tree>/src"
        _check_imports(install, root / "src")
    return Tree(rev, commit, subject, root, install, how)


def _make_venv(root: Path) -> str:
    base = getattr(sys, "_base_executable", None) or sys.executable
    venv = root / ".venv"
    for step in (
        [base, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(root)],
    ):
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(step)} failed:\n{done.stderr[-3000:]}")
    return str(venv / "bin" / "python")


def _check_imports(install: Install, expected: Path) -> None:
    """The metergate the baseline command imports must be the exported tree's."""
    python = install.cli[0]
    code = "import metergate, metergate.cli; print(metergate.__file__)"
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=120, env=install.env
    )
    where = done.stdout.strip()
    if done.returncode != 0:
        raise BenchError(
            f"the baseline tree does not import with this venv (try --venv):\n{done.stderr[-2000:]}"
        )
    if not Path(where).resolve().is_relative_to(expected.resolve()):
        raise BenchError(f"the baseline imports metergate from {where}, not from {expected}")
