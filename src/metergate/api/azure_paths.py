"""Azure OpenAI's paths, for clients built for Azure (`openai.AzureOpenAI`, Azure SDKs).

Such a client asks `/openai/deployments/{deployment}/chat/completions?api-version=...`
(also `completions` and `embeddings`), naming the model in the path, and other
endpoints under `/openai` or `/openai/v1`; its key comes in an `api-key` header
(`metergate.auth.index`). Here the deployment is a metergate model name, and it wins
over a `model` in the body, as on Azure; `api-version` is ignored (each door speaks one
version of its API).
"""

from __future__ import annotations

PREFIXES = ("/openai/v1", "/openai")  # endpoints under these answer as under /v1
MODEL_IN_PATH = "metergate.model_in_path"  # the scope entry a deployment path sets
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
