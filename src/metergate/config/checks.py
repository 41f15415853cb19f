"""Cross-reference checks that pydantic cannot express field by field."""

from __future__ import annotations

from collections.abc import Iterator

from metergate.config.model import EACH, GatewayConfig
from metergate.config.provider_checks import Problem, price_warnings, provider_problems

__all__ = [
    "Problem",
    "config_warnings",
    "cross_reference_problems",
    "price_warnings",
    "targets_nobody_has",
]

_NEEDS_BASE_URL = {"openai"}
_NEEDS_KEY = {"anthropic", "gemini"}


def cross_reference_problems(config: GatewayConfig) -> Iterator[Problem]:
    """Yield (key path, message, hint) for every dangling or inconsistent reference."""
    providers = sorted(config.providers)
    yield from provider_problems(config)
    for name, provider in config.providers.items():
        if provider.type in _NEEDS_BASE_URL and not provider.base_url:
            yield (
                ("providers", name, "base_url"),
                "an openai-compatible provider needs base_url",
                "e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 for vLLM",
            )
        if provider.type in _NEEDS_KEY and provider.api_key is None:
            yield (
                ("providers", name, "api_key"),
                f"a {provider.type} provider needs api_key",
                f"write api_key: ${{{name.upper().replace('-', '_')}_API_KEY}}",
            )
    from metergate.metering.pricing import shipped_price_lists

    lists = shipped_price_lists()
    for name, provider in config.providers.items():
        if provider.price_list not in lists:
            yield (
                ("providers", name, "price_list"),
                f"unknown price list {provider.price_list!r}",
                f"shipped lists: {', '.join(lists)}; or give each upstream a price",
            )
    for name, deployment in config.upstreams.items():
        if deployment.provider not in config.providers:
            yield (
                ("upstreams", name, "provider"),
                f"unknown provider {deployment.provider!r}",
                f"declared providers: {', '.join(providers) or 'none'}",
            )
    upstreams = sorted(config.upstreams)
    for name, model in config.models.items():
        for index, upstream in enumerate(model.upstreams):
            if upstream not in config.upstreams:
                yield (
                    ("models", name, "upstreams", index),
                    f"unknown upstream {upstream!r}",
                    f"declared upstreams: {', '.join(upstreams) or 'none'}",
                )
    for name, budget in config.budgets.items():
        if name.startswith("team:"):
            yield (
                ("budgets", name),
                "budget names starting with team: are the teams' own budgets",
                "pick another name; a team's budgets are set with `metergate teams`",
            )
        if budget.scope != "global" and not budget.target:
            yield (
                ("budgets", name, "target"),
                f"a {budget.scope} budget needs a target",
                f'name the {budget.scope} it limits, or "*" for each {budget.scope} apart',
            )
        if budget.scope == "global" and budget.target:
            yield (
                ("budgets", name, "target"),
                "a global budget counts everything: it takes no target",
                'remove target, or set scope: key, team or model (target "*" for each apart)',
            )
        if (
            budget.scope == "model"
            and budget.target
            and budget.target != EACH
            and budget.target not in config.models
        ):
            yield (
                ("budgets", name, "target"),
                f"unknown model {budget.target!r}",
                f"declared models: {', '.join(sorted(config.models))}",
            )
    for name, model in config.models.items():
        for index, fallback in enumerate(model.fallbacks):
            if fallback == name:
                message = "a model cannot fall back to itself"
            elif fallback not in config.models:
                message = f"unknown model {fallback!r}"
            else:
                continue
            yield (
                ("models", name, "fallbacks", index),
                message,
                "fallbacks name other models declared under models:",
            )
    for name, rollout in config.rollouts.items():
        if rollout.model not in config.models:
            yield (
                ("rollouts", name, "model"),
                f"unknown model {rollout.model!r}",
                f"declared models: {', '.join(sorted(config.models))}",
            )
        for side in ("baseline", "candidate"):
            for index, upstream in enumerate(getattr(rollout, side)):
                if upstream not in config.upstreams:
                    yield (
                        ("rollouts", name, side, index),
                        f"unknown upstream {upstream!r}",
                        f"declared upstreams: {', '.join(upstreams) or 'none'}",
                    )
        if rollout.source == "prometheus" and not rollout.prometheus_url:
            yield (
                ("rollouts", name, "prometheus_url"),
                "source prometheus needs a URL",
                "e.g. http://127.0.0.1:9090",
            )
    for name in config.rate_limits.models:
        if name != "*" and name not in config.models:
            yield (
                ("rate_limits", "models", name),
                f"unknown model {name!r}",
                f"declared models: {', '.join(sorted(config.models))}; or * for each model",
            )
    models_in_rollouts = [r.model for r in config.rollouts.values()]
    for name, rollout in config.rollouts.items():
        if models_in_rollouts.count(rollout.model) > 1:
            yield (
                ("rollouts", name, "model"),
                "two rollouts move the same model",
                "run one rollout per model at a time",
            )
    if config.tracing.enabled:
        yield from _tracing_packages(config)
    if not config.models:
        yield (("models",), "no models are declared", "declare at least one model")


def _tracing_packages(config: GatewayConfig) -> Iterator[Problem]:
    """Tracing needs the OpenTelemetry SDK and exporter, an optional extra."""
    import importlib.util

    grpc = config.tracing.protocol == "grpc"
    exporter = "opentelemetry.exporter.otlp.proto." + ("grpc" if grpc else "http")
    for module in ("opentelemetry.sdk", exporter):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            yield (
                ("tracing", "enabled"),
                f"tracing needs {module}, which is not installed",
                f"pip install 'metergate[{'tracing-grpc' if grpc else 'tracing'}]'",
            )
            return


def config_warnings(config: GatewayConfig) -> Iterator[Problem]:
    """What is valid yet likely wrong: an upstream metered at $0, a provider key that
    came out empty (an environment variable set to nothing), an MCP server whose command
    this machine cannot find, an environment proxy it cannot use. They do not fail a
    check: the gateway may run elsewhere."""
    import shutil
    from pathlib import Path

    yield from price_warnings(config)
    if any(p.type != "simulated" and p.proxy is None for p in config.providers.values()):
        yield from _environment_proxy_warnings()
    for name, provider in config.providers.items():
        if provider.api_key is not None and not provider.api_key.get_secret_value().strip():
            yield (
                ("providers", name, "api_key"),
                "api_key is empty: the provider will refuse every request",
                "set the environment variable it names, or remove api_key",
            )
    yield from _rollout_warnings(config)
    servers = config.mcp.servers if config.mcp is not None else {}
    for name, server in servers.items():
        command = server.command
        if command is None:
            continue
        where = Path(server.cwd or ".") / command
        if shutil.which(command) is None and not (("/" in command) and where.is_file()):
            yield (
                ("mcp", "servers", name, "command"),
                f"command {command!r} is not found on this machine's PATH",
                "install it, or give its full path; it is started on every gateway worker",
            )


def targets_nobody_has(config: GatewayConfig, keys: set[str], teams: set[str]) -> Iterator[Problem]:
    """Budgets and rate limits for a key or team no key or team in the ledger is named:
    a typo limits nobody. Keys and teams live in the database, so only a process that
    reads it can say (`serve`, a reload); a warning, as one may be made later."""
    for name, budget in config.budgets.items():
        if budget.scope in ("key", "team") and budget.target and budget.target != EACH:
            known = keys if budget.scope == "key" else teams
            if budget.target not in known:
                yield (
                    ("budgets", name, "target"),
                    f"no {budget.scope} is named {budget.target!r}: the budget limits nobody",
                    f"check the name (`metergate {budget.scope}s list`)",
                )
    for scope, limits, known in (
        ("key", config.rate_limits.keys, keys),
        ("team", config.rate_limits.teams, teams),
    ):
        for target in limits:
            if target != "*" and target not in known:
                yield (
                    ("rate_limits", f"{scope}s", target),
                    f"no {scope} is named {target!r}: the rate limit applies to nobody",
                    f"check the name (`metergate {scope}s list`)",
                )


def _rollout_warnings(config: GatewayConfig) -> Iterator[Problem]:
    """Until `rollout start` a model is served by its own upstreams, then by the rollout's
    baseline and candidate: a baseline that is not those upstreams moves the model's
    traffic, ungated, the moment the rollout starts (and a candidate among them takes
    traffic before it). A warning, not an error: a completed rollout about to be removed
    beside upstreams already set to its candidate looks the same."""
    for name, rollout in config.rollouts.items():
        model = config.models.get(rollout.model)
        if model is None or set(rollout.baseline) == set(model.upstreams):
            continue
        yield (
            ("rollouts", name, "baseline"),
            f"model {rollout.model!r} is served by {', '.join(model.upstreams)} until the "
            f"rollout starts, then by its baseline {', '.join(rollout.baseline)}: starting "
            "it moves the model's traffic ungated",
            "the baseline is the model's upstreams; once the rollout completes, set the "
            "upstreams to the candidate and remove the rollout",
        )


def _environment_proxy_warnings() -> Iterator[Problem]:
    """An HTTP(S)_PROXY in this environment the gateway cannot use fails its start (every
    provider without `proxy:` takes it): say so before, with the password masked."""
    import urllib.request

    from metergate.providers.proxy import parse_proxy

    for scheme, url in sorted(urllib.request.getproxies_environment().items()):
        if scheme not in ("http", "https"):
            continue
        try:
            parse_proxy(url)
        except ValueError as error:
            yield (
                ("providers",),
                f"the environment's {scheme.upper()}_PROXY cannot be used here: {error}",
                "point it at an http:// proxy, unset it, or give the providers `proxy: direct` "
                "(or their own proxy)",
            )
