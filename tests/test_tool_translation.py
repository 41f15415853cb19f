"""OpenAI function tools, translated for each provider that takes function tools only.

Every translator reads a tool the same way (`providers.translation.function_tool`), so a
malformed tool gets the same 400 naming the field whichever provider serves the model,
instead of being sent on for the upstream to refuse in its own words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from metergate.errors import GatewayError
from metergate.providers.anthropic_translate import to_messages_request
from metergate.providers.bedrock_translate import to_converse_request
from metergate.providers.gemini_translate import to_generate_request

MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

TRANSLATORS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "Anthropic": lambda body: to_messages_request(body, "claude"),
    "Gemini": to_generate_request,
    "Bedrock": to_converse_request,
}


def _tools(provider: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The provider's own tool declarations, reduced to name, description, schema."""
    if provider == "Anthropic":
        return [
            {"name": t["name"], "description": t.get("description"), "schema": t["input_schema"]}
            for t in payload["tools"]
        ]
    if provider == "Gemini":
        return [
            {
                "name": t["name"],
                "description": t.get("description"),
                "schema": t.get("parametersJsonSchema"),
            }
            for t in payload["tools"][0]["functionDeclarations"]
        ]
    return [
        {
            "name": t["toolSpec"]["name"],
            "description": t["toolSpec"].get("description"),
            "schema": t["toolSpec"]["inputSchema"]["json"],
        }
        for t in payload["toolConfig"]["tools"]
    ]


@pytest.mark.parametrize("provider", TRANSLATORS)
def test_a_function_tool_keeps_its_name_description_and_schema(provider: str) -> None:
    payload = TRANSLATORS[provider]({"messages": MESSAGES, "tools": [WEATHER]})
    assert _tools(provider, payload) == [
        {
            "name": "weather",
            "description": "Current weather for a city",
            "schema": WEATHER["function"]["parameters"],
        }
    ]


@pytest.mark.parametrize("provider", TRANSLATORS)
@pytest.mark.parametrize(
    ("tools", "param", "fragment"),
    [
        ("weather", "tools", "`tools` must be an array"),
        ([5], "tools[0]", "`tools[0]` must be an object"),
        ([{"type": "web_search"}], "tools[0].type", "only function tools are"),
        ([{"type": "function", "function": "weather"}], "tools[0].function", "must be an object"),
        (
            [{"type": "function", "function": {"name": 5}}],
            "tools[0].function.name",
            "must be a string",
        ),
        (
            [{"type": "function", "function": {"name": "f", "description": ["x"]}}],
            "tools[0].function.description",
            "must be a string",
        ),
        (
            [WEATHER, {"type": "function", "function": {"name": "f", "parameters": "{}"}}],
            "tools[1].function.parameters",
            "must be an object",
        ),
    ],
)
def test_a_malformed_tool_is_refused_naming_the_field(
    provider: str, tools: Any, param: str, fragment: str
) -> None:
    with pytest.raises(GatewayError) as caught:
        TRANSLATORS[provider]({"messages": MESSAGES, "tools": tools})
    error = caught.value
    assert (error.status, error.outcome) == (400, "invalid_request")
    assert fragment in error.message
    assert error.param == param
    if param == "tools[0].type":
        assert f"not supported for {provider}" in error.message
