"""The in-memory key index the hot path authenticates against.

Keys live in the database (created and revoked by the CLI); the index reloads them when
they change, checked every `refresh_seconds` and, rate-limited, when an unknown key is
presented, so a new key works at once and a revoked one stops within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from metergate.auth.keys import PREFIX, KeyRecord, hash_key, well_formed
from metergate.errors import Unauthorized

log = logging.getLogger("metergate.auth")

Loader = Callable[[], Awaitable[list[KeyRecord]]]


class KeyIndex:
    def __init__(self, load: Loader, refresh_seconds: float = 2.0) -> None:
        self._load = load
        self._by_hash: dict[str, KeyRecord] = {}
        self._refresh_seconds = refresh_seconds
        self._last_load = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.create_task(self._refresh_forever(), name="key-refresh")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

    async def reload(self) -> None:
        records = await self._load()
        self._by_hash = {record.key_hash: record for record in records}
        self._last_load = time.monotonic()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.reload()
            except Exception:
                log.exception("could not reload gateway keys; keeping the previous set")

    async def authenticate(self, headers: dict[bytes, bytes]) -> KeyRecord:
        """Return the key of a request or raise a 401 that says what is wrong with it."""
        secret = _presented_key(headers)
        digest = hash_key(secret)
        record = self._by_hash.get(digest)
        if record is None and time.monotonic() - self._last_load > 0.5:
            self._last_load = time.monotonic()  # one reload at a time, at most 2/s
            await self.reload()
            record = self._by_hash.get(digest)
        if record is None:
            raise Unauthorized(
                "unknown API key: no gateway key matches; create one with "
                "`metergate keys create --name SERVICE`",
                code="invalid_api_key",
            )
        if record.revoked_at is not None:
            raise Unauthorized(
                f"API key {record.name!r} (…{record.hint}) was revoked; "
                "ask the operator for a new key",
                code="revoked_api_key",
            )
        return record

    def __len__(self) -> int:
        return sum(1 for record in self._by_hash.values() if record.revoked_at is None)


def _presented_key(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"authorization")
    if raw is not None:
        scheme, _, value = raw.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized(
                "malformed Authorization header: expected `Authorization: Bearer mgk_...`",
                code="malformed_api_key",
            )
        secret = value.strip()
    elif (api_key := headers.get(b"x-api-key")) is not None:
        secret = api_key.decode("latin-1").strip()
    else:
        raise Unauthorized(
            "no API key: send your gateway key as `Authorization: Bearer mgk_...`",
            code="missing_api_key",
        )
    if not well_formed(secret):
        raise Unauthorized(
            f"malformed API key: gateway keys start with {PREFIX} followed by 43 "
            "characters; this is not a metergate key (a provider key will not work here)",
            code="malformed_api_key",
        )
    return secret
