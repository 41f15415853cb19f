"""Azure OpenAI's paths, for clients built for Azure (`openai.AzureOpenAI`, Azure SDKs).

Such a client asks `/openai/deployments/{deployment}/chat/completions?api-version=...`
(also `completions` and `embeddings`), naming the model in the path, and other
endpoints under `/openai` or `/openai/v1`; its key comes in an `api-key` header
(`metergate.auth.index`). Here the deployment is a metergate model name, and it wins
over a `model` in the body, as on Azure; `api-version` is ignored (each door speaks one
version of its API).
"""

from __future__ import annotations

from typing import Any

from metergate.asgi import MAX_JSON_DEPTH, Request

PREFIXES = ("/openai/v1", "/openai")  # endpoints under these answer as under /v1
_DEPLOYMENTS = "/openai/deployments/"
_ENDPOINTS = ("chat/completions", "completions", "embeddings")


def deployment_route(path: str) -> tuple[str, str] | None:
    """The (deployment, endpoint) of an Azure deployment path, or None."""
    if not path.startswith(_DEPLOYMENTS):
        return None
    deployment, _, endpoint = path[len(_DEPLOYMENTS) :].partition("/")
    if not deployment or endpoint not in _ENDPOINTS:
        return None
    return deployment, endpoint


class DeploymentRequest(Request):
    """A request on a deployment path: its body's model is the deployment (so the
    handlers, and the hot path of every other request, need not know of Azure)."""

    __slots__ = ("deployment",)

    def __init__(self, request: Request, deployment: str) -> None:
        for name in Request.__slots__:
            setattr(self, name, getattr(request, name))
        self.deployment = deployment

    async def json(self, limit: int, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
        body = await super().json(limit, max_depth)
        body["model"] = self.deployment
        return body
