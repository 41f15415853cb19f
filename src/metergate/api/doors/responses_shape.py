"""The shape of a Responses request's fields that the gateway reads, checked at the door.

The translation to chat (`responses_translate`) and the stored conversation read these
fields as the Responses API defines them. A caller who sends one of the wrong type gets a
400 that names it (`input[2].content[0].text`), whatever upstream serves the model, not
the translator's generic one. Only the caller's own `input` is checked: a stored
conversation was checked when it came in, and its outputs are the gateway's own.
"""

from __future__ import annotations

from typing import Any

from metergate.providers.translation import (
    a_list,
    a_string,
    an_object,
    invalid_request,
    required_string,
)


def check_request(body: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """Raise the 400 for the first field of `body` (whose input is `items`) of a wrong type."""
    a_string(body.get("instructions"), "instructions")
    for index, item in enumerate(items):
        _check_item(item, f"input[{index}]")
    for index, tool in enumerate(a_list(body.get("tools"), "tools")):
        tool = an_object(tool, f"tools[{index}]")
        if required_string(tool, "type", f"tools[{index}]") == "function":
            required_string(tool, "name", f"tools[{index}]")
            a_string(tool.get("description"), f"tools[{index}].description")
            if tool.get("parameters") is not None:
                an_object(tool["parameters"], f"tools[{index}].parameters")
    choice = body.get("tool_choice")
    if not isinstance(choice, str | None):  # a string ("auto", ...) names no tool
        _check_function_choice(an_object(choice, "tool_choice"))
    text = an_object(body.get("text") or {}, "text")
    if text.get("format") is not None:
        spec = an_object(text["format"], "text.format")
        if a_string(spec.get("type"), "text.format.type") == "json_schema":
            required_string(spec, "name", "text.format")
            an_object(spec.get("schema"), "text.format.schema")
    reasoning = an_object(body.get("reasoning") or {}, "reasoning")
    a_string(reasoning.get("effort"), "reasoning.effort")


def _check_function_choice(choice: dict[str, Any]) -> None:
    if required_string(choice, "type", "tool_choice") == "function":
        required_string(choice, "name", "tool_choice")


def _check_item(item: dict[str, Any], where: str) -> None:
    kind = a_string(item.get("type"), f"{where}.type") or ("message" if "role" in item else None)
    if kind is None:  # only a message may leave its type out (it has a role)
        raise invalid_request(f"`{where}.type` is required", f"{where}.type")
    if kind == "message":
        required_string(item, "role", where)
        content = item.get("content")
        if not isinstance(content, str):
            _check_parts(content, f"{where}.content")
    elif kind == "function_call":
        required_string(item, "call_id", where)
        required_string(item, "name", where)
        a_string(item.get("arguments"), f"{where}.arguments")
    elif kind == "function_call_output":
        required_string(item, "call_id", where)
        output = item.get("output")
        if output is not None and not isinstance(output, str):
            _check_parts(output, f"{where}.output")


def _check_parts(parts: Any, where: str) -> None:
    """A list of content parts: objects whose text, image and file fields are strings."""
    if not isinstance(parts, list):
        raise invalid_request(f"`{where}` must be a string or an array of content parts", where)
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        part = an_object(part, at)
        kind = required_string(part, "type", at)
        for field in _STRING_FIELDS:
            a_string(part.get(field), f"{at}.{field}")
        sources = _SOURCES.get(kind)
        if sources is not None and not any(part.get(field) for field in sources):
            named = " or ".join(f"`{field}`" for field in sources)
            raise invalid_request(f"`{at}` is an {kind} part without {named}", at)


_STRING_FIELDS = ("text", "image_url", "detail", "file_data", "file_id", "file_url", "filename")
# What an image or file part must give, one of them, to say what it is.
_SOURCES = {
    "input_image": ("image_url", "file_id"),
    "input_file": ("file_data", "file_id", "file_url"),
}
