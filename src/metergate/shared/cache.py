"""Cached answers in Redis, so an answer one gateway stored is a hit on every gateway.

Entries are plain strings with a TTL (`SET ... PX`), sent with admission's script calls
on the link's own connection (`RedisLink.send`). The LRU bound is Redis's: give it
a `maxmemory` and `maxmemory-policy allkeys-lru`, and it evicts the least recently used
entries (`cache.max_entries` applies to the in-process cache only).
"""

from __future__ import annotations

from metergate.shared.redis import RedisLink


class SharedCache:
    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.prefix = f"{link.prefix}cache:"

    async def get(self, key: bytes) -> bytes | None:
        """The stored entry, or None; raises `Unavailable` when Redis is unreachable."""
        value = await self.link.send("GET", self.prefix + key.hex())
        return value if isinstance(value, bytes) else None

    async def set(self, key: bytes, value: bytes, ttl_seconds: float) -> None:
        ttl_ms = max(1, int(ttl_seconds * 1000))
        await self.link.send("SET", self.prefix + key.hex(), value, "PX", ttl_ms)
