"""max_tokens caps per model and per key: clamp the request or refuse it, as configured."""

from __future__ import annotations

from typing import Any

from metergate.auth.keys import KeyRecord
from metergate.config.model import ModelConfig
from metergate.errors import InvalidRequest

_FIELDS = ("max_completion_tokens", "max_tokens")


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    """The most output the request lets an upstream generate: with both fields set, the
    larger, since upstreams differ in which one they read (DeepSeek reads `max_tokens`
    alone)."""
    asked = [int(body[name]) for name in _FIELDS if body.get(name) is not None]
    return max(asked) if asked else None


def apply_max_tokens_cap(body: dict[str, Any], model: ModelConfig, key: KeyRecord) -> None:
    """Enforce the smaller of the model's and the key's cap on the request body."""
    caps = [cap for cap in (model.max_tokens_cap, key.max_tokens_cap) if cap is not None]
    if not caps:
        return
    cap = min(caps)
    asked = requested_max_tokens(body)
    if asked is not None and asked <= cap:
        return
    if asked is not None and model.over_cap == "reject":
        raise InvalidRequest(
            f"max_tokens {asked} is above this key's and model's cap of {cap}; "
            f"ask for at most {cap}",
            code="max_tokens_over_cap",
            param="max_tokens",
        )
    # Every field set is brought down to the cap (upstreams differ in which they read).
    for name in [name for name in _FIELDS if body.get(name) is not None] or ["max_tokens"]:
        value = body.get(name)
        body[name] = cap if value is None else min(int(value), cap)
