"""Durable storage: the usage ledger, keys and config history, on SQLite or PostgreSQL."""

from metergate.storage.database import Database, open_database

__all__ = ["Database", "open_database"]
