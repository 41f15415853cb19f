"""The key index reads only the keys changed since it last looked (each change of a key
carries the next number of one counter), misses no change when several processes change
keys at once, and still reads everything again now and then, for changes made without a
number. On SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from metergate.auth.index import KeyIndex
from metergate.auth.keys import KeyRecord
from metergate.errors import Unauthorized
from metergate.storage import keys as store
from metergate.storage.database import Database, open_database


class CountingLoader:
    """`keys_changed` on a database, remembering how many keys each read returned."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.reads: list[int] = []

    async def __call__(self, since: int) -> tuple[list[KeyRecord], int]:
        records, last = await store.keys_changed(self.database, since)
        self.reads.append(len(records))
        return records, last

    async def lookup(self, digests: Any) -> list[KeyRecord]:
        return await store.find_keys(self.database, digests)


def bearer(secret: str) -> dict[bytes, bytes]:
    return {b"authorization": f"Bearer {secret}".encode()}


async def test_a_refresh_reads_only_the_keys_changed_since(database_url: str) -> None:
    database = await open_database(database_url)
    try:
        secrets = [(await store.create_key(database, f"svc-{n}"))[0] for n in range(3)]
        loader = CountingLoader(database)
        index = KeyIndex(loader, loader.lookup)
        await index.reload()
        assert loader.reads == [3]
        await index.refresh()
        assert loader.reads[-1] == 0  # nothing changed

        assert await store.revoke_key(database, "svc-0") == 1
        await index.refresh()
        assert loader.reads[-1] == 1
        with pytest.raises(Unauthorized, match="was revoked"):
            await index.authenticate(bearer(secrets[0]))

        changed = await store.change_key(
            database, (await index.authenticate(bearer(secrets[1]))).id, {"models": ["gpt"]}
        )
        assert changed is not None
        third = (await index.authenticate(bearer(secrets[2]))).id
        await store.change_key(database, third, {"tags": {"feature": "search"}})
        await index.refresh()
        assert loader.reads[-1] == 2
        assert (await index.authenticate(bearer(secrets[1]))).models == ("gpt",)
        assert (await index.authenticate(bearer(secrets[2]))).tags == (("feature", "search"),)
        await index.refresh()
        assert loader.reads[-1] == 0
    finally:
        await database.close()


async def test_changes_made_at_once_by_several_processes_are_all_read(
    database_url: str,
) -> None:
    """Writers on their own connections create and revoke keys while a reader refreshes
    between their commits: what it has read in parts ends equal to a full read."""
    writers = [await open_database(database_url) for _ in range(4)]
    reader = await open_database(database_url)
    try:
        loader = CountingLoader(reader)
        index = KeyIndex(loader, loader.lookup)
        await index.reload()
        done = asyncio.Event()

        async def write(database: Database, n: int) -> None:
            for round_ in range(15):
                _, record = await store.create_key(database, f"w{n}-{round_}", models=["m"])
                if round_ % 3 == 0:
                    await store.revoke_key(database, f"w{n}-{round_}")
                else:
                    await store.change_key(database, record.id, {"tags": {"r": "1"}})

        async def read() -> None:
            while not done.is_set():
                await index.refresh()
                await asyncio.sleep(0)

        reading = asyncio.create_task(read())
        await asyncio.gather(*(write(database, n) for n, database in enumerate(writers)))
        done.set()
        await reading
        await index.refresh()
        incremental = {record.id: record for record in index.records()}
        full = {record.id: record for record in await store.list_keys(reader)}
        assert len(full) == 60 and incremental == full
        assert sum(1 for record in full.values() if record.revoked_at is not None) == 20
        assert len([read for read in loader.reads[1:] if read]) > 1  # read in parts
    finally:
        for database in (*writers, reader):
            await database.close()


async def test_a_change_made_without_a_number_is_read_by_the_full_reload(
    database_url: str,
) -> None:
    """A key revoked by hand in the database (or by an older gateway during an upgrade)
    carries no change number: the periodic full reload still stops it."""
    database = await open_database(database_url)
    try:
        secret, record = await store.create_key(database, "by-hand")
        loader = CountingLoader(database)
        index = KeyIndex(loader, loader.lookup, refresh_seconds=0.05, full_reload_seconds=0.5)
        await index.start()
        try:
            await database.execute(
                "UPDATE keys SET revoked_at = ? WHERE id = ?", (time.time(), record.id)
            )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    await index.authenticate(bearer(secret))
                except Unauthorized as refused:
                    assert "was revoked" in refused.message
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the key revoked by hand was never refused")
        finally:
            await index.close()
    finally:
        await database.close()
