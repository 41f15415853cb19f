"""One ledger row: its own module, shared by the writer and its spool."""

from __future__ import annotations

from typing import NamedTuple


class LedgerRow(NamedTuple):
    """One request as the ledger stores it (a tuple: inserted without conversion)."""

    ts: float
    request_id: str
    key_name: str
    model: str
    upstream: str
    attempts: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_nano: int
    saved_nano: int
    duration_ms: float
    ttft_ms: float | None
    outcome: str
    status: int
    cache_hit: int  # 0/1: INTEGER in both SQLite and PostgreSQL
    stream: int
    usage_estimated: int = 0  # 1: the tokens are the gateway's bound, not the upstream's count
    api: str = "chat"  # the door: chat, responses, messages, completions, embeddings
    team: str | None = None  # the key's team when the request was made
    tags: str | None = None  # JSON object of the request's tags (with defaults), or NULL
