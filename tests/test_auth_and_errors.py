"""Keys and error shapes: every failure is an OpenAI-format error an SDK understands."""

from __future__ import annotations

import gzip
import http.client
import json
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from metergate.storage.keys import revoke_key
from tests.harness import simulated_config

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gateway(gateway_factory):
    config = simulated_config()
    config["upstreams"]["other-up"] = {"provider": "sim", "model": "other"}
    config["models"]["other"] = {"upstreams": ["other-up"]}
    config["server"] = {"max_body_bytes": 2048}
    return gateway_factory(config)


def call(gateway, key: str):
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    return client.chat.completions.create(model="sim", messages=MESSAGES)


def test_missing_key_is_a_401(gateway):
    response = httpx.post(
        f"{gateway.base_url}/chat/completions", json={"model": "sim", "messages": MESSAGES}
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "missing_api_key"
    assert "no API key" in error["message"]


@pytest.mark.parametrize(
    ("key", "code", "says"),
    [
        ("sk-proj-someopenaikey", "malformed_api_key", "a provider key will not work here"),
        ("mgk_" + "x" * 20, "malformed_api_key", "this one has 20 after it (cut off"),
        ("mgk_" + "x" * 43, "invalid_api_key", "unknown API key"),
        # the gateway's config, or the key lands in another ledger; but no server path
        ("mgk_" + "x" * 43, "invalid_api_key", "`metergate keys create --name SERVICE -c FILE`"),
    ],
)
def test_bad_keys_get_a_401_saying_what_is_wrong(gateway, key, code, says):
    with pytest.raises(openai.AuthenticationError) as raised:
        call(gateway, key)
    assert raised.value.code == code
    assert says in raised.value.message
    assert str(Path(gateway.runtime.source).parent) not in raised.value.message


def test_revoked_key_is_refused_by_name(gateway):
    secret = gateway.new_key("soon-gone")
    assert call(gateway, secret).choices
    revoked = gateway.bg.run(revoke_key(gateway.runtime.database, "soon-gone"))
    assert revoked == 1
    gateway.bg.run(gateway.runtime.keys.reload())
    with pytest.raises(openai.AuthenticationError) as raised:
        call(gateway, secret)
    assert raised.value.code == "revoked_api_key"
    assert "'soon-gone'" in raised.value.message and secret not in raised.value.message


def test_key_model_allow_list(gateway):
    secret = gateway.new_key("only-other", models=["other"])
    client = openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="sim", messages=MESSAGES)
    assert "not allowed for this key" in raised.value.message
    assert "models this key may use: other" in raised.value.message
    # recorded under the model asked for (a configured one), not as `unknown`
    (row,) = gateway.ledger_rows("key_name = 'only-other'")
    assert (row["model"], row["outcome"]) == ("sim", "invalid_request")
    assert [m.id for m in client.models.list()] == ["other"]
    assert client.chat.completions.create(model="other", messages=MESSAGES).choices


def test_unknown_model_lists_the_allowed_ones(gateway):
    with pytest.raises(openai.NotFoundError) as raised:
        gateway.client().chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert raised.value.code == "model_not_found"
    assert "models this key may use: sim, other" in raised.value.message


def test_a_long_unknown_model_name_is_cut_in_the_message(gateway):
    """A name echoed back is cut to its first 100 characters and its length: a huge one
    does not come back whole."""
    name = "m" * 1500  # (the gateway here takes bodies of 2 KiB at most)
    with pytest.raises(openai.NotFoundError) as raised:
        gateway.client().chat.completions.create(model=name, messages=MESSAGES)
    message = raised.value.message
    assert f"model '{'m' * 100}'... (1,500 characters) does not exist" in message
    assert len(message) < 300, len(message)
    with pytest.raises(openai.NotFoundError) as raised:  # a short one is quoted whole
        gateway.client().chat.completions.create(model="m" * 100, messages=MESSAGES)
    assert f"model '{'m' * 100}' does not exist" in raised.value.message


def raw(gateway, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {gateway.key}", **headers},
    )


def test_malformed_json_says_where(gateway):
    response = raw(gateway, b'{"model": "sim", "messages": [}')
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and "column" in error["message"]


def test_a_body_that_is_not_utf8_says_which_byte(gateway):
    """Bytes that are not UTF-8 are told as such, with the first bad byte and its offset,
    not as a JSON error at column 1; a lone surrogate escape is still read as U+FFFD."""
    body = b'{"model": "sim", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
    response = raw(gateway, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    offset = body.index(b"\xe9")
    assert error["message"] == (
        f"request body is not valid UTF-8: byte 0xe9 at offset {offset}; "
        "send the JSON encoded as UTF-8"
    )
    response = raw(gateway, '{"model": "sim", "messages": []}'.encode("utf-16"))
    assert response.json()["error"]["message"] == (
        "request body is not valid UTF-8: byte 0xff at offset 0 (it begins with a UTF-16 "
        "byte order mark); send the JSON encoded as UTF-8"
    )
    escaped = b'{"model": "sim", "messages": [{"role": "user", "content": "\\ud83d"}]}'
    assert raw(gateway, escaped).status_code == 200


def test_a_compressed_body_is_refused_by_name(gateway):
    """Some HTTP clients compress request bodies; the gateway reads JSON as sent."""
    body = gzip.compress(b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')
    response = raw(gateway, body, **{"Content-Encoding": "gzip"})
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_content_encoding"
    assert "Content-Encoding: gzip" in error["message"] and "uncompressed" in error["message"]
    plain = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}'
    assert raw(gateway, plain, **{"Content-Encoding": "identity"}).status_code == 200


def test_body_over_the_limit_is_413(gateway):
    big = b'{"model": "sim", "messages": [{"role": "user", "content": "' + b"x" * 4096 + b'"}]}'
    response = raw(gateway, big)
    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["error"]["message"]


def test_invalid_fields_are_400_with_param(gateway):
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().chat.completions.create(model="sim", messages=[])
    assert raised.value.param == "messages"
    response = raw(
        gateway, b'{"model": "sim", "messages": [{"role":"user","content":"x"}], "max_tokens": -3}'
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_request_id_is_echoed_or_made(gateway):
    mine = raw(
        gateway,
        b'{"model": "sim", "messages": [{"role":"user","content":"x"}]}',
        **{"x-request-id": "trace-123"},
    )
    assert mine.headers["x-request-id"] == "trace-123"
    made = raw(gateway, b"{")
    assert made.headers["x-request-id"].startswith("req_")
    assert gateway.ledger_rows("request_id = 'trace-123'")


@pytest.mark.parametrize(
    "caller_id",
    ["é€😀".encode(), b"a\tb", b"x" * 20 + "ü".encode()],
    ids=["utf-8", "tab", "late"],
)
def test_a_request_id_that_is_not_printable_ascii_is_replaced(gateway, caller_id):
    """Header bytes are not text: kept, UTF-8 was stored garbled and control characters
    reached the log, the console and CSV exports."""
    answer = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": "x"}]},
        headers=[
            (b"authorization", f"Bearer {gateway.key}".encode()),
            (b"x-request-id", caller_id),
        ],
    )
    assert answer.status_code == 200
    made = answer.headers["x-request-id"]
    assert made.startswith("req_") and gateway.ledger_rows(f"request_id = '{made}'")


def test_unknown_endpoint_and_method(gateway):
    root = gateway.base_url.removesuffix("/v1")
    missing = httpx.get(f"{root}/v1/assistants")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{root}/v1/chat/completions")
    assert wrong.status_code == 405
    # Anthropic's SDK adds /v1 itself: a base URL ending in it is the usual slip
    claude = anthropic.Anthropic(base_url=f"{root}/v1", api_key=gateway.key, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.create(model="sim", max_tokens=5, messages=MESSAGES)
    assert "drop /v1 from the client's base URL" in str(raised.value)


def test_health_and_readiness(gateway):
    root = gateway.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{root}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_probes_answer_head_like_get_without_the_body(gateway):
    """Health checkers and uptime monitors send HEAD: same status and length as GET, no
    body, and the kept-alive connection stays usable for the next request."""
    port = int(gateway.base_url.split(":")[2].split("/")[0])
    auth = {"Authorization": f"Bearer {gateway.key}"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for path, headers in (
            ("/healthz", {}),
            ("/readyz", {}),
            ("/v1/models", auth),
            ("/v1/models/other", auth),
        ):
            connection.request("GET", path, headers=headers)
            got = connection.getresponse()
            body = got.read()
            connection.request("HEAD", path, headers=headers)
            head = connection.getresponse()
            assert head.status == got.status == 200, (path, head.status, got.status)
            assert head.read() == b""
            assert int(head.headers["content-length"]) == len(body), path
            assert head.headers["content-type"] == got.headers["content-type"]
        connection.request("HEAD", "/metrics")
        metrics = connection.getresponse()
        assert metrics.status == 200 and metrics.read() == b""
        assert int(metrics.headers["content-length"]) > 0
        connection.request("HEAD", "/v1/models")  # no key: the same 401 as GET
        refused = connection.getresponse()
        assert refused.status == 401 and refused.read() == b""
        connection.request("GET", "/healthz")  # still in step after the bodiless answers
        assert json.loads(connection.getresponse().read()) == {"status": "ok"}
    finally:
        connection.close()
    wrong = httpx.delete(f"http://127.0.0.1:{port}/healthz")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"


def test_keys_are_never_metric_labels_or_ledger_values(gateway):
    call(gateway, gateway.key)
    exposition = gateway.runtime.metrics.exposition().decode()
    rows = gateway.ledger_rows()
    assert gateway.key not in exposition and gateway.key not in repr(rows)
    assert 'key="test"' in exposition
