"""The `metergate` command line: serve, check, keys, teams, usage, rollout, config."""

from __future__ import annotations

import typer

from metergate.cli import check, configs, doctor, keys, rollouts, serve, teams, usage

app = typer.Typer(
    name="metergate",
    help="Self-hosted OpenAI-compatible gateway that routes, meters and guards LLM traffic.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("serve")(serve.serve)
app.command("check")(check.check)
app.command("doctor")(doctor.doctor)
app.add_typer(keys.app, name="keys")
app.add_typer(teams.app, name="teams")
app.command("usage")(usage.usage)
app.add_typer(rollouts.app, name="rollout")
app.add_typer(configs.app, name="config")


def main() -> None:
    app()
