"""One request log record: a finished request's headers, bodies, attempts, timings and
cost, redacted and size-capped, as one JSON object.

Built in the recorder's worker thread, never on the request's path: the request only
leaves its `RequestLog` (references to what it already had) in a queue.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import orjson

from metergate.metering.meter import RequestLog
from metergate.requestlog.redact import Redactor

# Regexes run on what the cut keeps and this many characters beyond it: a secret that
# begins before the cut is masked whole (unless it is longer than this), and masking a
# body costs what is kept of it, not its size (a megabyte took ~0.2 s of CPU).
REDACT_BEYOND_CUT = 16 * 1024


@dataclass(slots=True)
class Pending:
    """A finished request waiting for its record to be written."""

    log: RequestLog
    ts: float
    duration: float
    tags: dict[str, str]
    size: int  # bytes of the bodies it holds (the queue's bound)


def _body(raw: bytes | None, redactor: Redactor, cap: int) -> dict[str, Any] | None:
    """A body as text: JSON paths masked (when it is JSON), regexes masked, then cut;
    `bytes` is its size as it came."""
    if raw is None:
        return None
    size = len(raw)
    if redactor.paths and raw.lstrip()[:1] in (b"{", b"["):
        with contextlib.suppress(orjson.JSONDecodeError):  # not JSON: the regexes alone
            raw = orjson.dumps(redactor.json(orjson.loads(raw)))
    text = raw.decode("utf-8", "replace")
    window = cap + REDACT_BEYOND_CUT  # characters: at least as many bytes
    truncated = len(text) > window
    text = redactor.text(text[:window] if truncated else text)
    encoded = text.encode()
    if len(encoded) > cap:
        truncated = True
        text = encoded[:cap].decode("utf-8", "ignore")
    return {"body": text, "bytes": size, "truncated": truncated}


def _answer(log: RequestLog) -> bytes | None:
    """What the caller got: the answer as the door relayed it, or the error (a request
    refused before any record of it was kept: the OpenAI-shaped body)."""
    if log.response is None and log.failure is not None:
        return log.failure.body()
    return log.response


def build(item: Pending, redactor: Redactor, cap: int) -> tuple[Any, ...]:
    """(ts, request_id, key, outcome, JSON text) of one finished request."""
    log = item.log
    started = log.started
    usage = log.usage
    attempts = []
    for number, step in enumerate(log.steps or (), 1):
        attempts.append(
            {
                "number": number,
                "upstream": step.deployment.name,
                "provider": step.deployment.adapter.config.type,
                "model": step.deployment.model,
                "started_ms": round((step.started - started) * 1000, 3),
                "duration_ms": round((step.ended - step.started) * 1000, 3),
                "outcome": step.outcome,
                "upstream_status": step.status,
                "error": redactor.text(step.error) if step.error else None,
                "span_id": f"{step.span_id:016x}" if step.span_id else None,
            }
        )
    failure = log.failure
    record = {
        "request_id": log.request_id,
        "ts": item.ts,
        "key": log.key,
        "team": log.team,
        "tags": {name: redactor.text(value) for name, value in item.tags.items()},
        "model": log.model,
        "upstream": log.upstream,
        "operation": log.operation,
        "outcome": log.outcome,
        "status": log.status,
        "stream": log.stream,
        "cache_hit": log.cache_hit,
        "duration_ms": round(item.duration * 1000, 3),
        "ttft_ms": None if log.ttft is None else round(log.ttft * 1000, 3),
        "upstream_ms": round(log.upstream_seconds * 1000, 3),
        "cost_nano": log.cost_nano,
        "saved_nano": log.saved_nano,
        "usage": {
            "input_tokens": usage.input_tokens if usage else 0,
            "cached_input_tokens": usage.cached_input_tokens if usage else 0,
            "output_tokens": usage.output_tokens if usage else 0,
        },
        "trace_id": f"{log.trace.trace_id:032x}" if log.trace is not None else None,
        "request": {
            "headers": redactor.header_map(log.headers),
            # the body as it came when it was read (also one refused as not JSON)
            **(_body(log.raw or None, redactor, cap) or {"body": None, "bytes": 0}),
        },
        "response": _body(_answer(log), redactor, cap) if log.capture else None,
        "error": None
        if failure is None
        else {
            "type": failure.error_type,
            "code": failure.code,
            "message": redactor.text(failure.message),
        },
        "attempts": attempts,
    }
    return (item.ts, log.request_id, log.key, log.outcome, orjson.dumps(record).decode())
