"""A chat stream read back into the whole answer it carries.

Some servers (and proxies in front of them) stream whatever they are asked: a request
that did not ask to stream then gets SSE where a JSON answer was due. The upstream has
generated (and billed) that answer, so it is assembled here, as OpenAI's SDK assembles
a stream: each choice's text, refusal and tool calls joined from their deltas, its
finish reason, and the usage chunk's usage.
"""

from __future__ import annotations

from typing import Any

import orjson

from metergate.providers.sse import SSEDecoder

_MESSAGE_TEXT = ("content", "refusal", "reasoning_content")


def answer_from_stream(body: bytes) -> dict[str, Any] | None:
    """The chat completion (or legacy completion) a stream carries; None if `body` is
    not a stream of OpenAI chunks."""
    decoder = SSEDecoder()
    events = [*decoder.feed(body), *decoder.flush()]
    chunks = []
    for event in events:
        if event.data == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return None
        if type(chunk) is not dict or type(chunk.get("choices", [])) is not list:
            return None
        chunks.append(chunk)
    if not chunks:
        return None
    first = chunks[0]
    legacy = first.get("object") == "text_completion"
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            if type(choice) is not dict:
                return None
            whole = choices.setdefault(choice.get("index", 0), _empty(choice, legacy))
            if choice.get("finish_reason"):
                whole["finish_reason"] = choice["finish_reason"]
            if legacy:
                whole["text"] += choice.get("text") or ""
            elif type(delta := choice.get("delta")) is dict:
                _add(whole["message"], delta)
    answer = {key: value for key, value in first.items() if key not in ("choices", "usage")}
    answer["object"] = "text_completion" if legacy else "chat.completion"
    answer["choices"] = [choices[index] for index in sorted(choices)]
    answer["usage"] = usage
    return answer


def _empty(choice: dict[str, Any], legacy: bool) -> dict[str, Any]:
    index = choice.get("index", 0)
    if legacy:
        return {"index": index, "text": "", "finish_reason": None, "logprobs": None}
    message = {"role": "assistant", "content": None}
    return {"index": index, "message": message, "finish_reason": None, "logprobs": None}


def _add(message: dict[str, Any], delta: dict[str, Any]) -> None:
    """One delta into the message: texts appended, tool calls joined by their index."""
    for field in _MESSAGE_TEXT:
        if type(part := delta.get(field)) is str:
            message[field] = (message.get(field) or "") + part
    for call in delta.get("tool_calls") or ():
        if type(call) is not dict:
            continue
        calls = message.setdefault("tool_calls", [])
        index = call.get("index", len(calls))
        while len(calls) <= index:
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        whole = calls[index]
        if call.get("id"):
            whole["id"] = call["id"]
        function = call.get("function") or {}
        if type(function) is dict:
            whole["function"]["name"] += function.get("name") or ""
            whole["function"]["arguments"] += function.get("arguments") or ""
