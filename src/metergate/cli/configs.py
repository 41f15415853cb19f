"""`metergate config history|rollback|reload`: the config's versions, and going back."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from metergate.cli.common import (
    ConfigOption,
    console,
    errors,
    load_for_ledger,
    read_or_exit,
    with_database,
)
from metergate.config import ConfigError, parse_config
from metergate.config.loader import DEFAULT_CONFIG
from metergate.storage import config_versions

app = typer.Typer(help="Config versions: history, rollback, reload.", no_args_is_help=True)


@app.command("history")
def history(
    limit: Annotated[int, typer.Option(min=1, help="how many versions")] = 20,
    config: ConfigOption = None,
) -> None:
    """List applied configs, newest first (the newest is what gateways run)."""
    loaded = load_for_ledger(config)
    versions = with_database(loaded, lambda db: config_versions.history(db, limit))
    table = Table("version", "applied", "hash", "note", "source")
    for index, version in enumerate(versions):
        label = f"v{version.id}" + (" (current)" if index == 0 else "")
        table.add_row(label, _when(version.applied_at), version.hash, version.note, version.source)
    console.print(table)


@app.command("rollback")
def rollback(
    version: Annotated[
        str | None,
        typer.Argument(
            help="version id, as `config history` shows it (v8 or 8), or its hash (as "
            "`config reload` and /readyz show it); default: the previous",
            metavar="VERSION",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Return to an earlier config: running gateways apply it within seconds, and the
    config file is rewritten so a restart keeps it."""
    wanted = _version_or_exit(version)
    loaded = read_or_exit(config, ledger_only=True)

    async def go(db):  # type: ignore[no-untyped-def]
        versions = await config_versions.history(db, 1000)
        if len(versions) < 2 and wanted is None:
            return None, "there is no earlier version to return to"
        target = (  # newest first: of a hash applied more than once, the latest
            next((v for v in versions if wanted in (v.id, v.hash)), None)
            if wanted is not None
            else next((v for v in versions[1:] if v.hash != versions[0].hash), None)
        )
        if target is None:
            shown = f"v{wanted}" if isinstance(wanted, int) else wanted
            return None, f"no version {shown}; see `metergate config history`"
        try:  # literal secrets are not in the history: back from the live config
            text = config_versions.with_secrets(target, target.source, loaded.text)
            parse_config(text, target.source)
        except ConfigError as error:
            return None, f"v{target.id} is not valid here any more:\n{error}"
        recorded = await config_versions.record(
            db, text, target.source, f"rollback to v{target.id}"
        )
        return (target, text), recorded

    found, result = with_database(loaded.config, go)
    if found is None:
        errors.print(result)
        raise typer.Exit(1)
    target, text = found
    path = Path(target.source)
    unwritten = False
    if path.is_file() and path.resolve() != DEFAULT_CONFIG.resolve():
        try:
            _replace_file(path.resolve(), text)
            console.print(f"wrote v{target.id} back to {path}")
        except OSError as exc:
            unwritten = True
            errors.print(
                f"gateways run v{target.id} now, but {path} could not be rewritten "
                f"({exc.strerror}; it is as it was); restore it by hand (e.g. the ConfigMap) "
                "so that a restart keeps this version"
            )
    console.print(
        f"config rolled back to v{target.id} (recorded as v{result.id}); "
        "running gateways apply it within a few seconds"
    )
    if unwritten:
        raise typer.Exit(1)


def _replace_file(path: Path, text: str) -> None:
    """Write `text` as `path` whole or not at all: into a new file beside it, synced,
    then renamed over it. Written in place, a full disk cut the file short: a valid
    config of other values, maybe, that a restart would have run."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _version_or_exit(text: str | None) -> int | str | None:
    """A version id (`v8`, `8`) or a config hash (12 hexadecimal characters, as reload
    shows it)."""
    if text is None:
        return None
    if re.fullmatch(r"[0-9a-fA-F]{12}", text):
        return text.lower()
    if re.fullmatch(r"v?[0-9]{1,11}", text):
        return int(text.removeprefix("v"))
    errors.print(
        f"{text!r} is not a version: give its id as `metergate config history` shows it "
        "(v8), or its hash (12 hexadecimal characters)",
        markup=False,
        highlight=False,
    )
    raise typer.Exit(2)


@app.command("reload")
def reload(
    gateway: Annotated[str, typer.Option(help="gateway base URL")] = "http://127.0.0.1:4000",
) -> None:
    """Ask a running gateway to re-read its config file (admin key from
    METERGATE_ADMIN_KEY). An invalid file is refused and the gateway keeps serving."""
    import httpx2  # only this command needs an HTTP client

    key = os.environ.get("METERGATE_ADMIN_KEY")
    if not key:
        errors.print("set METERGATE_ADMIN_KEY to the gateway's admin.api_key")
        raise typer.Exit(2)
    try:
        answer = httpx2.post(
            f"{gateway.rstrip('/')}/admin/reload",
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        )
    except httpx2.HTTPError as exc:
        errors.print(f"cannot reach {gateway}: {exc}")
        raise typer.Exit(1) from None
    try:
        body = answer.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):  # a proxy's error page, another server at this address
        errors.print(
            f"{gateway.rstrip('/')}/admin/reload answered HTTP {answer.status_code}, and not "
            f"with the gateway's JSON: {answer.text[:200]!r}; is --gateway the gateway's "
            "own address?",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(1)
    if answer.status_code != 200:
        errors.print(body.get("error", {}).get("message", answer.text))
        for problem in body.get("error", {}).get("problems", []):
            errors.print("  " + problem, markup=False, highlight=False)
        raise typer.Exit(1)
    state = "applied" if body["applied"] else "unchanged"
    console.print(f"config {state}: version {body['version']}")
    pending = body.get("restart_required") or []
    if pending:
        errors.print(f"[yellow]restart the gateway to apply:[/yellow] {', '.join(pending)}")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
