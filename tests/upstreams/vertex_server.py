"""A fake Google Vertex AI, with the OAuth 2.0 token endpoint its credentials talk to.

`POST /token` is Google's token endpoint for service accounts (RFC 7523 JWT bearer
grant): the `assertion` must be an RS256 JWT signed by the service account's private
key (checked against its public key), issued by its `client_email`, for this endpoint,
with the cloud-platform scope and a valid time window. It answers an access token that
lives `state.lifetime` seconds.

`POST /v1/projects/{project}/locations/{location}/publishers/{publisher}/models/{model}:
{method}` needs `authorization: Bearer <a token this endpoint issued and that has not
expired>` (else 401 UNAUTHENTICATED, Google's error shape) and the configured project
and location (else 404). Then:

* publisher `google`: `generateContent`, `streamGenerateContent?alt=sse` behave as the
  Gemini fake (`gemini_server`: same validation, triggers and answers), `predict` is
  the text-embedding API with real token counts;
* publisher `anthropic`: `rawPredict` and `streamRawPredict` take a Messages API body
  that has `anthropic_version: vertex-2023-10-16` and no `model` (the model is in the
  URL), then behave as the Anthropic fake (`anthropic_server`).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.upstreams import RECORDER, Recorder, anthropic_server, gemini_server, trigger

PROJECT = "metergate-test"
LOCATION = "us-east5"
CLIENT_EMAIL = "gateway@metergate-test.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
AUDIENCE = "https://oauth2.googleapis.com/token"  # what service-account assertions name
VERTEX_ANTHROPIC = "vertex-2023-10-16"


@dataclass
class State:
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    lifetime: float = 3600
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (time.time)
    grants: int = 0
    bearers: list[str] = field(default_factory=list)  # as presented to the API, in order

    def service_account(self, token_uri: str) -> dict[str, str]:
        """A service-account key file's content for this state's key."""
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "fakekeyid0123",
            "private_key": pem,
            "client_email": CLIENT_EMAIL,
            "client_id": "1234567890",
            "token_uri": token_uri,
        }


STATE = web.AppKey("state", State)


def create_app(state: State | None = None) -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()
    app[STATE] = state = state or State()

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        problem = _check_assertion(state, str(form.get("assertion") or ""))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            problem = "unsupported_grant_type"
        if problem:
            return web.json_response(
                {"error": "invalid_grant", "error_description": problem}, status=400
            )
        state.grants += 1
        issued = "ya29.fake-" + secrets.token_urlsafe(16)
        state.tokens[issued] = time.time() + state.lifetime
        return web.json_response(
            {"access_token": issued, "expires_in": state.lifetime, "token_type": "Bearer"}
        )

    async def model(request: web.Request) -> web.StreamResponse:
        body = await app[RECORDER].record(request)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        state.bearers.append(bearer)
        if state.tokens.get(bearer, 0) <= time.time():
            return gemini_server._error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
            )
        info = request.match_info
        if (info["project"], info["location"]) != (PROJECT, LOCATION):
            return gemini_server._error(404, "NOT_FOUND", "Project or location not found.")
        name, _, method = info["target"].partition(":")
        if not isinstance(body, dict):
            return gemini_server._error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        serial = len(app[RECORDER].requests)
        if info["publisher"] == "anthropic":
            return await _claude(request, body, name, method, serial)
        if method == "predict":
            return _predict(body)
        return await _gemini(request, body, name, method, serial)

    app.router.add_post("/token", token)
    app.router.add_post(
        "/v1/projects/{project}/locations/{location}/publishers/{publisher}/models/{target}",
        model,
    )
    return app


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _check_assertion(state: State, assertion: str) -> str | None:
    """What is wrong with a JWT bearer assertion, None when Google would accept it."""
    try:
        header, payload, signature = assertion.split(".")
        state.key.public_key().verify(
            _b64(signature),
            f"{header}.{payload}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
        claims = json.loads(_b64(payload))
    except Exception as exc:
        return f"Invalid JWT Signature: {type(exc).__name__}"
    now = time.time()
    if claims.get("iss") != CLIENT_EMAIL:
        return "Invalid JWT: unknown issuer"
    if claims.get("aud") != AUDIENCE:
        return f"Invalid JWT: aud must be {AUDIENCE}"
    if SCOPE not in str(claims.get("scope", "")).split():
        return "Invalid JWT: the cloud-platform scope is missing"
    if not claims.get("iat", now + 1) <= now + 60 < claims.get("exp", 0) + 60:
        return "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe"
    return None


async def _gemini(
    request: web.Request, body: dict[str, Any], name: str, method: str, serial: int
) -> web.StreamResponse:
    if method not in ("generateContent", "streamGenerateContent"):
        return gemini_server._error(404, "NOT_FOUND", f"Method {method} not found.")
    problem = gemini_server._validate(body)
    if problem:
        return gemini_server._error(400, "INVALID_ARGUMENT", problem)
    word = trigger(gemini_server._last_user_text(body["contents"]))
    if word in gemini_server._ERRORS:
        status, code, message = gemini_server._ERRORS[word]
        details = [gemini_server._RETRY_INFO] if status == 429 else []
        return gemini_server._error(status, code, message, details)
    answer = gemini_server._answer(body, name, word, serial)
    if method == "generateContent":
        return web.json_response(answer)
    if request.query.get("alt") != "sse":
        return gemini_server._error(400, "INVALID_ARGUMENT", "this fake only streams with alt=sse")
    return await gemini_server._stream(request, answer, word)


async def _claude(
    request: web.Request, body: dict[str, Any], name: str, method: str, serial: int
) -> web.StreamResponse:
    if method not in ("rawPredict", "streamRawPredict"):
        return gemini_server._error(404, "NOT_FOUND", f"Method {method} not found.")
    if body.get("anthropic_version") != VERTEX_ANTHROPIC:
        return anthropic_server._error(
            400, "invalid_request_error", f"anthropic_version: must be {VERTEX_ANTHROPIC}"
        )
    if "model" in body:
        return anthropic_server._error(
            400, "invalid_request_error", "model: Extra inputs are not permitted"
        )
    messages = {k: v for k, v in body.items() if k != "anthropic_version"}
    messages["model"] = name
    problem = anthropic_server._validate(messages)
    if problem:
        return anthropic_server._error(400, "invalid_request_error", problem)
    word = trigger(anthropic_server._last_user_text(messages["messages"]))
    if word in anthropic_server._ERRORS:
        status, kind, message = anthropic_server._ERRORS[word]
        headers = {"retry-after": "7"} if status == 429 else {}
        return anthropic_server._error(status, kind, message, headers)
    answer = anthropic_server._answer(messages, serial)
    if method == "rawPredict":
        return web.json_response(answer)
    return await anthropic_server._stream(request, answer, word)


def _predict(body: dict[str, Any]) -> web.Response:
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        return gemini_server._error(400, "INVALID_ARGUMENT", "instances: must not be empty")
    size = (body.get("parameters") or {}).get("outputDimensionality") or 8
    predictions = []
    for instance in instances:
        text = instance.get("content")
        if not isinstance(text, str):
            return gemini_server._error(400, "INVALID_ARGUMENT", "instances[].content: required")
        embedded = gemini_server._embed(
            "m",
            {
                "requests": [
                    {
                        "model": "models/m",
                        "content": {"parts": [{"text": text}]},
                        "outputDimensionality": size,
                    }
                ]
            },
        )
        values = json.loads(embedded.text)["embeddings"][0]["values"]
        statistics = {"truncated": False, "token_count": len(text.split())}
        predictions.append({"embeddings": {"values": values, "statistics": statistics}})
    return web.json_response(
        {"predictions": predictions, "metadata": {"billableCharacterCount": 0}}
    )
