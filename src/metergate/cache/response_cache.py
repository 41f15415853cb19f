"""An in-memory LRU of whole responses, keyed by the exact request, with a TTL.

Keys are a hash of the request body with sorted keys, the model and (unless the cache
is shared) the caller's key name, so one service never receives another's answer.
Only successful non-streamed answers are stored.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from metergate.config.model import CacheConfig
from metergate.providers.base import Usage


@dataclass(frozen=True, slots=True)
class CachedResponse:
    body: bytes
    usage: Usage
    upstream: str
    cost_nano: int  # what the original call cost: the saving of every hit
    expires: float


class ResponseCache:
    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self._entries: OrderedDict[bytes, CachedResponse] = OrderedDict()

    def key(self, kind: str, body: dict[str, Any], key_name: str) -> bytes:
        scope = "" if self.config.shared_across_keys else key_name
        material = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(f"{kind}\0{scope}\0".encode() + material).digest()

    def get(self, key: bytes) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, body: bytes, usage: Usage, upstream: str, cost_nano: int) -> None:
        expires = time.monotonic() + self.config.ttl_seconds
        self._entries[key] = CachedResponse(body, usage, upstream, cost_nano, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self.config.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
