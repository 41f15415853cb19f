"""The cloud provider fakes (Azure OpenAI, Bedrock, Vertex AI) served together, and a
gateway config that reaches each of them the way an operator would configure it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import BackgroundLoop, UpstreamServer
from tests.upstreams import RECORDER, Recorder, azure_server, bedrock_server, vertex_server


@dataclass
class Clouds:
    azure: UpstreamServer
    bedrock: UpstreamServer
    vertex: UpstreamServer
    service_account: Path  # the Vertex fake's service-account key file

    @property
    def azure_state(self) -> azure_server.State:
        return self.azure.app[azure_server.STATE]

    @property
    def bedrock_state(self) -> bedrock_server.State:
        return self.bedrock.app[bedrock_server.STATE]

    @property
    def vertex_state(self) -> vertex_server.State:
        return self.vertex.app[vertex_server.STATE]

    def recorder(self, name: str) -> Recorder:
        return getattr(self, name).app[RECORDER]

    def close(self) -> None:
        for server in (self.azure, self.bedrock, self.vertex):
            server.close()


def serve_clouds(bg: BackgroundLoop, workdir: Path) -> Iterator[Clouds]:
    vertex = UpstreamServer(bg, vertex_server.create_app())
    key_file = workdir / "service-account.json"
    key_file.write_text(
        json.dumps(vertex.app[vertex_server.STATE].service_account(f"{vertex.url}/token"))
    )
    clouds = Clouds(
        UpstreamServer(bg, azure_server.create_app()),
        UpstreamServer(bg, bedrock_server.create_app()),
        vertex,
        key_file,
    )
    yield clouds
    clouds.close()


def providers(clouds: Clouds, **urls: str) -> dict[str, Any]:
    """The four providers; `urls` replaces a provider's base URL (e.g. with a proxy's)."""
    entra = {
        "tenant_id": azure_server.TENANT,
        "client_id": azure_server.CLIENT_ID,
        "client_secret": azure_server.CLIENT_SECRET,
        "authority": clouds.azure.url,
    }
    return {
        "azure": {
            "type": "azure",
            "base_url": urls.get("azure", clouds.azure.url),
            "api_key": azure_server.API_KEY,
            "azure": {
                "deployments": {"gpt-4.1": "prod-gpt41", "text-embedding-3-small": "embedder"}
            },
        },
        "azure-entra": {
            "type": "azure",
            "base_url": urls.get("azure-entra", clouds.azure.url),
            "azure": {"api": "v1", "deployments": {"gpt-4.1": "prod-gpt41"}, **entra},
        },
        "bedrock": {
            "type": "bedrock",
            "base_url": urls.get("bedrock", clouds.bedrock.url),
            "bedrock": {
                "region": bedrock_server.REGION,
                "access_key_id": bedrock_server.ACCESS_KEY,
                "secret_access_key": bedrock_server.SECRET_KEY,
            },
        },
        "vertex": {
            "type": "vertex",
            "base_url": urls.get("vertex", clouds.vertex.url),
            "vertex": {
                "project": vertex_server.PROJECT,
                "location": vertex_server.LOCATION,
                "credentials_file": str(clouds.service_account),
            },
        },
    }


# upstream name -> (provider, model id, price as USD per million: input, cached, output)
UPSTREAMS: dict[str, tuple[str, str, tuple[str, str, str]]] = {
    "azure-up": ("azure", "gpt-4.1", ("2", "0.5", "8")),
    "azure-entra-up": ("azure-entra", "gpt-4.1", ("2", "0.5", "8")),
    "bedrock-up": (
        "bedrock",
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        ("3", "0.3", "15"),
    ),
    "vertex-gemini-up": ("vertex", "gemini-2.5-flash", ("0.3", "0.075", "2.5")),
    "vertex-claude-up": ("vertex", "claude-sonnet-4-5@20250929", ("3", "0.3", "15")),
}


def config(clouds: Clouds, **urls: str) -> dict[str, Any]:
    """Every cloud model (named like its upstream without `-up`), plus embeddings."""
    upstreams: dict[str, Any] = {
        name: {
            "provider": provider,
            "model": model,
            "price": dict(zip(("input", "cached_input", "output"), price, strict=True)),
        }
        for name, (provider, model, price) in UPSTREAMS.items()
    }
    upstreams |= {
        "azure-embed-up": {"provider": "azure", "model": "text-embedding-3-small"},
        "titan-up": {"provider": "bedrock", "model": "amazon.titan-embed-text-v2:0"},
        "cohere-up": {"provider": "bedrock", "model": "cohere.embed-english-v3"},
        "vertex-embed-up": {
            "provider": "vertex",
            "model": "text-embedding-005",
            "price": {"input": 0.025},
        },
    }
    models = {
        name.removesuffix("-up"): {"upstreams": [name], "retry": {"max_retries": 0}}
        for name in upstreams
    }
    return {"providers": providers(clouds, **urls), "upstreams": upstreams, "models": models}
