"""The opt-in request log: what it keeps (all, errors, a sample), what it masks, where
it writes (ledger database or rotated JSONL), how long, and how an operator reads it
(one request in the admin API, the JSONL export), with the admin key only."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest

from metergate.requestlog.store import JsonlStore
from metergate.storage.database import open_database
from tests.doors import anthropic_client, upstreams  # noqa: F401 - fixture
from tests.harness import Gateway, free_port
from tests.services import fill, small_filesystem
from tests.test_console_api import ADMIN_KEY, admin
from tests.upstreams.openai_server import API_KEY

CARD = "4111 1111 1111 1111"  # passes the Luhn check
NOT_A_CARD = "4111 1111 1111 1112"  # does not
PROVIDER_KEY = "sk-proj-Abcdefghijklmnop1234567890"
SECRET_TEXT = f"mail kim@example.com, card {CARD}, key {PROVIDER_KEY}, order ACME-123456"


def logged_config(upstream_url: str, **request_log: Any) -> dict[str, Any]:
    return {
        "providers": {
            "up": {"type": "openai", "base_url": f"{upstream_url}/v1", "api_key": API_KEY},
        },
        "upstreams": {
            "up-gpt": {
                "provider": "up",
                "model": "gpt-4.1-2025-04-14",
                "price": {"input": 2, "output": 8},
            },
        },
        "models": {
            "gpt-4.1": {
                "upstreams": ["up-gpt"],
                "retry": {"max_retries": 1, "backoff_base": 0.001, "backoff_max": 0.001},
            },
        },
        "admin": {"api_key": ADMIN_KEY},
        "request_log": {
            "enabled": True,
            "redact": {"patterns": [r"ACME-\d{6}"], "json_paths": ["$.metadata.user_id"]},
            **request_log,
        },
    }


@pytest.fixture
def upstream_url(openai_upstream) -> str:
    server, _ = openai_upstream
    return server.url


def latest_row(gateway: Gateway) -> dict[str, Any]:
    listing = admin(gateway, "/admin/api/requests?limit=1").json()
    return listing["requests"][0]


def detail(gateway: Gateway, row_id: int) -> dict[str, Any]:
    answer = admin(gateway, f"/admin/api/requests/{row_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def stored_records(gateway: Gateway) -> list[str]:
    assert gateway.runtime.database is not None
    gateway.bg.run(gateway.runtime.observers.recorder.flush())
    rows = gateway.bg.run(gateway.runtime.database.fetch("SELECT record FROM request_log"))
    return [record for (record,) in rows]


def test_a_request_is_kept_with_its_secrets_masked(gateway_factory, upstream_url):
    gateway = gateway_factory(logged_config(upstream_url))
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4.1",
        messages=[{"role": "user", "content": SECRET_TEXT + f" not a card {NOT_A_CARD}"}],
        metadata={"user_id": "u-778899", "feature": "support"},
        extra_headers={"x-customer": "kim@example.com", "x-metergate-tags": "team=care"},
    )
    reply = raw.parse()
    row = latest_row(gateway)
    data = detail(gateway, row["id"])
    record = data["log"]
    assert record is not None and record["request_id"] == row["request_id"]
    # the ledger row and the record describe the same request
    assert (
        record["cost_nano"]
        == row["cost_nano"]
        == round(float(raw.headers["x-metergate-cost-usd"]) * 1e9)
    )
    assert record["usage"]["output_tokens"] == reply.usage.completion_tokens
    assert record["tags"] == {"feature": "support", "team": "care", "user_id": "u-778899"}
    assert record["outcome"] == "success" and record["status"] == 200
    assert 0 < record["upstream_ms"] <= record["duration_ms"]
    (attempt,) = record["attempts"]
    assert attempt["upstream"] == "up-gpt" and attempt["model"] == "gpt-4.1-2025-04-14"
    assert attempt["outcome"] == "success" and attempt["error"] is None
    assert attempt["upstream_status"] == 200
    # headers: credentials masked always, the rest through the text rules
    headers = record["request"]["headers"]
    assert headers["authorization"] == "[REDACTED]"
    assert headers["x-customer"] == "[REDACTED:email]"
    assert headers["x-metergate-tags"] == "team=care"
    # bodies: default rules, the operator's regex and JSON path
    body = json.loads(record["request"]["body"])
    sent = body["messages"][0]["content"]
    assert "[REDACTED:email]" in sent and "[REDACTED:card]" in sent and "[REDACTED:key]" in sent
    assert "order [REDACTED]" in sent and NOT_A_CARD in sent
    assert body["metadata"] == {"user_id": "[REDACTED]", "feature": "support"}
    answer = json.loads(record["response"]["body"])
    assert answer["choices"][0]["message"]["content"] == reply.choices[0].message.content
    # nothing secret reached the store, in any field (tags are attribution, as in the
    # ledger: the JSON path masks the body's copy of user_id, not the tag)
    for stored in stored_records(gateway):
        for secret in ("kim@example.com", CARD, PROVIDER_KEY, "ACME-123456"):
            assert secret not in stored
        assert gateway.key not in stored and API_KEY not in stored


def test_the_openapi_document_names_every_field_of_a_record(gateway_factory, upstream_url):
    """The console's OpenAPI document is what clients are generated from: a field the
    record has and the document lacks is one a typed client drops."""
    gateway = gateway_factory(logged_config(upstream_url))
    gateway.client().chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "hi"}]
    )
    record = detail(gateway, latest_row(gateway)["id"])["log"]
    schemas = admin(gateway, "/admin/openapi.json").json()["components"]["schemas"]
    schema = schemas["RequestLogRecord"]["properties"]
    assert set(record) == set(schema)
    attempt = schema["attempts"]["items"]["properties"]
    assert set(record["attempts"][0]) == set(attempt)


def test_only_failed_requests_with_capture_errors(gateway_factory, upstream_url):
    gateway = gateway_factory(logged_config(upstream_url, capture="errors"))
    client = gateway.client()
    client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "ok"}])
    ok_row = latest_row(gateway)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "TRIGGER:500"}]
        )
    failed_row = latest_row(gateway)
    assert detail(gateway, ok_row["id"])["log"] is None
    record = detail(gateway, failed_row["id"])["log"]
    assert record["outcome"] == "upstream_error" and record["status"] == 502
    assert record["error"]["message"].startswith("upstream error 500")
    # the retry is there too: each attempt with its own error and timing
    assert [a["outcome"] for a in record["attempts"]] == ["upstream_error", "upstream_error"]
    assert all(a["upstream_status"] == 500 for a in record["attempts"])
    assert all("upstream says 500" in a["error"] for a in record["attempts"])
    first, second = record["attempts"]
    assert first["started_ms"] + first["duration_ms"] <= second["started_ms"]
    # the response is the error the caller got
    assert json.loads(record["response"]["body"])["error"]["type"] == "upstream_error"
    # a refused request (bad input) is an error too, kept with its error
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4.1", messages=[])
    refused = detail(gateway, latest_row(gateway)["id"])["log"]
    assert refused["outcome"] == "invalid_request" and refused["attempts"] == []
    assert "messages" in refused["error"]["message"]


def test_each_attempt_of_a_stream_shows_the_status_its_upstream_answered(
    gateway_factory, upstream_url
):
    """A stream that fell back from an upstream nobody answers: its attempts have no
    status (no answer came), the one that served the 200 it got."""
    config = logged_config(upstream_url)
    config["providers"]["gone"] = {
        "type": "openai",
        "base_url": f"http://127.0.0.1:{free_port()}/v1",
        "api_key": API_KEY,
    }
    config["upstreams"]["up-gone"] = {"provider": "gone", "model": "gpt-4.1"}
    config["models"] = {
        "gpt-4.1": {"upstreams": ["up-gone"], "fallbacks": ["backup"]},
        "backup": {"upstreams": ["up-gpt"]},
    }
    gateway = gateway_factory(config)
    stream = gateway.client().chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    record = detail(gateway, latest_row(gateway)["id"])["log"]
    *refused, served = [
        (a["upstream"], a["outcome"], a["upstream_status"]) for a in record["attempts"]
    ]
    assert refused and set(refused) == {("up-gone", "connection_error", None)}  # and retried
    assert served == ("up-gpt", "success", 200)


def test_a_body_is_kept_as_it_came_also_one_refused_as_not_json(gateway_factory, upstream_url):
    """The record keeps what was sent: a body refused because it is not JSON (cut short)
    or not UTF-8 is there, masked, when it is most wanted; and `bytes` is the size sent,
    not that of a copy the gateway made."""
    gateway = gateway_factory(logged_config(upstream_url))
    headers = {"authorization": f"Bearer {gateway.key}", "content-type": "application/json"}
    cut = b'{"model": "gpt-4.1", "messages": [{"role": "user", "content": "order ACME-123456'
    latin1 = '{"model": "gpt-4.1", "messages": [{"role": "user", "content": "caf\xe9"}]}'
    spaced = b'{ "model" : "gpt-4.1" ,  "messages" : [ {"role": "user", "content": "hi"} ] }'
    for sent, status in ((cut, 400), (latin1.encode("latin-1"), 400), (spaced, 200)):
        answer = httpx.post(
            f"{gateway.base_url}/chat/completions", content=sent, headers=headers, timeout=30
        )
        assert answer.status_code == status, answer.text
        record = detail(gateway, latest_row(gateway)["id"])["log"]
        assert record["request"]["bytes"] == len(sent)
        if status == 400:
            assert record["outcome"] == "invalid_request"
            kept = sent.decode("utf-8", "replace").replace("ACME-123456", "[REDACTED]")
            assert record["request"]["body"] == kept


def test_a_sample(gateway_factory, upstream_url):
    gateway = gateway_factory(logged_config(upstream_url, capture="sample", sample_rate=0.5))
    client = gateway.client()
    for _ in range(60):
        client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "x"}])
    kept = len(stored_records(gateway))
    assert 0 < kept < 60  # each request flips its own coin: all or none is ~1e-18


def test_bodies_are_cut_and_streams_kept_as_relayed(gateway_factory, upstream_url):
    gateway = gateway_factory(logged_config(upstream_url, max_body_bytes=256))
    client = gateway.client()
    long_text = "words " * 200
    client.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": long_text}]
    )
    record = detail(gateway, latest_row(gateway)["id"])["log"]
    assert record["request"]["truncated"] is True
    assert record["request"]["bytes"] > 1200
    assert len(record["request"]["body"].encode()) <= 256
    chunks = list(
        client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": "stream"}], stream=True
        )
    )
    streamed = detail(gateway, latest_row(gateway)["id"])["log"]
    assert streamed["stream"] is True and streamed["ttft_ms"] is not None
    relayed = streamed["response"]["body"]
    assert relayed.startswith("data: {") and len(chunks) > 3
    assert streamed["response"]["truncated"] is True  # 256 bytes hold a chunk or two


@pytest.mark.parametrize("model", ["gpt", "claude"])  # translated from chat; passed through
def test_a_door_keeps_what_its_caller_got(gateway_factory, upstreams, model):  # noqa: F811
    """A Messages request's record holds the Anthropic message its caller got, whether
    the upstream spoke chat or Messages, streamed or not."""
    logged = f"admin: {{api_key: {ADMIN_KEY}}}\nrequest_log: {{enabled: true}}\n"
    gateway = gateway_factory(upstreams.config() + logged)
    client = anthropic_client(gateway)
    ask = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
    message = client.messages.create(**ask)
    record = detail(gateway, latest_row(gateway)["id"])["log"]
    kept = json.loads(record["response"]["body"])
    assert kept["id"] == message.id and kept["type"] == "message"
    assert kept["content"][0]["text"] == message.content[0].text
    with client.messages.stream(**ask) as events:
        streamed = events.get_final_message()
    record = detail(gateway, latest_row(gateway)["id"])["log"]
    relayed = record["response"]["body"]
    assert relayed.startswith("event: message_start") and streamed.id in relayed
    assert relayed.rstrip().rsplit("\n\n", 1)[-1].startswith("event: message_stop")
    failing = "TRIGGER:overloaded" if model == "claude" else "TRIGGER:503"
    with pytest.raises(anthropic.APIStatusError) as refused:  # no retries in these models
        client.messages.create(**{**ask, "messages": [{"role": "user", "content": failing}]})
    record = detail(gateway, latest_row(gateway)["id"])["log"]
    assert json.loads(record["response"]["body"]) == refused.value.body
    assert refused.value.body["type"] == "error"  # Anthropic's shape, not OpenAI's


def test_a_cache_hit_keeps_the_answer_it_gave(gateway_factory, upstream_url):
    config = logged_config(upstream_url)
    config["cache"] = {"enabled": True}
    gateway = gateway_factory(config)
    client = gateway.client()
    ask = [{"role": "user", "content": "the same question twice"}]
    first = client.chat.completions.create(model="gpt-4.1", messages=ask)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=ask)
    assert raw.headers["x-metergate-cache"] == "hit"
    record = detail(gateway, latest_row(gateway)["id"])["log"]
    assert json.loads(record["response"]["body"])["id"] == first.id == raw.parse().id
    assert record["attempts"] == []


def test_off_by_default_nothing_is_kept(gateway_factory, upstream_url):
    config = logged_config(upstream_url)
    del config["request_log"]
    gateway = gateway_factory(config)
    gateway.client().chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": SECRET_TEXT}]
    )
    data = detail(gateway, latest_row(gateway)["id"])
    assert data["log"] is None and data["request_log"]["enabled"] is False
    assert gateway.runtime.observers.recorder is None
    rows = gateway.bg.run(gateway.runtime.database.fetch("SELECT COUNT(*) FROM request_log"))
    assert rows[0][0] == 0


def test_admin_key_required_and_export(gateway_factory, upstream_url):
    gateway = gateway_factory(logged_config(upstream_url))
    client = gateway.client()
    for word in ("one", "two", "three"):
        client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": word}]
        )
    row = latest_row(gateway)
    for path in (f"/admin/api/requests/{row['id']}", "/admin/api/request-log.jsonl"):
        assert admin(gateway, path, key="").status_code == 401
        assert admin(gateway, path, key=gateway.key).status_code == 403  # a caller key
    assert admin(gateway, "/admin/api/requests/999999").status_code == 404
    assert admin(gateway, "/admin/api/requests/abc").status_code == 404  # no row has that id
    assert admin(gateway, "/admin/api/request-log.jsonl?since=soon").status_code == 400
    exported = admin(gateway, "/admin/api/request-log.jsonl?since=1h")
    assert exported.status_code == 200
    assert exported.headers["content-type"] == "application/x-ndjson"
    assert "attachment" in exported.headers["content-disposition"]
    records = [json.loads(line) for line in exported.text.splitlines()]
    said = [json.loads(r["request"]["body"])["messages"][0]["content"] for r in records]
    assert said == ["one", "two", "three"]  # oldest first


def test_jsonl_store_rotates_finds_and_expires(gateway_factory, upstream_url, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="metergate.requestlog")
    directory = tmp_path / "request-log"
    directory.mkdir()
    expired = directory / "requests-20200101T000000-1-000001.jsonl"
    expired.write_text('{"request_id": "old", "ts": 1}\n')
    ten_days_ago = time.time() - 10 * 86_400
    os.utime(expired, (ten_days_ago, ten_days_ago))
    config = logged_config(
        upstream_url,
        store="jsonl",
        directory=str(directory),
        max_file_bytes=64 * 1024,
        retention_days=7,
    )
    gateway = gateway_factory(config)
    client = gateway.client()
    padding = "lorem ipsum " * 400  # ~5 KB per request body: rotation within 30 requests
    for i in range(30):
        client.chat.completions.create(
            model="gpt-4.1", messages=[{"role": "user", "content": f"{i} {padding}"}]
        )
    row = latest_row(gateway)
    record = detail(gateway, row["id"])["log"]
    assert record["request_id"] == row["request_id"]
    assert json.loads(record["request"]["body"])["messages"][0]["content"].startswith("29 ")
    deadline = time.monotonic() + 10
    while expired.exists():  # past retention: removed when the writer starts
        assert time.monotonic() < deadline, "the expired file was not removed"
        time.sleep(0.05)
    assert "request log: 1 files past retention removed" in caplog.messages
    files = sorted(directory.glob("requests-*.jsonl"))
    assert len(files) >= 2 and all(f.stat().st_size <= 64 * 1024 for f in files)
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(lines) == 30
    exported = admin(gateway, "/admin/api/request-log.jsonl?since=1h").text.splitlines()
    assert len(exported) == 30
    assert gateway.metric("metergate_request_log_records_total", result="written") == 30


def test_a_line_cut_short_leaves_the_jsonl_log_readable(gateway_factory, upstream_url, tmp_path):
    """A process killed while appending (or a full disk) leaves a line cut short, maybe
    naming the request id: export and lookup skip it and read every whole record."""
    directory = tmp_path / "request-log"
    directory.mkdir()
    torn = directory / "requests-20261207T235000-99999-000001.jsonl"
    torn.write_text(
        f'{{"request_id": "whole", "ts": {time.time()}}}\n'
        f'{{"request_id": "torn", "ts": {time.time()}, "request": {{"body": "ab'
    )
    config = logged_config(upstream_url, store="jsonl", directory=str(directory))
    gateway = gateway_factory(config)
    gateway.client().chat.completions.create(
        model="gpt-4.1",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-request-id": "torn"},  # its id also begins the cut-off line
    )
    row = latest_row(gateway)
    assert detail(gateway, row["id"])["log"]["request_id"] == "torn"
    exported = admin(gateway, "/admin/api/request-log.jsonl?since=1h")
    assert exported.status_code == 200
    ids = sorted(json.loads(line)["request_id"] for line in exported.text.splitlines())
    assert ids == ["torn", "whole"]


async def test_a_write_a_full_disk_cut_short_leaves_no_half_line(tmp_path):
    """A batch written to a full disk fails whole: what it got onto the disk is cut back
    off, so the next batch, once there is space, starts on a line of its own (it was
    glued onto the half line, unreadable, yet counted written)."""
    with small_filesystem(tmp_path / "small", "128k") as small:
        store = JsonlStore(str(small / "log"), 10 * 2**20)

        def batch(prefix: str, count: int) -> list[tuple[Any, ...]]:
            body = "x" * 2000  # a record of a few KiB, as a captured body makes
            return [
                (
                    time.time(),
                    f"{prefix}-{n}",
                    "k",
                    "success",
                    json.dumps({"request_id": f"{prefix}-{n}", "ts": time.time(), "body": body}),
                )
                for n in range(count)
            ]

        await store.write(batch("before", 5))
        filler = fill(small)
        with pytest.raises(OSError):
            await store.write(batch("full", 20))
        filler.unlink()
        await store.write(batch("after", 5))
        exported = await store.export(0, time.time() + 1, 1000)
        ids = sorted(json.loads(line)["request_id"] for line in exported)
        assert ids == sorted([f"before-{n}" for n in range(5)] + [f"after-{n}" for n in range(5)])
        for path in (small / "log").iterdir():
            text = path.read_bytes()
            assert not text or text.endswith(b"\n")
            assert all(json.loads(line) for line in text.splitlines())


def test_ledger_store_expires_old_records(upstream_url, bg, tmp_path):
    from tests.harness import start_gateway

    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    async def old_record() -> None:
        database = await open_database(url)
        await database.execute(
            "INSERT INTO request_log (ts, request_id, key_name, outcome, record) "
            "VALUES (?, ?, ?, ?, ?)",
            (time.time() - 30 * 86_400, "ancient", "test", "success", "{}"),
        )
        await database.execute(
            "INSERT INTO request_log (ts, request_id, key_name, outcome, record) "
            "VALUES (?, ?, ?, ?, ?)",
            (time.time() - 86_400, "recent", "test", "success", "{}"),
        )
        await database.close()

    bg.run(old_record())
    config = {**logged_config(upstream_url, retention_days=7), "ledger": {"url": url}}
    gateway = start_gateway(bg, config, tmp_path / "gw")
    try:

        async def ids() -> set[str]:
            assert gateway.runtime.database is not None
            rows = await gateway.runtime.database.fetch("SELECT request_id FROM request_log")
            return {r for (r,) in rows}

        deadline = time.monotonic() + 10
        while "ancient" in bg.run(ids()):
            assert time.monotonic() < deadline, "the expired record was not removed"
            bg.run(asyncio.sleep(0.05))
        assert "recent" in bg.run(ids())
    finally:
        gateway.stop()


def records_counted(metrics: Any, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "metergate_request_log_records_total", {"result": result}
    )
    return value or 0.0


def jsonl_records(directory: Any) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("requests-*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_a_full_queue_drops_records_and_counts_them(tmp_path):
    """When the writer falls behind by `max_pending` records, later ones are dropped and
    counted (`result="dropped"`); the request itself never waits, and what was queued is
    still written."""
    from metergate.config.observe import RequestLogConfig
    from metergate.metering.meter import RequestLog
    from metergate.metering.metrics import Metrics
    from metergate.requestlog import RequestRecorder

    config = RequestLogConfig(enabled=True, store="jsonl", directory=str(tmp_path), max_pending=10)
    metrics = Metrics()
    recorder = RequestRecorder(config, metrics, None)  # its writer task is not started
    for n in range(15):
        record = RequestLog(f"req-{n}", time.time(), {b"content-type": b"application/json"})
        record.capture = True
        record.body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": str(n)}]}
        record.response = b'{"id": "x"}'
        recorder.finish(record, time.time(), 0.01, {})

    def counted(result: str) -> float:
        return records_counted(metrics, result)

    assert counted("dropped") == 5
    asyncio.run(recorder.flush())
    assert counted("written") == 10
    lines = jsonl_records(tmp_path)
    assert sorted(line["request_id"] for line in lines) == sorted(f"req-{n}" for n in range(10))


def test_a_queue_holding_max_pending_mb_of_bodies_drops_records(tmp_path):
    """While the store falls behind, big requests fill the queue by their bytes before
    its count: later ones are dropped and counted, and a lone record is always taken."""
    from metergate.config.observe import RequestLogConfig
    from metergate.metering.meter import RequestLog
    from metergate.metering.metrics import Metrics
    from metergate.requestlog import RequestRecorder

    config = RequestLogConfig(
        enabled=True, store="jsonl", directory=str(tmp_path), max_pending_mb=1
    )
    metrics = Metrics()
    recorder = RequestRecorder(config, metrics, None)  # its writer task is not started
    text = "x" * 300_000

    def finish(n: int, content: str) -> None:
        record = RequestLog(f"req-{n}", time.time(), {b"content-type": b"application/json"})
        record.capture = True
        body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": content}]}
        record.attach(body, json.dumps(body).encode())
        record.response = b'{"id": "x"}'
        recorder.finish(record, time.time(), 0.01, {})

    for n in range(5):  # 300 kB each: the fourth would pass 1 MiB
        finish(n, text)
    finish(5, "small")  # still fits

    def counted(result: str) -> float:
        return records_counted(metrics, result)

    assert counted("dropped") == 2
    asyncio.run(recorder.flush())
    assert counted("written") == 4
    finish(6, "y" * 2_000_000)  # bigger than the bound, but alone in the queue: kept
    asyncio.run(recorder.flush())
    assert (counted("written"), counted("dropped")) == (5, 2)
    lines = jsonl_records(tmp_path)
    kept = sorted(line["request_id"] for line in lines)
    assert kept == ["req-0", "req-1", "req-2", "req-5", "req-6"]


def test_masking_a_big_body_reads_only_what_is_kept_and_a_little_beyond(monkeypatch):
    """Regexes run on the kept part and 16 KiB past it: a secret that begins before the
    cut is masked whole, and a megabyte body costs what a cut one does."""
    from metergate.config.observe import RedactionConfig
    from metergate.requestlog import record
    from metergate.requestlog.redact import Redactor

    redactor = Redactor(RedactionConfig())
    seen: list[int] = []
    masking = redactor.text

    def counting(value: str) -> str:
        seen.append(len(value))
        return masking(value)

    monkeypatch.setattr(redactor, "text", counting)
    cap = 4096
    padding = "a" * (cap - 20)
    body = {"content": padding + f" {PROVIDER_KEY} " + "b" * 1_000_000 + f" {PROVIDER_KEY}"}
    kept = record._body(json.dumps(body, separators=(",", ":")).encode(), redactor, cap)
    assert kept is not None and kept["truncated"] is True
    assert kept["bytes"] == len(json.dumps(body, separators=(",", ":")))
    assert max(seen) <= cap + record.REDACT_BEYOND_CUT
    assert PROVIDER_KEY[:8] not in kept["body"]  # straddled the cut: masked, not half-kept
    assert kept["body"].endswith(" [REDACT")  # the mask, cut at the cap
    assert len(kept["body"].encode()) <= cap
