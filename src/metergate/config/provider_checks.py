"""Checks of provider settings: presets, Azure, Bedrock and Vertex, extras, and prices.

Each provider type needs its own settings and exactly one way to authenticate; these
checks name the missing or conflicting key (a missing region, deployment or project, a
key together with other credentials) so `metergate check` says what to fix before a
request fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from metergate.config.model import GatewayConfig, ProviderConfig
from metergate.config.presets import PRESETS

Problem = tuple[tuple[str | int, ...], str, str]

_SETTINGS = ("azure", "bedrock", "vertex")


def provider_problems(config: GatewayConfig) -> Iterator[Problem]:
    for name, provider in config.providers.items():
        where = ("providers", name)
        for section in _SETTINGS:
            if getattr(provider, section) is not None and provider.type != section:
                yield (
                    (*where, section),
                    f"{section} settings apply to type {section}, not {provider.type}",
                    f"remove them, or set type: {section}",
                )
        if provider.preset is not None:
            yield from _preset(where, provider)
        if provider.type == "azure":
            yield from _azure(where, provider)
        elif provider.type == "bedrock":
            yield from _bedrock(where, provider)
        elif provider.type == "vertex":
            yield from _vertex(where, provider)
        from metergate.providers import missing_extra

        command = missing_extra(provider.type)
        if command is not None:
            yield (
                (*where, "type"),
                f"provider type {provider.type} needs optional dependencies not installed",
                f"install them: {command}",
            )
    for name, upstream in config.upstreams.items():
        host = config.providers.get(upstream.provider)
        if host is None or host.type != "azure" or host.azure is None:
            continue
        if upstream.model not in host.azure.deployments:
            yield (
                ("upstreams", name, "model"),
                f"no Azure deployment for model {upstream.model!r}",
                f"map it to its deployment's name under providers.{upstream.provider}"
                f".azure.deployments, e.g. {{{upstream.model}: my-deployment}}",
            )


def _preset(where: tuple[str, ...], provider: ProviderConfig) -> Iterator[Problem]:
    preset = PRESETS[provider.preset or ""]
    if provider.type != "openai":
        yield (
            (*where, "preset"),
            f"presets are for type openai, not {provider.type}",
            "set type: openai, or remove preset",
        )
    elif preset.needs_key and provider.api_key is None:
        yield (
            (*where, "api_key"),
            f"the {provider.preset} preset needs api_key",
            f"write api_key: ${{{preset.key_env}}}",
        )


def _azure(where: tuple[str, ...], provider: ProviderConfig) -> Iterator[Problem]:
    if not provider.base_url:
        yield (
            (*where, "base_url"),
            "an azure provider needs base_url, the resource endpoint",
            "e.g. https://my-resource.openai.azure.com",
        )
    settings = provider.azure
    if settings is None:
        yield (
            (*where, "azure"),
            "an azure provider needs azure settings (at least its deployments)",
            "azure: {deployments: {gpt-4.1: my-gpt41-deployment}}",
        )
        return
    entra = {
        "tenant_id": settings.tenant_id,
        "client_id": settings.client_id,
        "client_secret": settings.client_secret,
    }
    given = [key for key, value in entra.items() if value]
    if provider.api_key is not None and given:
        yield (
            (*where, "api_key"),
            "both api_key and Entra credentials are set: use one way to authenticate",
            "keep api_key (the api-key header) or tenant_id/client_id/client_secret",
        )
    elif given and len(given) < len(entra):
        missing = ", ".join(key for key in entra if key not in given)
        yield (
            (*where, "azure"),
            f"Entra client credentials are incomplete: {missing} missing",
            "the client-credentials flow needs tenant_id, client_id and client_secret",
        )
    elif provider.api_key is None and not given:
        yield (
            (*where, "api_key"),
            "an azure provider needs api_key or Entra credentials",
            "api_key: ${AZURE_OPENAI_API_KEY}, or azure: {tenant_id, client_id, client_secret}",
        )


def _bedrock(where: tuple[str, ...], provider: ProviderConfig) -> Iterator[Problem]:
    settings = provider.bedrock
    if settings is None or not settings.region:
        yield (
            (*where, "bedrock", "region"),
            "a bedrock provider needs a region",
            "bedrock: {region: us-east-1} (or ${AWS_REGION})",
        )
    if settings is None:
        return
    keys = settings.access_key_id, settings.secret_access_key
    if provider.api_key is not None and (settings.profile or any(keys)):
        yield (
            (*where, "api_key"),
            "api_key (a Bedrock API key) and AWS credentials are both set: use one",
            "remove api_key to sign with AWS credentials, or the profile/keys to use it",
        )
    if settings.profile and any(keys):
        yield (
            (*where, "bedrock", "profile"),
            "both a profile and explicit access keys are set: use one",
            "remove profile or access_key_id/secret_access_key",
        )
    if any(keys) and not all(keys):
        yield (
            (*where, "bedrock"),
            "access_key_id and secret_access_key go together",
            "set both, or neither to use the standard AWS credential chain",
        )
    if settings.session_token is not None and not all(keys):
        yield (
            (*where, "bedrock", "session_token"),
            "session_token needs access_key_id and secret_access_key",
            "set all three, or neither",
        )


def _vertex(where: tuple[str, ...], provider: ProviderConfig) -> Iterator[Problem]:
    settings = provider.vertex
    for key, hint in (
        ("project", "vertex: {project: my-gcp-project}"),
        ("location", "vertex: {location: us-east5} (or global)"),
    ):
        if settings is None or not getattr(settings, key):
            yield ((*where, "vertex", key), f"a vertex provider needs a {key}", hint)
    if provider.api_key is not None:
        yield (
            (*where, "api_key"),
            "a vertex provider authenticates with Google credentials, not api_key",
            "remove api_key; set vertex.credentials_file or use Application Default Credentials",
        )
    path = settings.credentials_file if settings is not None else None
    if path and not Path(path).is_file():
        yield (
            (*where, "vertex", "credentials_file"),
            f"no such file: {path}",
            "a service-account or external-account JSON key file",
        )


def price_warnings(config: GatewayConfig) -> Iterator[Problem]:
    """Upstreams that would be metered at $0 because no price was found for them."""
    from metergate.metering.pricing import price_for

    for name, upstream in config.upstreams.items():
        provider = config.providers.get(upstream.provider)
        if provider is None or provider.type == "simulated":
            continue
        if price_for(upstream.model, upstream.price, provider.price_list) is None:
            metered = (
                "each answer states its cost, which is what it is metered at, but budget "
                "holds and the estimates of cut streams will be $0"
                if provider.preset == "perplexity" and provider.chat_via_responses
                else "its requests will be metered at $0"
            )
            yield (
                ("upstreams", name, "model"),
                f"no price for model {upstream.model!r} in price list "
                f"{provider.price_list!r}: {metered}",
                "give the upstream a price: {input: ..., cached_input: ..., output: ...} "
                "(USD per million tokens)",
            )
