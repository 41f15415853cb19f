"""Exact-match response cache for non-streamed requests."""

from metergate.cache.response_cache import CachedResponse, ResponseCache

__all__ = ["CachedResponse", "ResponseCache"]
