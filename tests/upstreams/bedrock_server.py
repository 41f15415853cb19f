"""A fake Bedrock runtime: Converse, ConverseStream and InvokeModel, in the real wire format.

Endpoints: `POST /model/{modelId}/converse`, `/converse-stream` (answered with
`application/vnd.amazon.eventstream` frames, `tests.upstreams.eventstream`) and
`/invoke` (Titan and Cohere embeddings). Errors are AWS JSON errors `{"message": ...}`
named by the `x-amzn-ErrorType` header.

Authentication is verified the way AWS does: a SigV4 `Authorization` header is parsed
(credential scope, signed headers), the signature is recomputed with botocore's signer
from the same credentials over the request as received (method, path, query, the signed
headers, the body), and any mismatch is a 403 `InvalidSignatureException`; an unknown
access key or session token is `UnrecognizedClientException`, a stale `x-amz-date` a
403 as well. A Bedrock API key is accepted as `authorization: Bearer ...`.

Converse requests are validated like the service: unknown fields, an empty or
non-alternating conversation, blank text, tool results that do not answer the previous
turn's tool uses, tool blocks without a `toolConfig`, malformed images, an invalid
model id -> 400 `ValidationException`.

Behaviour by `TRIGGER:<word>` in the last user turn's text (see `tests.upstreams`):
`overloaded` -> 503 ServiceUnavailableException; `rate_limit` -> 429
ThrottlingException; `invalid` -> 400 ValidationException; `model_error` -> 424
ModelErrorException; `stream_error` (a few events, then a `modelStreamErrorException`
frame), `stream_cut`, `stream_abort`; `stream_error_at_once` and
`stream_corrupt_at_once` send a few events and then an exception frame, or a frame whose
checksum is wrong, all in one write; `stream_throttled_after_start` sends
`messageStart`, then a `throttlingException` frame. `state.throttle` answers that many
next requests with ThrottlingException. `TRIGGER:cached` in the system prompt reports
1024 cache-read and 256 cache-write tokens. With tools (and the last turn not answering
tool uses) the answer is "Let me check." plus tool uses of the forced (else first) tool
with `{"location": "Paris"}` and `{"location": "Tokyo"}`; otherwise `ANSWER` cut by
`stopSequences` or after `maxTokens` words. `TRIGGER:nousage` leaves the usage out of
the answer (streamed: the metadata event carries none), as a gateway in front of Bedrock
might. `TRIGGER:echo_credentials` answers a 400 whose message quotes the request's
signing headers and the secret key they were signed with, as a proxy or a debugging
endpoint might; `TRIGGER:stream_echo_credentials` sends the same text in an exception
frame after a few events.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.upstreams import RECORDER, Recorder, answer_within, send_stream, trigger
from tests.upstreams.eventstream import event, exception

REGION = "us-east-1"
ACCESS_KEY = "AKIAFAKEBEDROCKTEST01"
SECRET_KEY = "fake/secret+key/for/bedrock/tests/0123456789"
API_KEY = "bedrock-api-key-ABSKfaketest0123456789"
_FIELDS = frozenset(
    {
        "messages",
        "system",
        "inferenceConfig",
        "toolConfig",
        "guardrailConfig",
        "additionalModelRequestFields",
        "additionalModelResponseFieldPaths",
        "promptVariables",
        "requestMetadata",
        "performanceConfig",
    }
)
_CONFIG_FIELDS = frozenset({"maxTokens", "temperature", "topP", "stopSequences"})
_BLOCKS = frozenset({"text", "image", "toolUse", "toolResult", "document", "cachePoint"})
_MODEL_ID = re.compile(r"^((us|eu|apac|global)\.)?[a-z0-9-]+\.[A-Za-z0-9.:-]+$|^arn:aws:bedrock:")
_ERRORS = {
    "overloaded": (503, "ServiceUnavailableException", "The service is unavailable."),
    "rate_limit": (429, "ThrottlingException", "Too many requests, please wait."),
    "invalid": (400, "ValidationException", "The trigger asked for a 400."),
    "model_error": (424, "ModelErrorException", "The model failed to process the request."),
}


@dataclass
class State:
    credentials: dict[str, tuple[str, str | None]] = field(
        default_factory=lambda: {ACCESS_KEY: (SECRET_KEY, None)}
    )
    api_key: str = API_KEY
    throttle: int = 0  # answer this many next requests with ThrottlingException
    signatures_checked: int = 0


STATE = web.AppKey("state", State)


def create_app(state: State | None = None) -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()
    app[STATE] = state or State()

    async def model(request: web.Request) -> web.StreamResponse:
        body = await app[RECORDER].record(request)
        raw = await request.read()
        denied = _authenticate(request, raw, app[STATE])
        if denied is not None:
            return denied
        model_id, operation = request.match_info["model"], request.match_info["operation"]
        if not _MODEL_ID.match(model_id):
            return _error(400, "ValidationException", "The provided model identifier is invalid.")
        if app[STATE].throttle > 0:
            app[STATE].throttle -= 1
            return _error(429, "ThrottlingException", "Too many requests, please wait.")
        if not isinstance(body, dict):
            return _error(400, "SerializationException", "the body is not valid JSON")
        if operation == "invoke":
            return _invoke(model_id, body)
        problem = _validate(body)
        if problem:
            return _error(400, "ValidationException", problem)
        word = trigger(_last_user_text(body["messages"]))
        if word in _ERRORS:
            return _error(*_ERRORS[word])
        if word == "echo_credentials":
            return _error(400, "ValidationException", _echoed(request, app[STATE]))
        answer = _answer(body, len(app[RECORDER].requests))
        if word == "nousage":
            answer["usage"] = None
        if operation == "converse":
            return web.json_response(answer)
        if word == "stream_echo_credentials":
            frames = _frames(answer)[:5]
            frames.append(exception("internalServerException", _echoed(request, app[STATE])))
            return await send_stream(request, "application/vnd.amazon.eventstream", frames)
        return await _stream(request, answer, word)

    app.router.add_post(r"/model/{model}/{operation:converse|converse-stream|invoke}", model)
    return app


def _echoed(request: web.Request, state: State) -> str:
    """A message that quotes the request's credentials, and the secret they sign with."""
    authorization = request.headers.get("authorization", "")
    access_key = authorization.partition("Credential=")[2].partition("/")[0]
    secret = state.credentials.get(access_key, ("", None))[0]
    return (
        f"request rejected: authorization {authorization!r}, security token "
        f"{request.headers.get('x-amz-security-token')!r}, signed with {secret!r}"
    )


def _error(status: int, kind: str, message: str) -> web.Response:
    headers = {"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    return web.json_response({"message": message}, status=status, headers=headers)


def _authenticate(request: web.Request, body: bytes, state: State) -> web.Response | None:
    header = request.headers.get("authorization", "")
    if header.startswith("Bearer "):
        if header[7:] == state.api_key:
            return None
        return _error(403, "UnrecognizedClientException", "Invalid API Key format.")
    found = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
        header,
    )
    if found is None:
        return _error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    key, day, region, service, signed, signature = found.groups()
    if key not in state.credentials:
        return _error(403, "UnrecognizedClientException", "The security token is invalid.")
    secret, token = state.credentials[key]
    if request.headers.get("x-amz-security-token") != token:
        return _error(403, "UnrecognizedClientException", "The security token is invalid.")
    stamp = request.headers.get("x-amz-date", "")
    try:
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return _error(403, "IncompleteSignatureException", "x-amz-date is missing or malformed")
    skew = abs((datetime.datetime.now(datetime.UTC) - when).total_seconds())
    if skew > 300 or day != stamp[:8] or (region, service) != (REGION, "bedrock"):
        return _error(403, "InvalidSignatureException", "Signature expired or wrong scope")
    names = signed.split(";")
    if "host" not in names or "x-amz-date" not in names:
        return _error(403, "InvalidSignatureException", "host and x-amz-date must be signed")
    received = AWSRequest(
        method=request.method,
        url=f"http://{request.host}{request.raw_path}",
        data=body,
        headers={name: request.headers.get(name, "") for name in names},
    )
    received.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(key, secret, token), "bedrock", REGION)
    expected = signer.signature(
        signer.string_to_sign(received, signer.canonical_request(received)), received
    )
    state.signatures_checked += 1
    if not hmac.compare_digest(expected, signature):
        return _error(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided.",
        )
    return None


def _validate(body: dict[str, Any]) -> str | None:
    extra = sorted(set(body) - _FIELDS)
    if extra:
        return f"Malformed input request: extraneous key [{extra[0]}] is not permitted"
    config = body.get("inferenceConfig") or {}
    extra = sorted(set(config) - _CONFIG_FIELDS)
    if extra:
        return f"inferenceConfig: extraneous key [{extra[0]}] is not permitted"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "A conversation must start with a user message."
    tools = body.get("toolConfig")
    if tools is not None and not tools.get("tools"):
        return "The toolConfig field must have at least one tool."
    pending: list[str] = []
    for number, message in enumerate(messages):
        role = message.get("role")
        expected = "user" if number % 2 == 0 else "assistant"
        if role != expected:
            return (
                "A conversation must alternate between user and assistant roles. "
                f"messages.{number} should be {expected}."
            )
        content = message.get("content")
        if not isinstance(content, list) or not content:
            return f"The content field in the Message object at messages.{number} is empty."
        for index, block in enumerate(content):
            problem = _validate_block(block, f"messages.{number}.content.{index}")
            if problem:
                return problem
        kinds = {k for b in content for k in b}
        if ("toolUse" in kinds or "toolResult" in kinds) and tools is None:
            return "The toolConfig field must be defined when using toolUse and toolResult."
        answered = [b["toolResult"]["toolUseId"] for b in content if "toolResult" in b]
        if sorted(answered) != sorted(pending):
            return (
                f"messages.{number}: the number of toolResult blocks exceeds or does not "
                "match the toolUse blocks of the previous turn."
            )
        pending = [b["toolUse"]["toolUseId"] for b in content if "toolUse" in b]
    return None


def _validate_block(block: Any, where: str) -> str | None:
    kinds = set(block) if isinstance(block, dict) else set()
    if len(kinds) != 1 or not kinds <= _BLOCKS:
        return f"The ContentBlock at {where} must have exactly one member."
    if "text" in block and not (isinstance(block["text"], str) and block["text"].strip()):
        return f"The text field in the ContentBlock object at {where} is blank."
    if "image" in block:
        image = block["image"]
        if image.get("format") not in ("png", "jpeg", "gif", "webp"):
            return f"{where}.image.format: unsupported image format"
        try:
            base64.b64decode((image.get("source") or {}).get("bytes") or "", validate=True)
        except ValueError:
            return f"{where}.image.source.bytes: not base64"
    if "toolUse" in block:
        use = block["toolUse"]
        if not (use.get("toolUseId") and use.get("name") and isinstance(use.get("input"), dict)):
            return f"{where}.toolUse: toolUseId, name and an object input are required"
    if "toolResult" in block and not block["toolResult"].get("content"):
        return f"{where}.toolResult.content: must not be empty"
    return None


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m["role"] == "user"]
    return " ".join(b.get("text", "") for b in users[-1]["content"]) if users else ""


def _answer(body: dict[str, Any], serial: int) -> dict[str, Any]:
    system = " ".join(b.get("text", "") for b in body.get("system") or [])
    cached = trigger(system) == "cached"
    prompt = orjson.dumps([body.get("system"), body["messages"], body.get("toolConfig")])
    content, reason = _content(body, serial)
    output = sum(len(b["text"].split()) if "text" in b else 8 for b in content)
    usage = {
        "inputTokens": math.ceil(len(prompt) / 4),
        "outputTokens": output,
        "cacheReadInputTokens": 1024 if cached else 0,
        "cacheWriteInputTokens": 256 if cached else 0,
    }
    usage["totalTokens"] = sum(usage.values())
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": reason,
        "usage": usage,
        "metrics": {"latencyMs": 42},
    }


def _content(body: dict[str, Any], serial: int) -> tuple[list[dict[str, Any]], str]:
    tools = body.get("toolConfig") or {}
    last = body["messages"][-1]["content"]
    if tools and not any("toolResult" in b for b in last):
        forced = (tools.get("toolChoice") or {}).get("tool", {}).get("name")
        name = forced or tools["tools"][0]["toolSpec"]["name"]
        blocks: list[dict[str, Any]] = [] if forced else [{"text": "Let me check."}]
        blocks += [
            {
                "toolUse": {
                    "toolUseId": f"tooluse_fake{serial:04d}{n}",
                    "name": name,
                    "input": {"location": city},
                }
            }
            for n, city in enumerate(("Paris", "Tokyo"))
        ]
        return blocks, "tool_use"
    config = body.get("inferenceConfig") or {}
    text, stop, truncated = answer_within(
        config.get("maxTokens"), config.get("stopSequences") or []
    )
    return [{"text": text}], "stop_sequence" if stop else "max_tokens" if truncated else "end_turn"


async def _stream(
    request: web.Request, answer: dict[str, Any], word: str | None
) -> web.StreamResponse:
    frames = _frames(answer)
    if word in ("stream_error_at_once", "stream_corrupt_at_once"):
        broken = exception("modelStreamErrorException", "The model is overloaded.")
        if word == "stream_corrupt_at_once":
            broken = frames[5][:-1] + bytes([frames[5][-1] ^ 0xFF])  # its checksum is wrong
        together = b"".join(frames[:5]) + broken
        return await send_stream(request, "application/vnd.amazon.eventstream", [together])
    if word == "stream_throttled_after_start":
        frames = [frames[0], exception("throttlingException", "Too many requests.")]
    if word in ("stream_error", "stream_cut", "stream_abort"):
        frames = frames[:5]
        if word == "stream_error":
            frames.append(exception("modelStreamErrorException", "The model is overloaded."))
    content_type = "application/vnd.amazon.eventstream"
    return await send_stream(request, content_type, frames, word == "stream_abort")


def _frames(answer: dict[str, Any]) -> list[bytes]:
    """The ConverseStream events the service sends for `answer`, with their padding."""
    frames = [event("messageStart", {"role": "assistant", "p": "abcdefgh"})]
    for index, block in enumerate(answer["output"]["message"]["content"]):
        if "text" in block:
            words = block["text"].split(" ")
            frames += [
                event(
                    "contentBlockDelta",
                    {"contentBlockIndex": index, "delta": {"text": w if not n else " " + w}},
                )
                for n, w in enumerate(words)
            ]
        else:
            use = block["toolUse"]
            start = {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}}
            frames.append(event("contentBlockStart", {"contentBlockIndex": index, "start": start}))
            arguments = orjson.dumps(use["input"]).decode()
            third = max(1, len(arguments) // 3)
            for piece in (arguments[:third], arguments[third : 2 * third], arguments[2 * third :]):
                delta = {"toolUse": {"input": piece}}
                frames.append(
                    event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta})
                )
        frames.append(event("contentBlockStop", {"contentBlockIndex": index}))
    frames.append(event("messageStop", {"stopReason": answer["stopReason"]}))
    frames.append(event("metadata", {"usage": answer["usage"], "metrics": answer["metrics"]}))
    return frames


def _invoke(model_id: str, body: dict[str, Any]) -> web.Response:
    """InvokeModel for embedding models: Titan's and Cohere's own request formats."""
    if "titan-embed" in model_id:
        text = body.get("inputText")
        if not isinstance(text, str) or set(body) - {"inputText", "dimensions", "normalize"}:
            return _error(400, "ValidationException", "Malformed input request: inputText")
        vector = _vector(text, body.get("dimensions") or 8)
        tokens = len(text.split())
        response = web.json_response({"embedding": vector, "inputTextTokenCount": tokens})
    elif "cohere.embed" in model_id:
        texts = body.get("texts")
        if not isinstance(texts, list) or not body.get("input_type"):
            return _error(400, "ValidationException", "Malformed input request: texts, input_type")
        answer = {
            "id": "fake-embed",
            "embeddings": [_vector(t, 8) for t in texts],
            "response_type": "embeddings_floats",
            "texts": texts,
        }
        tokens = sum(len(t.split()) for t in texts)
        response = web.json_response(answer)
    else:
        return _error(400, "ValidationException", f"{model_id} is not an embedding model")
    response.headers["X-Amzn-Bedrock-Input-Token-Count"] = str(tokens)
    return response


def _vector(text: str, size: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % 32] - 127.5) / 127.5, 6) for i in range(size)]
