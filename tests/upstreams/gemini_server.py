"""A fake Gemini API (generativelanguage `v1beta`) speaking the real wire format.

Endpoints: `POST /v1beta/models/{model}:generateContent`, `:streamGenerateContent?alt=sse`
and `:batchEmbedContents`. Errors use Google's shape
`{"error": {"code": ..., "message": ..., "status": ..., "details": [...]}}`.

It validates requests the way the real API does:

* API key from `x-goog-api-key` (or `?key=`): missing -> 403 PERMISSION_DENIED; wrong ->
  400 INVALID_ARGUMENT with an ErrorInfo detail of reason API_KEY_INVALID (yes, a 400);
* unknown fields in the request or in `generationConfig` (e.g. OpenAI's `messages`
  leaking through), no contents, roles other than user/model, empty parts, function
  responses that do not answer the previous model turn's function calls one for one,
  `parameters` together with `parametersJsonSchema`, a response schema without
  `responseMimeType: application/json`, an unknown calling mode -> 400 INVALID_ARGUMENT;
* `:streamGenerateContent` without `alt=sse` -> 400 (this fake only speaks SSE).

Behaviour is chosen by `TRIGGER:<word>` in the text of the last user turn:

* `overloaded` -> 503 UNAVAILABLE; `invalid` -> 400 INVALID_ARGUMENT;
* `rate_limit` -> 429 RESOURCE_EXHAUSTED with a RetryInfo detail `retryDelay: "7s"`;
* `safety` -> a candidate with finishReason SAFETY and no content;
* `blocked` -> no candidates, `promptFeedback.blockReason: SAFETY`;
* `thinking` -> a thought part first, `thoughtsTokenCount: 40`, signed function calls;
* `stream_error` -> (streaming) a few events, then `data: {"error": {...}}`;
* `stream_cut` -> (streaming) a few events, then a clean end without any finishReason;
* `stream_abort` -> (streaming) a few events, then the connection is dropped;
* `stream_rate_limited_first` -> (streaming) a 429 RESOURCE_EXHAUSTED error object, with
  a RetryInfo detail `retryDelay: "7s"`, as the stream's first event;
* `unstreamed` -> (streaming) the whole answer, as a server that cannot stream sends it.

`TRIGGER:cached` in `systemInstruction` reports 1024 of the prompt tokens as cached.

Without a trigger the answer is a function call when the request declares functions,
the calling mode is not NONE and the last user turn holds no functionResponse: calls of
the first allowed (else first declared) function with args `{"location": "Paris"}` and
`{"location": "Tokyo"}`, finishReason STOP (as the real API says). Otherwise each of
`candidateCount` candidates is `ANSWER`, cut by `stopSequences` (STOP) or after
`maxOutputTokens` words (MAX_TOKENS). Streams send `data: ...\\r\\n\\r\\n` events, one per
word, with `usageMetadata` on each. Embeddings are deterministic vectors of
`outputDimensionality` (default 8) values.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams import RECORDER, Recorder, answer_within, trigger

API_KEY = "AIza-gemini-test-key-0123456789"
_FIELDS = frozenset(
    {
        "contents",
        "systemInstruction",
        "generationConfig",
        "tools",
        "toolConfig",
        "safetySettings",
        "cachedContent",
        "labels",
    }
)
_CONFIG_FIELDS = frozenset(
    {
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "stopSequences",
        "candidateCount",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "thinkingConfig",
        "responseModalities",
    }
)
_PART_DATA = ("text", "inlineData", "fileData", "functionCall", "functionResponse")
_ERRORS = {
    "overloaded": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    "rate_limit": (429, "RESOURCE_EXHAUSTED", "You exceeded your current quota."),
    "invalid": (400, "INVALID_ARGUMENT", "The trigger asked for a 400."),
}
_RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}
_KEY_INVALID = {
    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
    "reason": "API_KEY_INVALID",
    "domain": "googleapis.com",
}


def create_app(api_key: str = API_KEY) -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()

    async def models(request: web.Request) -> web.StreamResponse:
        body = await app[RECORDER].record(request)
        presented = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not presented:
            return _error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
        if presented != api_key:
            return _error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [_KEY_INVALID],
            )
        model, _, method = request.match_info["target"].partition(":")
        if not isinstance(body, dict):
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        if method == "batchEmbedContents":
            return _embed(model, body)
        if method not in ("generateContent", "streamGenerateContent"):
            return _error(404, "NOT_FOUND", f"Method {method} not found.")
        problem = _validate(body)
        if problem:
            return _error(400, "INVALID_ARGUMENT", problem)
        word = trigger(_last_user_text(body["contents"]))
        if word in _ERRORS:
            status, code, message = _ERRORS[word]
            return _error(status, code, message, [_RETRY_INFO] if status == 429 else [])
        answer = _answer(body, model, word, len(app[RECORDER].requests))
        if method == "generateContent" or word == "unstreamed":
            return web.json_response(answer)
        if request.query.get("alt") != "sse":
            return _error(400, "INVALID_ARGUMENT", "this fake only streams with alt=sse")
        return await _stream(request, answer, word)

    app.router.add_post("/v1beta/models/{target}", models)
    return app


def _error(
    status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status)


def _unknown(names: Any, known: frozenset[str], where: str) -> str | None:
    extra = sorted(set(names) - known)
    if not extra:
        return None
    return f'Invalid JSON payload received. Unknown name "{extra[0]}"{where}: Cannot find field.'


def _validate(body: dict[str, Any]) -> str | None:
    config = body.get("generationConfig") or {}
    problem = _unknown(body, _FIELDS, "") or _unknown(
        config, _CONFIG_FIELDS, " at 'generation_config'"
    )
    if problem:
        return problem
    has_schema = "responseSchema" in config or "responseJsonSchema" in config
    if has_schema and config.get("responseMimeType") != "application/json":
        return "response_schema requires response_mime_type application/json"
    for tool in body.get("tools") or []:
        for declaration in tool.get("functionDeclarations") or []:
            if "parameters" in declaration and "parametersJsonSchema" in declaration:
                return "parameters and parameters_json_schema are mutually exclusive"
    mode = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode")
    if mode not in (None, "AUTO", "ANY", "NONE", "VALIDATED"):
        return f"Invalid value at 'tool_config.function_calling_config.mode' ({mode})"
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    calls: list[str] = []  # function names called by the previous model turn
    for number, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            return f"Please use a valid role: user, model. (contents[{number}])"
        parts = content.get("parts")
        if not parts or any(not any(k in p for k in _PART_DATA) for p in parts):
            return f"* GenerateContentRequest.contents[{number}].parts: must hold data"
        answered = [p["functionResponse"].get("name") for p in parts if "functionResponse" in p]
        if sorted(answered) != sorted(calls):
            return (
                "Please ensure that the number of function response parts is equal to "
                "the number of function call parts of the function call turn."
            )
        calls = [p["functionCall"].get("name") for p in parts if "functionCall" in p]
    return None


def _last_user_text(contents: list[dict[str, Any]]) -> str:
    users = [c for c in contents if c["role"] == "user"]
    return " ".join(p.get("text", "") for p in users[-1]["parts"]) if users else ""


def _answer(body: dict[str, Any], model: str, word: str | None, serial: int) -> dict[str, Any]:
    """The GenerateContentResponse (non-streaming shape) to a valid request."""
    system = " ".join(
        p.get("text", "") for p in (body.get("systemInstruction") or {}).get("parts") or []
    )
    cached = 1024 if trigger(system) == "cached" else 0
    prompt = orjson.dumps([body.get("systemInstruction"), body["contents"], body.get("tools")])
    usage: dict[str, Any] = {"promptTokenCount": math.ceil(len(prompt) / 4) + cached}
    if cached:
        usage["cachedContentTokenCount"] = cached
    response: dict[str, Any] = {"modelVersion": model, "responseId": f"fakeresp{serial:06d}"}
    if word == "blocked":
        response["promptFeedback"] = {"blockReason": "SAFETY"}
        response["usageMetadata"] = {**usage, "totalTokenCount": usage["promptTokenCount"]}
        return response
    config = body.get("generationConfig") or {}
    candidates = []
    for index in range(config.get("candidateCount") or 1):
        candidate = _candidate(body, word)
        if index:  # proto3 JSON leaves out a zero index
            candidate["index"] = index
        candidates.append(candidate)
    output = sum(_output_tokens(c) for c in candidates)
    thoughts = 40 if word == "thinking" else 0
    usage["candidatesTokenCount"] = output
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    usage["totalTokenCount"] = usage["promptTokenCount"] + output + thoughts
    response["candidates"] = candidates
    response["usageMetadata"] = usage
    return response


def _output_tokens(candidate: dict[str, Any]) -> int:
    """One token per answer word, eight per function call; thoughts are counted apart."""
    parts = (candidate.get("content") or {}).get("parts") or []
    return sum(
        8 if "functionCall" in p else len(p.get("text", "").split())
        for p in parts
        if not p.get("thought")
    )


def _candidate(body: dict[str, Any], word: str | None) -> dict[str, Any]:
    if word == "safety":
        return {
            "finishReason": "SAFETY",
            "safetyRatings": [
                {
                    "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                    "probability": "HIGH",
                    "blocked": True,
                }
            ],
        }
    parts: list[dict[str, Any]] = []
    if word == "thinking":
        parts.append({"text": "Let me think about this.", "thought": True})
    calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    declared = [
        d["name"] for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []
    ]
    answered = any("functionResponse" in p for p in body["contents"][-1]["parts"])
    if declared and calling.get("mode") != "NONE" and not answered:
        name = (calling.get("allowedFunctionNames") or declared)[0]
        for city in ("Paris", "Tokyo"):
            part: dict[str, Any] = {"functionCall": {"name": name, "args": {"location": city}}}
            if word == "thinking":
                part["thoughtSignature"] = f"c2lnbmF0dXJl{city}"
            parts.append(part)
        return {"content": {"parts": parts, "role": "model"}, "finishReason": "STOP"}
    config = body.get("generationConfig") or {}
    text, _, truncated = answer_within(
        config.get("maxOutputTokens"), config.get("stopSequences") or []
    )
    parts.append({"text": text})
    return {
        "content": {"parts": parts, "role": "model"},
        "finishReason": "MAX_TOKENS" if truncated else "STOP",
    }


async def _stream(
    request: web.Request, answer: dict[str, Any], word: str | None
) -> web.StreamResponse:
    events = [b"data: " + orjson.dumps(event) + b"\r\n\r\n" for event in _events(answer)]
    if word == "stream_rate_limited_first":
        error = {
            "error": {
                "code": 429,
                "message": "Resource has been exhausted (e.g. check quota).",
                "status": "RESOURCE_EXHAUSTED",
                "details": [_RETRY_INFO],
            }
        }
        events = [b"data: " + orjson.dumps(error) + b"\r\n\r\n"]
    if word in ("stream_error", "stream_cut", "stream_abort"):
        events = events[:3]
        if word == "stream_error":
            error = {
                "error": {
                    "code": 503,
                    "message": "The model is overloaded.",
                    "status": "UNAVAILABLE",
                }
            }
            events.append(b"data: " + orjson.dumps(error) + b"\r\n\r\n")
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(event)
    if word == "stream_abort":
        assert request.transport is not None
        request.transport.abort()
        return response
    await response.write_eof()
    return response


def _events(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream of GenerateContentResponses the real API sends for `answer`."""
    base = {"modelVersion": answer["modelVersion"], "responseId": answer["responseId"]}
    usage = answer["usageMetadata"]
    if "candidates" not in answer:
        return [answer]
    steps: list[list[dict[str, Any]]] = []  # per step, one partial candidate per candidate
    for candidate in answer["candidates"]:
        pieces = _pieces((candidate.get("content") or {}).get("parts") or [])
        for number, parts in enumerate(pieces or [[]]):
            partial: dict[str, Any] = {"index": candidate["index"]} if "index" in candidate else {}
            if parts:
                partial["content"] = {"parts": parts, "role": "model"}
            if number == len(pieces or [[]]) - 1:
                partial["finishReason"] = candidate["finishReason"]
            if len(steps) <= number:
                steps.append([])
            steps[number].append(partial)
    partial_usage = {
        "promptTokenCount": usage["promptTokenCount"],
        "totalTokenCount": usage["promptTokenCount"],
    }
    return [
        {
            **base,
            "candidates": step,
            "usageMetadata": usage if number == len(steps) - 1 else partial_usage,
        }
        for number, step in enumerate(steps)
    ]


def _pieces(parts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Parts as streamed: text word by word, thoughts and function calls whole."""
    pieces: list[list[dict[str, Any]]] = []
    for part in parts:
        if "text" in part and not part.get("thought"):
            words = part["text"].split(" ")
            pieces += [[{"text": w if not n else " " + w}] for n, w in enumerate(words)]
        elif "functionCall" in part and pieces and "functionCall" in pieces[-1][0]:
            pieces[-1].append(part)  # parallel calls arrive together
        else:
            pieces.append([part])
    return pieces


def _embed(model: str, body: dict[str, Any]) -> web.Response:
    requests = body.get("requests")
    problem = _unknown(body, frozenset({"requests"}), "")
    if problem or not isinstance(requests, list) or not requests:
        return _error(400, "INVALID_ARGUMENT", problem or "requests: must not be empty")
    embeddings = []
    for number, item in enumerate(requests):
        if item.get("model") != f"models/{model}":
            return _error(
                400, "INVALID_ARGUMENT", f"requests[{number}].model: must be models/{model}"
            )
        text = "".join(p.get("text", "") for p in (item.get("content") or {}).get("parts") or [])
        digest = hashlib.sha256(text.encode()).digest()
        size = item.get("outputDimensionality") or 8
        embeddings.append(
            {"values": [round((digest[i % 32] - 127.5) / 127.5, 6) for i in range(size)]}
        )
    return web.json_response({"embeddings": embeddings})
