"""max_tokens caps per model and per key: clamp the request or refuse it, as configured."""

from __future__ import annotations

from typing import Any

from metergate.auth.keys import KeyRecord
from metergate.config.model import ModelConfig
from metergate.errors import InvalidRequest

_FIELDS = ("max_completion_tokens", "max_tokens")


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    for name in _FIELDS:
        value = body.get(name)
        if value is not None:
            return int(value)
    return None


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
    field = next((name for name in _FIELDS if body.get(name) is not None), "max_tokens")
    body[field] = cap
