"""An in-memory LRU of whole responses, keyed by the exact request, with a TTL.

Keys are a hash of the request body with sorted keys, the model and (unless the cache
is shared) the caller's key name, so one service never receives another's answer.
Only successful non-streamed answers are stored, and only those of at most
`max_entry_kb`: one big answer (an embeddings batch is megabytes) would otherwise push out
hundreds of small ones, or hold up the hot path while it is written to Redis.

The in-process LRU is bounded twice: by `max_entries`, and by `max_mb` of answers (each
counted with `ENTRY_OVERHEAD` for its key and bookkeeping), so a cache of big answers
cannot grow the process without bound.

With Redis configured, `lookup` and `store` use the shared store (one cached answer
serves the whole fleet) and fall back to this process's LRU while Redis is unreachable.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from metergate.config.model import CacheConfig
from metergate.providers.base import Usage
from metergate.shared.errors import Unavailable

if TYPE_CHECKING:
    from metergate.shared.cache import SharedCache

ENTRY_OVERHEAD = 400  # bytes of an entry beside its answer: key, record, LRU links


@dataclass(frozen=True, slots=True)
class CachedResponse:
    body: bytes
    usage: Usage
    upstream: str
    cost_nano: int  # what the original call cost: the saving of every hit
    expires: float  # monotonic; in-process entries only (Redis expires its own)


class ResponseCache:
    def __init__(self, config: CacheConfig, shared: SharedCache | None = None) -> None:
        self.config = config
        self.shared = shared
        self._entries: OrderedDict[bytes, CachedResponse] = OrderedDict()
        self.max_bytes = int(config.max_mb * 1024 * 1024)
        self.max_entry_bytes = int(config.max_entry_kb * 1024)
        self.bytes = 0  # what the in-process entries hold, overheads included

    async def lookup(self, key: bytes) -> CachedResponse | None:
        """The shared store when Redis is reachable, else this process's LRU."""
        if self.shared is not None and self.shared.link.up:
            try:
                raw = await self.shared.get(key)
            except Unavailable:
                return self.get(key)
            return None if raw is None else _decode(raw)
        return self.get(key)

    async def store(
        self, key: bytes, body: bytes, usage: Usage, upstream: str, cost_nano: int
    ) -> None:
        """Keep an answer of at most `max_entry_kb`; a bigger one is not stored."""
        if len(body) > self.max_entry_bytes:
            return
        if self.shared is not None and self.shared.link.up:
            head = orjson.dumps(
                [
                    usage.input_tokens,
                    usage.cached_input_tokens,
                    usage.output_tokens,
                    upstream,
                    cost_nano,
                ]
            )
            try:
                await self.shared.set(key, head + b"\n" + body, self.config.ttl_seconds)
                return
            except Unavailable:
                pass
        self.put(key, body, usage, upstream, cost_nano)

    def key(self, kind: str, body: dict[str, Any], key_name: str, version: bytes = b"") -> bytes:
        """`version`: what the model's answers depend on in the config (`Route.version`),
        so that a reload that changes its upstreams or prices does not serve older ones."""
        scope = "" if self.config.shared_across_keys else key_name
        material = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(f"{kind}\0{scope}\0".encode() + version + material).digest()

    def get(self, key: bytes) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, body: bytes, usage: Usage, upstream: str, cost_nano: int) -> None:
        if key in self._entries:  # replaced, or (too big to keep) no longer the latest
            self._drop(key)
        size = len(body) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        expires = time.monotonic() + self.config.ttl_seconds
        self._entries[key] = CachedResponse(body, usage, upstream, cost_nano, expires)
        self.bytes += size
        while len(self._entries) > self.config.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))  # the least recently used

    def _drop(self, key: bytes) -> None:
        self.bytes -= len(self._entries.pop(key).body) + ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._entries)


def _decode(raw: bytes) -> CachedResponse:
    """A shared entry: one JSON line of metadata, then the answer's bytes."""
    head, _, body = raw.partition(b"\n")
    input_tokens, cached, output, upstream, cost_nano = orjson.loads(head)
    return CachedResponse(body, Usage(input_tokens, cached, output), upstream, cost_nano, 0.0)
