"""`metergate serve`: start the gateway (the embedded default needs no config at all)."""

from __future__ import annotations

import contextlib
import logging
import resource
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from rich.markup import escape
from uvicorn.config import STARTUP_FAILURE

from metergate import logs
from metergate.auth.keys import hash_key
from metergate.cli.common import ConfigOption, bind_or_exit, console, read_or_exit, with_database
from metergate.cli.supervisor import run_workers
from metergate.config import GatewayConfig, LoadedConfig
from metergate.config.secrets import without_password
from metergate.rollout import warn_of_one_workers_judging
from metergate.storage import keys as store
from metergate.storage.database import Database, sqlite_path

log = logging.getLogger("metergate")
MIN_OPEN_FILES = 4096  # a thousand streams in flight and room to spare
_NR_OPEN = 1 << 20  # Linux's default fs.nr_open


def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="override server.host")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="override server.port")] = None,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
) -> None:
    """Start the gateway. Without --config it serves simulated demo models on SQLite."""
    source = read_or_exit(config)
    loaded = source.config
    host = host or loaded.server.host
    port = port if port is not None else loaded.server.port
    logs.configure()
    _raise_open_files_limit()
    if workers > 1:
        warn_of_one_workers_judging(loaded.rollouts, {}, workers)
    demo_key, active_keys = _check_ledger(loaded, make_demo=config is None)
    # The key commands must open this ledger: without -c they would use the default one.
    with_config = escape(f" -c {shlex.quote(source.source)}") if config is not None else ""

    def announce() -> None:  # once the socket is bound: "listening" must be true
        _banner(loaded, host, port, demo_key, active_keys, workers, with_config)

    trusted = loaded.server.trusted_proxies
    options = dict(
        host=host,
        port=port,
        loop="uvloop",
        # httptools with header size and slow-client limits (server.max_header_bytes etc.)
        http="metergate.api.protocol:GuardedHttpToolsProtocol",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=loaded.server.shutdown_grace_seconds,
        timeout_keep_alive=loaded.server.idle_timeout_seconds,
        # X-Forwarded-For rewrites the client address (the admin sign-in limiter's key)
        # only when it comes from a listed proxy; uvicorn's default trusts loopback.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=",".join(trusted) or None,
    )
    if workers == 1:
        run_one(source, options, announce)
    else:
        run_workers(source, workers, options, announce)


def _raise_open_files_limit() -> None:
    """Take the hard limit of open files as the soft one, for this process and the
    workers it starts: each request in flight holds two descriptors (its caller's
    connection and its upstream's), and the usual soft limit of 1,024 (a shell's,
    systemd's) would have a busy gateway drop connections unlogged. Warn when the hard
    limit itself is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, _NR_OPEN)  # the kernel's own ceiling for one process
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft < MIN_OPEN_FILES:
        log.warning(
            "this gateway may open only %d files, and each request in flight holds two "
            "(its caller's connection and its upstream's): raise the limit to at least "
            "%d (systemd LimitNOFILE=, docker --ulimit nofile=, ulimit -n)",
            soft,
            MIN_OPEN_FILES,
        )


def run_one(
    loaded: LoadedConfig, options: dict[str, Any], announce: Callable[[], None] = lambda: None
) -> None:
    """Serve in this process. The socket is bound before the app starts, which records
    its config: a gateway that cannot have its port must not make the fleet follow it."""
    from metergate.api.app import GatewayApp

    config = uvicorn.Config(GatewayApp(loaded.config, loaded.text, loaded.source), **options)
    socket = bind_or_exit(config)
    announce()
    server = uvicorn.Server(config)
    server.run(sockets=[socket])
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def _check_ledger(config: GatewayConfig, make_demo: bool) -> tuple[str | None, int]:
    """Open the ledger before the server starts: it is migrated, and a database that
    cannot be opened is a message and exit 1. Returns what `_startup_keys` found."""
    return with_database(
        config, lambda database: _startup_keys(database, config, make_demo), create=True
    )


async def _startup_keys(
    database: Database, config: GatewayConfig, make_demo: bool
) -> tuple[str | None, int]:
    """The demo key (embedded default only: made on first start, reused while active)
    and how many active keys there are."""
    path = sqlite_path(config.ledger.url)
    data_dir = Path(path).parent if path is not None else Path(".metergate")
    key_file = data_dir / "demo-key"
    active = await store.list_keys(database, include_revoked=False)
    if not make_demo:
        return None, len(active)
    if key_file.exists():
        secret = key_file.read_text().strip()
        if any(record.key_hash == hash_key(secret) for record in active):
            return secret, len(active)
    if active:
        return None, len(active)
    secret, _ = await store.create_key(database, "demo")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(secret + "\n")
    return secret, 1


def _banner(
    config: GatewayConfig,
    host: str,
    port: int,
    key: str | None,
    active_keys: int,
    workers: int,
    with_config: str,
) -> None:
    base = f"http://{host}:{port}/v1"
    model = next(iter(config.models))
    shown = key or "mgk_..."
    console.print(
        f"[bold green]metergate[/bold green] listening on {base} "
        f"({workers} worker{'s' if workers > 1 else ''}); "
        f"models: {', '.join(config.models)}"
    )
    ledger = without_password(config.ledger.url)
    path = sqlite_path(ledger)
    if path is not None and path != ":memory:":
        ledger = f"{ledger} (file {Path(path).resolve()})"  # sqlite:/// is relative
    console.print(f"metrics: http://{host}:{port}/metrics   ledger: {ledger}")
    if key is None and active_keys:
        console.print(
            f"{active_keys} active key(s): see [bold]metergate keys list{with_config}[/bold]",
            highlight=False,
        )
    elif key is None:
        console.print(
            "create a key first: "
            f"[bold]metergate keys create --name my-service{with_config}[/bold]",
            highlight=False,
        )
    else:
        console.print(f"demo key (stored hashed; secret kept in .metergate/demo-key): {key}")
    console.print("\ntry it with curl:", markup=False)
    print(
        f"  curl {base}/chat/completions -H 'Authorization: Bearer {shown}' "
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", '
        f'"content": "Hello"}}]}}\''
    )
    print("\nor with the openai SDK:")
    print(
        f"  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{base}", api_key="{shown}")\n'
        f'  reply = client.chat.completions.create(model="{model}", '
        f'messages=[{{"role": "user", "content": "Hello"}}])\n'
        f"  print(reply.choices[0].message.content)\n",
        flush=True,
    )
