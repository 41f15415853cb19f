"""The doors: each client protocol the gateway speaks, as a translator around one pipeline.

Every model call, whatever door it came in by, goes through `api.chat.CompletionsHandler`:
authenticate, route, cap, cache, admit (rate limits and the budget hold), dispatch with
retries, fallbacks, circuit breakers and rollouts, settle, meter. A door only says how
its protocol enters that pipeline and leaves it:

- `enter`: validate the caller's request and turn it into the pipeline's OpenAI chat body,
  keeping the request as it came (`NativeRequest`) for upstreams that speak the protocol;
- `answer` / `relay`: turn the upstream's answer or stream (chat, or native when the
  upstream spoke the door's protocol) into the door's protocol;
- `error`: the door's error shape and status.

The chat and embeddings doors are the identity: their bodies are already the pipeline's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from metergate.asgi import Request
from metergate.auth.keys import KeyRecord
from metergate.errors import GatewayError, InvalidRequest
from metergate.metering.estimate import NO_EXTRAS, Extras
from metergate.providers.base import Completion, NativeRequest, StreamState
from metergate.routing.dispatch import Kind
from metergate.routing.router import Deployment
from metergate.runtime import Plan


class Exchange:
    """One request as the pipeline sees it, whatever door it came in by."""

    __slots__ = ("added_bytes", "body", "context", "native", "stream")

    def __init__(
        self,
        body: dict[str, Any],
        stream: bool,
        native: NativeRequest | None = None,
        context: Any = None,
        added_bytes: int = 0,
    ) -> None:
        self.body = body  # OpenAI chat (or embeddings) shape: caps, estimates, adapters
        self.stream = stream
        self.native = native  # the caller's own request, for upstreams that speak it
        self.context = context  # what the door needs again to answer
        # bytes of prompt the door added to the caller's (a stored conversation), which
        # the budget hold bounds like the caller's own bytes
        self.added_bytes = added_bytes

    def passthrough(self, deployment: Deployment) -> bool:
        """Did `deployment` get the caller's request as it was (so it answered in kind)?"""
        native = self.native
        return native is not None and native.protocol in deployment.adapter.native_protocols


class Relay(Protocol):
    """Turns one stream of the pipeline into the door's protocol, chunk by chunk."""

    def feed(self, chunk: bytes) -> bytes: ...

    async def end(self) -> bytes:
        """The stream's last events, once the upstream's ended completely."""
        ...

    async def failed(self, error: GatewayError) -> bytes:
        """The events that end the stream when it broke after its first byte."""
        ...


def check_integer(body: dict[str, Any], name: str, least: int | None) -> None:
    """A 400 naming `name` unless it is absent or an integer of at least `least` (JSON's
    true/false are not numbers here, although Python's bool is an int)."""
    value = body.get(name)
    if value is None or (type(value) is int and (least is None or value >= least)):
        return
    wanted = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}[least]
    got = "a boolean" if isinstance(value, bool) else f"{value!r}"[:40]
    raise InvalidRequest(f"`{name}` must be {wanted}, not {got}", param=name)


def check_number(body: dict[str, Any], name: str) -> None:
    """A 400 naming `name` unless it is absent or a number (`temperature`, `top_p`, ...).
    Every provider refuses any other type; refused there, the caller's mistake would
    count as the upstream's in error rates and rollout judgments."""
    value = body.get(name)
    if value is None or type(value) is float or type(value) is int:
        return
    got = "a boolean" if isinstance(value, bool) else f"{value!r}"[:40]
    raise InvalidRequest(f"`{name}` must be a number, not {got}", param=name)


def check_stop(body: dict[str, Any], name: str) -> None:
    """A 400 naming `name` unless it is absent, a string or an array of strings."""
    value = body.get(name)
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return
    raise InvalidRequest(f"`{name}` must be a string or an array of strings", param=name)


def is_web_search(tool: Any) -> bool:
    """A provider's built-in web search tool (Anthropic's `web_search_2025...`, OpenAI's
    `web_search`, `web_search_preview`), billed per search."""
    return isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search")


def search_limit(holder: dict[str, Any], field: str, max_searches: int, bound: bool) -> int:
    """The most searches `holder[field]` lets run. Absent: `max_searches`, also written
    there when `bound` (a hard budget applies), so the upstream keeps to what the hold
    was taken for. Malformed: `max_searches` (the provider refuses it with a 400)."""
    limit = holder.get(field)
    if limit is None:
        if bound:
            holder[field] = max_searches
        return max_searches
    return limit if type(limit) is int and limit >= 0 else max_searches


class Door:
    """The chat completions door: the pipeline's own protocol, passed through."""

    api: ClassVar[str] = "chat"  # the `api` of metrics and ledger rows
    kind: ClassVar[Kind] = "chat"  # what the adapters are asked: chat or embeddings
    max_tokens_field: ClassVar[str] = "max_tokens"  # its name in the native request

    async def enter(
        self, request: Request, body: dict[str, Any], key: KeyRecord, plan: Plan
    ) -> Exchange:
        raise NotImplementedError

    def extras(self, exchange: Exchange, max_searches: int, bound: bool) -> Extras:
        """What the request may cost beyond its tokens (`metering.estimate.Extras`), for
        its budget hold. `bound`: a hard budget applies, so a web search tool without a
        limit gets `max_searches` as its own. Chat bodies carry neither."""
        return NO_EXTRAS

    def cache_material(self, exchange: Exchange) -> dict[str, Any]:
        """What identifies the answer: the caller's own request."""
        return exchange.native.body if exchange.native is not None else exchange.body

    async def answer(
        self, exchange: Exchange, deployment: Deployment, completion: Completion, key: KeyRecord
    ) -> bytes:
        return completion.body

    async def from_cache(self, exchange: Exchange, body: bytes, key: KeyRecord) -> bytes:
        return body

    def relay(self, exchange: Exchange, deployment: Deployment, state: StreamState) -> Relay | None:
        """None: the stream's chunks go to the caller as they are."""
        return None

    def error(self, error: GatewayError) -> tuple[int, bytes]:
        """Status and body of an error answer."""
        return error.status, error.body()
