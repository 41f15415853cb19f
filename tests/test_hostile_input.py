"""Hostile request bodies: every refusal is a 400 that names the offending field.

Booleans where integers belong are refused by the gateway itself. For Anthropic and
Gemini (and the built-in simulator, which reads tools and formats too) the request is
translated first: a malformed message, content part, tool call or
tool is refused by the translation, naming the field in the caller's (OpenAI) terms and
never quoting a Python error. The translation is fuzzed through the gateway with the
openai SDK: every node of a rich, valid request is replaced by values of other types.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.harness import BackgroundLoop, Gateway, UpstreamServer, simulated_config
from tests.upstreams import RECORDER, Recorder, anthropic_server, gemini_server
from tests.upstreams.openai_server import API_KEY as OPENAI_KEY

MESSAGES = [{"role": "user", "content": "hi"}]
PYTHON_TALK = re.compile(r"[A-Z][a-z]+Error|object has no attribute|NoneType|unhashable")


@pytest.fixture
def simulated(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(simulated_config())


def post(gateway: Gateway, body: dict[str, Any], path: str = "chat/completions") -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/{path}",
        json=body,
        headers={"authorization": f"Bearer {gateway.key}"},
        timeout=10,
    )


@pytest.mark.parametrize(
    "field", ["max_tokens", "max_completion_tokens", "n", "top_logprobs", "seed"]
)
@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_an_integer(simulated: Gateway, field: str, value: bool) -> None:
    response = post(simulated, {"model": "sim", "messages": MESSAGES, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert f"`{field}` must be" in error["message"] and "boolean" in error["message"]


def test_integer_fields_still_take_integers(simulated: Gateway) -> None:
    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 5, "n": 2, "seed": -3}
    response = post(simulated, {**body, "top_logprobs": 0, "logprobs": True})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": True, "stream_options": 5}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"messages": [*MESSAGES, 5]}, "messages[1]"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
        ({"tools": "x"}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}, 3]}, "tools[1]"),
    ],
)
def test_other_wrong_types_name_the_field(
    simulated: Gateway, body: dict[str, Any], param: str
) -> None:
    response = post(simulated, {"model": "sim", "messages": MESSAGES, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


WRONG_TYPES = ["hot", True, [0.5], {"value": 0.5}]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("chat/completions", "temperature"),
        ("chat/completions", "top_p"),
        ("chat/completions", "presence_penalty"),
        ("chat/completions", "frequency_penalty"),
        ("completions", "temperature"),
        ("completions", "frequency_penalty"),
        ("responses", "temperature"),
        ("responses", "top_p"),
        ("messages", "temperature"),
        ("messages", "top_p"),
    ],
)
def test_sampling_numbers_of_another_type_are_refused_here(
    simulated: Gateway, path: str, field: str
) -> None:
    """Every provider refuses them; refused by the gateway they are the caller's
    mistake (`invalid_request`), not an upstream's refusal counted in its error rate."""
    body: dict[str, Any] = {"model": "sim", "max_tokens": 5}
    body |= {"prompt": "hi"} if path == "completions" else {"input": "hi"}
    if path in ("chat/completions", "messages"):
        body = {"model": "sim", "max_tokens": 5, "messages": MESSAGES}
    for value in WRONG_TYPES:
        response = post(simulated, {**body, field: value}, path)
        assert response.status_code == 400, (value, response.text)
        error = response.json()["error"]
        assert f"`{field}` must be a number" in error["message"], error
        if path != "messages":  # Anthropic's error shape has no param
            assert error["param"] == field
    rows = simulated.ledger_rows()
    assert {row["outcome"] for row in rows} == {"invalid_request"}, rows
    assert post(simulated, {**body, field: 0.5}, path).status_code == 200  # numbers pass
    assert post(simulated, {**body, field: 1}, path).status_code == 200


@pytest.fixture
def passed_through(gateway_factory: Callable[..., Gateway], openai_upstream: Any) -> Gateway:
    """An OpenAI-compatible upstream, to which the gateway passes the body on as it is."""
    server, _ = openai_upstream
    provider = {"type": "openai", "base_url": f"{server.url}/v1", "api_key": OPENAI_KEY}
    return gateway_factory(
        {
            "providers": {"up": provider},
            "upstreams": {"up-gpt": {"provider": "up", "model": "gpt-4.1"}},
            "models": {"sim": {"upstreams": ["up-gpt"]}},
        }
    )


@pytest.mark.parametrize("stop", [5, [1, 2], {"a": "b"}, True])
def test_stop_must_be_a_string_or_strings(
    passed_through: Gateway, openai_upstream: Any, stop: Any
) -> None:
    _, upstream = openai_upstream
    response = post(passed_through, {"model": "sim", "messages": MESSAGES, "stop": stop})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "stop"
    response = post(passed_through, {"model": "sim", "prompt": "hi", "stop": stop}, "completions")
    assert response.status_code == 400, response.text
    assert upstream.requests == []  # refused before any upstream saw them
    for good in ("\n", ["a", "b"], None):
        response = post(passed_through, {"model": "sim", "messages": MESSAGES, "stop": good})
        assert response.status_code == 200, response.text


def test_embedding_dimensions_must_be_an_integer(simulated: Gateway) -> None:
    response = post(simulated, {"model": "sim", "input": "x", "dimensions": True}, "embeddings")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "dimensions"


# -- translated providers --------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}
RICH: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                    "extra_content": {"google": {"thought_signature": "c2ln"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ],
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "stop": ["\n\n"],
    "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}}},
}
OTHER_TYPES = [5, "x", True, None, [], {}, [5], {"x": 1}]
CONFIG = """
providers:
  claude: {{type: anthropic, base_url: "{claude}", api_key: "{claude_key}"}}
  gemini: {{type: gemini, base_url: "{gemini}", api_key: "{gemini_key}"}}
  simulated: {{type: simulated}}
upstreams:
  claude-up: {{provider: claude, model: claude-sonnet-4-5, price: {{input: 3, output: 15}}}}
  gemini-up: {{provider: gemini, model: gemini-2.5-flash, price: {{input: 1, output: 2}}}}
  sim-up: {{provider: simulated, model: sim-1}}
models:
  claude: {{upstreams: [claude-up], retry: {{max_retries: 0}}}}
  gemini: {{upstreams: [gemini-up], retry: {{max_retries: 0}}}}
  sim: {{upstreams: [sim-up]}}
"""


@pytest.fixture(scope="module")
def translated(
    bg: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, dict[str, UpstreamServer]]]:
    from tests.harness import start_gateway

    servers = {
        "claude": UpstreamServer(bg, anthropic_server.create_app()),
        "gemini": UpstreamServer(bg, gemini_server.create_app()),
    }
    config = CONFIG.format(
        claude=servers["claude"].url,
        gemini=servers["gemini"].url,
        claude_key=anthropic_server.API_KEY,
        gemini_key=gemini_server.API_KEY,
    )
    gateway = start_gateway(bg, config, tmp_path_factory.mktemp("translated"))
    yield gateway, servers
    gateway.stop()
    for server in servers.values():
        server.close()


def paths(node: Any, where: str = "") -> Iterator[str]:
    """Every location in a JSON value, as the gateway names fields: `a[1].b`."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        at = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key
        yield at
        yield from paths(child, at)


_STEP = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def steps(path: str) -> list[str | int]:
    return [int(index) if index else name for index, name in _STEP.findall(path)]


def replaced(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    copied = copy.deepcopy(body)
    *parents, last = steps(path)
    node: Any = copied
    for step in parents:
        node = node[step]
    node[last] = value
    return copied


def names_a_field(body: dict[str, Any], path: str) -> bool:
    """Is `path` a field of `body`, or one missing from an object that is there?"""
    node: Any = body
    *parents, last = steps(path)
    for step in parents:
        found = (isinstance(step, int) and isinstance(node, list) and step < len(node)) or (
            isinstance(step, str) and isinstance(node, dict) and step in node
        )
        if not found:
            return False
        node = node[step]
    return isinstance(node, dict) if isinstance(last, str) else isinstance(node, list)


def test_the_rich_request_translates(translated: tuple[Gateway, dict[str, UpstreamServer]]) -> None:
    gateway, _ = translated
    for model in ("claude", "gemini", "sim"):
        body = {k: v for k, v in RICH.items() if k != "messages"}
        reply = gateway.client().chat.completions.create(
            model=model, messages=RICH["messages"], **body
        )
        assert reply.choices


@pytest.mark.parametrize("model", ["claude", "gemini", "sim"])
def test_malformed_requests_name_the_field(
    translated: tuple[Gateway, dict[str, UpstreamServer]], model: str
) -> None:
    gateway, servers = translated
    recorder = servers[model].app[RECORDER] if model in servers else Recorder()
    client = gateway.client(timeout=10)
    refused_here = 0
    for path in list(paths(RICH)):
        for value in OTHER_TYPES:
            body = replaced(RICH, path, value)
            sent_before = len(recorder.requests)
            try:
                client.chat.completions.create(
                    model=model,
                    messages=body["messages"],
                    extra_body={k: v for k, v in body.items() if k != "messages"},
                )
                continue
            except openai.APIStatusError as error:
                problem = error.body if isinstance(error.body, dict) else {}
                status, message = error.status_code, str(problem.get("message"))
                param = problem.get("param")
            assert status < 500 or len(recorder.requests) > sent_before, (path, value, message)
            assert not PYTHON_TALK.search(message), (path, value, message)
            if len(recorder.requests) > sent_before:
                continue  # the provider's own refusal, passed on
            refused_here += 1
            assert status == 400, (path, value, message)
            assert param and names_a_field(body, param), (path, value, param, message)
            assert param in message, (param, message)
    assert refused_here > 40  # the fuzzing reached the translation
