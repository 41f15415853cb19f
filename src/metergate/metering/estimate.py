"""Token estimates for when exact usage is not (yet) known.

Used to reserve budget before a call and to charge a stream the caller abandoned
before the upstream reported usage. Four characters per token is the usual rule of
thumb for English text; estimates are only ever stand-ins for reported usage.
"""

from __future__ import annotations

from typing import Any

import orjson

from metergate.metering.pricing import UnitPrices
from metergate.providers.base import Usage

CHARS_PER_TOKEN = 4


def prompt_tokens(body: dict[str, Any]) -> int:
    size = len(orjson.dumps(body.get("messages") or body.get("input") or ""))
    return (size + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def abandoned_stream(body: dict[str, Any], events_relayed: int) -> Usage:
    """Usage of a stream cut short: the prompt, and about one token per relayed event."""
    return Usage(input_tokens=prompt_tokens(body), output_tokens=max(0, events_relayed - 1))


def worst_case_nano(body_size: int, body: dict[str, Any], prices: UnitPrices) -> int:
    """An upper bound on a request's cost, reserved against budgets before the call.

    A token is at least one byte of the request, so the body's size in bytes bounds
    the prompt; the output is bounded by max_tokens for each of the `n` choices.
    """
    output = int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
    output *= int(body.get("n") or 1)
    pico = body_size * max(prices.input, prices.cached_input) + output * prices.output
    return (pico + 999) // 1000
