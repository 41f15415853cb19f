"""W3C trace context: take the caller's `traceparent`/`tracestate`, hand ours upstream.

Parsed here by hand (a few string operations) rather than through OpenTelemetry's
propagators and context objects: it runs once per request when tracing is on, and the
ids it makes are the ones the spans built after the request will carry
(`metergate.tracing.spans`), so the upstream sees the same trace as the collector.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

_HEX = frozenset("0123456789abcdef")
_MAX_TRACESTATE = 512
_rng = random.Random(os.urandom(16))  # ids need to be unique, not secret
_RATIO_BOUND = 1 << 64


def new_span_id() -> int:
    while not (value := _rng.getrandbits(64)):
        pass
    return value


def new_trace_id() -> int:
    while not (value := _rng.getrandbits(128)):
        pass
    return value


@dataclass(slots=True)
class TraceContext:
    """One request's place in a trace: the gateway's server span and who its parent is."""

    trace_id: int
    span_id: int  # the gateway's server span
    parent_id: int | None  # the caller's span, when it sent a valid traceparent
    sampled: bool
    tracestate: str | None = None

    def outgoing(self, span_id: int) -> bytes:
        """Header lines for an upstream call made by the span `span_id` (an attempt)."""
        line = b"traceparent: 00-%032x-%016x-%s\r\n" % (
            self.trace_id,
            span_id,
            b"01" if self.sampled else b"00",
        )
        if self.tracestate:
            line += b"tracestate: " + self.tracestate.encode("ascii") + b"\r\n"
        return line


def parse_traceparent(value: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid `traceparent`, else None.

    Version 00 is exactly `00-<32 hex>-<16 hex>-<2 hex>`; a later version may append
    fields after a dash (read as 00, as the spec asks); `ff` and all-zero ids are invalid.
    """
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if len(text) < 55 or text[2] != "-" or text[35] != "-" or text[52] != "-":
        return None
    version, trace, parent, flags = text[:2], text[3:35], text[36:52], text[53:55]
    if not _HEX.issuperset(version + trace + parent + flags) or version == "ff":
        return None
    if len(text) != 55 and (version == "00" or text[55] != "-"):
        return None
    trace_id, parent_id = int(trace, 16), int(parent, 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def clean_tracestate(value: bytes | None) -> str | None:
    """The caller's `tracestate`, passed on as it came when it is sane (printable ASCII,
    at most 512 characters: the spec lets a proxy drop a longer one)."""
    if not value or len(value) > _MAX_TRACESTATE:
        return None
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not text or not text.isprintable():
        return None
    return text


def start_context(headers: dict[bytes, bytes], sample_rate: float) -> TraceContext:
    """The trace of a request that just arrived: the caller's (whose sampled flag decides
    whether it is recorded), or a new one sampled at `sample_rate` by its trace id (as
    OpenTelemetry's TraceIdRatioBased sampler does, so every replica decides alike)."""
    raw = headers.get(b"traceparent")
    parsed = parse_traceparent(raw) if raw else None
    if parsed is not None:
        trace_id, parent_id, sampled = parsed
        tracestate = clean_tracestate(headers.get(b"tracestate"))
        return TraceContext(trace_id, new_span_id(), parent_id, sampled, tracestate)
    trace_id = new_trace_id()
    sampled = (trace_id & (_RATIO_BOUND - 1)) < sample_rate * _RATIO_BOUND
    return TraceContext(trace_id, new_span_id(), None, sampled)
