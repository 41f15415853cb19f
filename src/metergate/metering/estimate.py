"""Token estimates for when exact usage is not (yet) known.

Used to reserve budget before a call and to charge a stream the caller abandoned
before the upstream reported usage. Four characters per token is the usual rule of
thumb for English text; estimates are only ever stand-ins for reported usage.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# Room kept, in request bytes, for the `"max_tokens": N` a refused caller is told to add.
_FIELD_BYTES = 32


@dataclass(frozen=True, slots=True)
class WorstCase:
    """An upper bound on a request's cost, reserved against budgets before the call, and
    what it is made of, so that a refusal can say which `max_tokens` would fit."""

    nano: int
    byte_pico: int  # a request byte's part (one token per byte, at the dearest input price)
    prompt_pico: int  # the prompt's part: every byte of the request body
    token_pico: int  # what one more max_tokens adds: `n` choices at the output price
    max_tokens: int  # 0 when the request has none (no budget applies then)
    assumed: bool = False  # max_tokens is the model's budget_max_tokens, not the caller's

    def fitting_max_tokens(self, available_nano: int) -> int:
        """The largest max_tokens whose worst case, once the caller adds it to the
        request, fits in `available_nano`; 0 when none does."""
        room = available_nano * 1000 - self.prompt_pico - _FIELD_BYTES * self.byte_pico
        if room < self.token_pico:
            return 0
        return self.max_tokens if self.token_pico == 0 else room // self.token_pico


def worst_case(
    body_size: int, body: dict[str, Any], prices: UnitPrices, assumed: bool = False
) -> WorstCase:
    """A token is at least one byte of the request, so the body's size in bytes bounds
    the prompt; the output is bounded by max_tokens for each of the `n` choices."""
    output = int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
    byte = max(prices.input, prices.cached_input)
    prompt = body_size * byte
    token = int(body.get("n") or 1) * prices.output
    nano = (prompt + output * token + 999) // 1000
    return WorstCase(nano, byte, prompt, token, output, assumed)
