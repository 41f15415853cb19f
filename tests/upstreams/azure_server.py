"""A fake Azure OpenAI resource, with the Microsoft Entra token endpoint of its tenant.

Endpoints of the resource:

* `POST /openai/deployments/{deployment}/chat/completions?api-version=...` and
  `.../embeddings` (a missing `api-version` is a 400, an unknown deployment a 404
  `DeploymentNotFound`);
* the v1 surface, `POST /openai/v1/chat/completions` and `/openai/v1/embeddings`, where
  `model` names the deployment.

Authentication as Azure checks it: the `api-key` header must be the resource's key, or
`authorization: Bearer` must carry a token the Entra endpoint issued (for the Cognitive
Services scope) that has not expired; otherwise 401 in Azure's error shape.

`POST /{tenant}/oauth2/v2.0/token` is Entra's client-credentials flow: a form with
`grant_type=client_credentials`, the app's `client_id` and `client_secret` and a
`.default` scope, answered with a bearer token that lives `state.lifetime` seconds;
wrong credentials are a 401 `invalid_client` (AADSTS7000215), an unknown tenant 400.

Answers are the compatible fake's `openai` flavor with Azure's content filter
annotations (`tests.upstreams.compatible_server`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from tests.upstreams import RECORDER, Recorder, compatible_server

API_KEY = "azure0123456789abcdef0123456789ab"
TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "66666666-7777-8888-9999-000000000000"
CLIENT_SECRET = "fake~entra~secret~0123456789"
SCOPE = "https://cognitiveservices.azure.com/.default"


@dataclass
class State:
    deployments: dict[str, str] = field(
        default_factory=lambda: {"prod-gpt41": "gpt-4.1", "embedder": "text-embedding-3-small"}
    )
    lifetime: float = 3599
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (time.time)
    grants: int = 0
    bearers: list[str] = field(default_factory=list)


STATE = web.AppKey("state", State)


def create_app(state: State | None = None) -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()
    app[STATE] = state = state or State()

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if request.match_info["tenant"] != TENANT:
            return _aad(400, "invalid_request", "AADSTS90002: Tenant not found.")
        if form.get("grant_type") != "client_credentials" or form.get("scope") != SCOPE:
            return _aad(400, "invalid_request", "AADSTS900144: grant_type or scope is wrong.")
        if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
            return _aad(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
        state.grants += 1
        issued = "eyJ0eXAiOiJKV1Qi.fake." + secrets.token_urlsafe(16)
        state.tokens[issued] = time.time() + state.lifetime
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": int(state.lifetime),
                "ext_expires_in": int(state.lifetime),
                "access_token": issued,
            }
        )

    async def operation(request: web.Request) -> web.StreamResponse:
        body = await app[RECORDER].record(request)
        denied = _authenticate(request, state)
        if denied is not None:
            return denied
        deployment = request.match_info.get("deployment")
        if deployment is None:  # the v1 surface names it in the body
            deployment = body.get("model") if isinstance(body, dict) else None
        elif "api-version" not in request.query:
            return _azure(400, "BadRequest", "Missing required query parameter 'api-version'.")
        if deployment not in state.deployments:
            return _azure(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist.",
            )
        if request.match_info["operation"] == "embeddings":
            return compatible_server.embeddings(body)
        serial = len(app[RECORDER].requests)
        return await compatible_server.answer(request, body, "openai", serial, azure=True)

    app.router.add_post("/{tenant}/oauth2/v2.0/token", token)
    operations = "{operation:chat/completions|embeddings}"
    app.router.add_post(f"/openai/deployments/{{deployment}}/{operations}", operation)
    app.router.add_post(f"/openai/v1/{operations}", operation)
    return app


def _authenticate(request: web.Request, state: State) -> web.Response | None:
    if "api-key" in request.headers:
        if request.headers["api-key"] == API_KEY:
            return None
        return _azure(
            401,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint.",
        )
    bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
    state.bearers.append(bearer)
    if state.tokens.get(bearer, 0) > time.time():
        return None
    return _azure(
        401,
        "401",
        "Unauthorized. Access token is missing, invalid, audience is incorrect "
        "(https://cognitiveservices.azure.com), or have expired.",
    )


def _azure(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _aad(status: int, error: str, description: str) -> web.Response:
    body = {"error": error, "error_description": description, "error_codes": [7000215]}
    return web.json_response(body, status=status)
