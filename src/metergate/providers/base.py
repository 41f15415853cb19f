"""The contract between the gateway and a provider adapter.

The pipeline speaks OpenAI's chat format. An adapter turns one such request into its
provider's wire format, and the provider's answer back into OpenAI's: a complete JSON
body, or a stream of OpenAI `chat.completion.chunk` SSE events. It also reports usage,
which the gateway needs for every request, streamed or not.

A request that came in by another door (Anthropic Messages, the Responses API, legacy
completions) also carries the caller's own request (`NativeRequest`). An adapter whose
provider speaks that protocol (`native_protocols`) serves it as it is, nothing lost, and
answers in that protocol; every other adapter serves the translated chat body.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from metergate.config.model import ProviderConfig, Timeouts
from metergate.errors import InvalidRequest, UpstreamProtocolError

DEFAULT_TIMEOUTS = Timeouts()


@dataclass(slots=True)
class Usage:
    """Tokens of one request. `input_tokens` excludes cached ones, so each type is priced once."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    # Of `input_tokens`, those written to the provider's prompt cache (Anthropic; OpenAI
    # from GPT-5.6 on), priced at the cache-write rate; `cache_write_1h_tokens` is the
    # part kept for an hour (Anthropic's longer retention).
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    # Web searches a provider's server-side tool ran (Anthropic's `web_search`), billed
    # per search on top of the tokens.
    web_searches: int = 0
    # Of `output_tokens`, those the model spent thinking (OpenAI's `reasoning_tokens`,
    # Gemini's `thoughtsTokenCount`): billed as output, reported to callers apart.
    reasoning_tokens: int = 0
    # What the upstream says the request cost, when it says (Perplexity states its
    # tokens, request and tool fees): that is the cost, whatever the price list says.
    billed_nano: int | None = None
    # The processing tier the upstream says it served the request on (OpenAI's
    # `service_tier`: "default", "flex", "priority"), which may be priced apart.
    service_tier: str | None = None

    def served_on(self, answer: dict[str, Any]) -> Usage:
        """This usage, with the tier an OpenAI-format answer (or chunk, or Responses
        object) says it was served on."""
        tier = tier_of(answer)
        if tier is not None:
            self.service_tier = tier
        return self

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> Usage:
        if not usage:
            return cls()
        prompt = token_count(usage, "prompt_tokens")
        details = usage.get("prompt_tokens_details")
        cached = min(prompt, token_count(details, "cached_tokens"))
        found = cls(prompt - cached, cached, token_count(usage, "completion_tokens"))
        if details.__class__ is dict and details.get("cache_write_tokens"):
            found.cache_write_tokens = min(
                found.input_tokens, token_count(details, "cache_write_tokens")
            )
        output = usage.get("completion_tokens_details")
        if output.__class__ is dict and output.get("reasoning_tokens"):
            found.reasoning_tokens = reported_part(output, "reasoning_tokens", found.output_tokens)
        return found

    def to_openai(self) -> dict[str, Any]:
        prompt = self.input_tokens + self.cached_input_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": self.output_tokens,
            "total_tokens": prompt + self.output_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_input_tokens},
        }
        if self.reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage


def tier_of(answer: dict[str, Any]) -> str | None:
    """The processing tier an OpenAI-format answer, chunk or Responses object names."""
    tier = answer.get("service_tier")
    return tier if tier.__class__ is str else None


def reported_part(details: dict[str, Any], field: str, of: int) -> int:
    """A count reported for callers only, not priced (reasoning tokens, part of `of`):
    anything but a whole number is taken as 0 rather than failing a priced answer."""
    value = details.get(field)
    return min(value, of) if type(value) is int and value > 0 else 0


def token_count(usage: Any, field: str) -> int:
    """A count of tokens from an upstream's usage object (absent or null: 0).

    Anything but a whole number of tokens (a negative count, a string) cannot be priced:
    taken as it came, it would refund budgets, run counters backwards or write a negative
    ledger row, so it fails the attempt as a protocol error that names the field."""
    value = usage.get(field) if isinstance(usage, dict) else None
    if type(value) is int and value >= 0:
        return value
    if value is None:
        return 0
    if type(value) is float and value >= 0 and value.is_integer():
        return int(value)  # 12.0 from some JSON encoders
    raise UpstreamProtocolError(
        f"the upstream reported an unusable token count ({field}: {str(value)[:40]!r}); "
        "the answer cannot be priced"
    )


@dataclass(slots=True)
class NativeRequest:
    """The caller's request in its own protocol, for upstreams that speak it natively.

    `protocol` is the door's: "messages" (Anthropic), "responses" or "completions"
    (OpenAI). `untranslatable` says why the chat translation had to leave something out
    (a server-side tool, say): an upstream that cannot serve the request natively then
    refuses it with a 400 instead of answering a different question.
    """

    protocol: str
    body: dict[str, Any]  # adapters must not mutate it; the model id is theirs to set
    headers: dict[str, str] = field(default_factory=dict)  # protocol headers to forward
    untranslatable: str | None = None

    def served_by(self, adapter: Adapter) -> NativeRequest | None:
        """This request when `adapter` serves it natively; None when it gets the chat body."""
        if self.protocol in adapter.native_protocols:
            return self
        if self.untranslatable is not None:
            raise InvalidRequest(
                f"{self.untranslatable}; upstream provider {adapter.name!r} "
                f"({adapter.config.type}) cannot serve it"
            )
        return None


@dataclass(slots=True)
class UpstreamCall:
    """One attempt against one upstream deployment."""

    body: dict[str, Any]  # the caller's request, OpenAI shape; adapters must not mutate it
    model: str  # the provider's own model id for this deployment
    include_usage: bool = False  # streaming only: the caller asked for the usage chunk
    timeouts: Timeouts = DEFAULT_TIMEOUTS  # the deployment's (upstream or provider) timeouts
    native: NativeRequest | None = None  # set when this adapter serves the caller's protocol
    extra_headers: bytes = b""  # per-attempt header lines (CRLF-ended), e.g. traceparent


@dataclass(slots=True)
class Completion:
    """A finished non-streaming answer, already in OpenAI's JSON format."""

    body: bytes
    usage: Usage
    reported: bool = True  # False: the answer said nothing of usage (the gateway estimates)


@dataclass(slots=True)
class StreamState:
    """Filled in by an adapter while it streams, read by the gateway when the stream ends."""

    usage: Usage | None = None
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the processing tier the first event named (OpenAI's chunks each name it): the
    # tier of a stream that ends before its usage says
    service_tier: str | None = None
    # the upstream's closing event (Messages' message_stop, Responses' completion) has
    # been relayed as it came: a caller that leaves now has had the whole answer
    ended: bool = False
    # the output limit the adapter sent for a caller that set none (Anthropic requires
    # one): it bounds what a cut stream may be billed, as the caller's own would; 0: none
    output_limit: int = 0

    def forget(self) -> None:
        """Drop what an attempt that failed before its first chunk filled in (the usage
        its opening reported, its limit): the next attempt, maybe at another provider,
        starts afresh."""
        fresh = StreamState()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))


class Adapter(abc.ABC):
    """One instance per configured provider; holds its pooled HTTP client."""

    supports_embeddings = False
    native_protocols: frozenset[str] = frozenset()  # doors' protocols served as they are

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config

    async def start(self) -> None:
        """Open pooled connections; called once at startup, inside the event loop."""

    async def close(self) -> None:
        """Release connections at shutdown."""

    @abc.abstractmethod
    async def chat(self, call: UpstreamCall) -> Completion: ...

    @abc.abstractmethod
    def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        """Yield OpenAI SSE bytes (one or more whole `data: ...\\n\\n` events per item)."""

    async def embeddings(self, call: UpstreamCall) -> Completion:
        raise InvalidRequest(
            f"provider {self.name!r} ({self.config.type}) does not serve embeddings"
        )
