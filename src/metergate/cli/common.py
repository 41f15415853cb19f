"""What the CLI commands share: the config option, loading it, and opening its database."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar
from urllib.parse import urlsplit

import typer
import uvicorn
from rich.console import Console
from rich.markup import escape

from metergate.config import ConfigError, GatewayConfig, LoadedConfig, read_config
from metergate.config.secrets import without_password
from metergate.storage.database import Database, open_database, sqlite_path, unreachable

T = TypeVar("T")
# Off a terminal (a pipe, `kubectl exec` without -t) rich would fit tables into 80
# columns, cutting ids and costs to `key_6846…` and `$0.…`: there a line is as long as
# its content, so what is printed can be copied and parsed.
_UNBOUNDED = 100_000
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else _UNBOUNDED)
errors = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else _UNBOUNDED)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="METERGATE_CONFIG",
        help="YAML config file; the embedded default (simulated provider) when omitted.",
    ),
]


def not_both(*pairs: tuple[str, object, str, object]) -> None:
    """Exit 2 when two options that undo each other are both given: (name, value, name,
    value), a value given when it is not None, False or empty."""
    for first, one, second, other in pairs:
        if one not in (None, False, []) and other not in (None, False, []):
            errors.print(f"give {first} or {second}, not both")
            raise typer.Exit(2)


def load_or_exit(path: Path | None) -> GatewayConfig:
    return read_or_exit(path).config


def load_for_ledger(path: Path | None) -> GatewayConfig:
    """The config of a command that works on the ledger database alone: the provider keys
    and webhooks a gateway's environment holds need not be set in the operator's shell."""
    return read_or_exit(path, ledger_only=True).config


def read_or_exit(path: Path | None, ledger_only: bool = False) -> LoadedConfig:
    """The validated config with its text, or the list of problems and exit status 2."""
    try:
        return read_config(path, ledger_only)
    except ConfigError as error:
        errors.print(f"[red]config has {len(error.problems)} problem(s):[/red]")
        for problem in error.problems:
            errors.print("  " + problem.render(), markup=False, highlight=False)
        raise typer.Exit(2) from None


def with_database(
    config: GatewayConfig, work: Callable[[Database], Awaitable[T]], create: bool = False
) -> T:
    """Run `work` on the ledger database. One that cannot be opened, or stops answering,
    is a message and exit status 1, not a traceback. `create`: the gateway starting, which
    may make a SQLite ledger at a relative path (see `_no_stray_ledger`)."""
    where = without_password(config.ledger.url)
    password = urlsplit(config.ledger.url).password

    def fail(message: str) -> NoReturn:
        if password:  # should a driver quote the URL back
            message = message.replace(password, "***")
        errors.print(f"[red]{escape(message)}[/red]")
        errors.print("  hint: check `ledger.url` in the config and that the database is running")
        raise typer.Exit(1)

    if not create:
        _no_stray_ledger(config.ledger.url)

    async def run() -> T:
        try:
            database = await open_database(config.ledger.url, config.ledger.timeout_seconds)
        except Exception as error:
            fail(f"cannot open the ledger database {where}: {type(error).__name__}: {error}")
        try:
            return await work(database)
        except Exception as error:
            if not unreachable(error):
                raise
            fail(f"the ledger database {where} stopped answering: {type(error).__name__}")
        finally:
            await database.close()

    return asyncio.run(run())


def _no_stray_ledger(url: str) -> None:
    """A SQLite ledger a command would make where no gateway looks is a second, empty
    ledger (a key created there is refused, a usage report is empty): the embedded
    default's `.metergate/`, relative to where a command runs, from another directory;
    an absolute path in a directory that does not exist (a typo, the path on another
    host). So a command makes neither; the gateway does, where it runs. In a directory
    that exists, a command may make the ledger at an absolute path (keys made before the
    gateway's first start)."""
    path = sqlite_path(url)
    if path in (None, ":memory:") or Path(path).exists():
        return
    where = escape(str(Path(path).resolve()))
    if Path(path).is_absolute():
        if Path(path).parent.is_dir():
            return
        errors.print(
            f"[red]no ledger at {where}[/red]: its directory does not exist, so no gateway "
            "has run with it (a command makes none)",
            highlight=False,
        )
        errors.print(
            f"  hint: check the config's ledger.url ({escape(url)}), or run this command on "
            "the gateway's host",
            highlight=False,
        )
        raise typer.Exit(1)
    errors.print(
        f"[red]no ledger at {where}[/red]: the config's ledger.url ({escape(url)}) is "
        "relative to the directory a command runs in, and no gateway has run in this one",
        highlight=False,
    )
    errors.print(
        "  hint: run this command where the gateway runs (./scripts/serve runs in the "
        "repository's root), or give the gateway's config with -c and an absolute "
        "ledger.url",
        highlight=False,
    )
    raise typer.Exit(1)


def bind_or_exit(config: uvicorn.Config) -> socket.socket:
    """The listening socket, or a message naming the address and what to change, and
    uvicorn's startup failure status. (uvicorn alone logs a bare errno.)"""
    try:
        return config.bind_socket()
    except SystemExit:
        errors.print(
            f"[red]cannot listen on {config.host}:{config.port}[/red] (the error above): "
            "another process may hold the port, or the address is not this machine's; "
            "stop it, or change server.port / server.host (--port / --host)",
            highlight=False,
        )
        raise
