"""Gateway keys: one per calling service, stored only as hashes."""

from metergate.auth.index import KeyIndex
from metergate.auth.keys import KeyRecord, generate_key, hash_key

__all__ = ["KeyIndex", "KeyRecord", "generate_key", "hash_key"]
