"""Responses API answers kept in the ledger database (`store: true`, OpenAI's default).

Each row is one response: the input items of its request (as the caller sent them), the
response object, the response it continued (`previous_response_id`), and the gateway key
that made it, which alone may read or delete it. A conversation is read back in one
recursive query, oldest turn first, so `previous_response_id` works whatever upstream
served each turn.

Storage is bounded two ways (`responses:` in the config): rows older than the retention
are no longer read and are deleted by `purge`, which also deletes the oldest rows while
the stored total is above `max_stored_mb`.
"""

from __future__ import annotations

from typing import Any

import orjson

from metergate.storage.database import Database

MAX_TURNS = 10_000  # a conversation longer than this is cut at its oldest turns
_PURGE_BATCH = 500


class BrokenChain(Exception):
    """A response of the conversation (not the last) was deleted or has expired."""

    def __init__(self, missing: str) -> None:
        super().__init__(missing)
        self.missing = missing


class ResponseStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def save(
        self,
        key_id: str,
        response: dict[str, Any],
        items: list[Any],
        previous_id: str | None,
        now: float,
        retention_seconds: float,
    ) -> None:
        stored_input = orjson.dumps(items).decode()
        stored_response = orjson.dumps(response).decode()
        await self.database.execute(
            "INSERT INTO stored_responses (id, key_id, previous_id, created_at, expires_at, "
            "size, input, response) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (
                response["id"],
                key_id,
                previous_id,
                now,
                now + retention_seconds,
                len(stored_input) + len(stored_response),
                stored_input,
                stored_response,
            ),
        )

    async def get(self, response_id: str, key_id: str, now: float) -> dict[str, Any] | None:
        rows = await self.database.fetch(
            "SELECT response FROM stored_responses WHERE id = ? AND key_id = ? AND expires_at > ?",
            (response_id, key_id, now),
        )
        return orjson.loads(rows[0][0]) if rows else None

    async def input_items(self, response_id: str, key_id: str, now: float) -> list[Any] | None:
        rows = await self.database.fetch(
            "SELECT input FROM stored_responses WHERE id = ? AND key_id = ? AND expires_at > ?",
            (response_id, key_id, now),
        )
        return orjson.loads(rows[0][0]) if rows else None

    async def conversation(self, response_id: str, key_id: str, now: float) -> list[Any] | None:
        """Every item of the conversation up to and including `response_id`'s output,
        oldest first; None when that response is not this key's (or is gone)."""
        rows = await self.database.fetch(
            "WITH RECURSIVE chain (previous_id, input, response, depth) AS ("
            " SELECT previous_id, input, response, 0 FROM stored_responses"
            " WHERE id = ? AND key_id = ? AND expires_at > ?"
            " UNION ALL"
            " SELECT r.previous_id, r.input, r.response, c.depth + 1"
            " FROM stored_responses r JOIN chain c ON r.id = c.previous_id"
            " WHERE r.key_id = ? AND r.expires_at > ? AND c.depth < ?"
            ") SELECT previous_id, input, response, depth FROM chain ORDER BY depth DESC",
            (response_id, key_id, now, key_id, now, MAX_TURNS),
        )
        if not rows:
            return None
        oldest_previous, _, _, depth = rows[0]
        if oldest_previous is not None and depth < MAX_TURNS:
            raise BrokenChain(oldest_previous)
        items: list[Any] = []
        for _, stored_input, stored_response, _ in rows:
            items += orjson.loads(stored_input)
            items += orjson.loads(stored_response).get("output") or []
        return items

    async def delete(self, response_id: str, key_id: str) -> bool:
        found = await self.database.fetch(
            "SELECT 1 FROM stored_responses WHERE id = ? AND key_id = ?", (response_id, key_id)
        )
        if found:
            await self.database.execute(
                "DELETE FROM stored_responses WHERE id = ? AND key_id = ?", (response_id, key_id)
            )
        return bool(found)

    async def purge(self, now: float, max_bytes: int) -> int:
        """Delete expired rows, then the oldest while the total is above `max_bytes`."""
        expired = await self.database.fetch(
            "SELECT COUNT(*) FROM stored_responses WHERE expires_at <= ?", (now,)
        )
        await self.database.execute("DELETE FROM stored_responses WHERE expires_at <= ?", (now,))
        deleted = int(expired[0][0])
        total = await self.database.fetch("SELECT COALESCE(SUM(size), 0) FROM stored_responses")
        excess = int(total[0][0]) - max_bytes
        while excess > 0:
            oldest = await self.database.fetch(
                "SELECT id, size FROM stored_responses ORDER BY created_at LIMIT ?",
                (_PURGE_BATCH,),
            )
            if not oldest:
                break
            victims: list[str] = []
            for response_id, size in oldest:
                if excess <= 0:
                    break
                victims.append(response_id)
                excess -= int(size)
            marks = ", ".join("?" for _ in victims)
            await self.database.execute(
                f"DELETE FROM stored_responses WHERE id IN ({marks})", tuple(victims)
            )
            deleted += len(victims)
        return deleted
