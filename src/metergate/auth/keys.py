"""Key format and hashing.

A key is `mgk_` plus 43 URL-safe characters (256 random bits). It is stored as its
SHA-256: with that much entropy a slow password hash buys nothing, and a fast one keeps
authentication to a microsecond on the hot path.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Literal

PREFIX = "mgk_"
_SHAPE = re.compile(r"^mgk_[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the gateway knows of a key: never the secret itself."""

    id: str
    name: str
    key_hash: str
    hint: str  # last four characters, so an operator can tell keys apart
    models: tuple[str, ...] | None  # None: every model
    created_at: float
    revoked_at: float | None = None
    max_tokens_cap: int | None = None
    team: str | None = None  # its team: team budgets and rate limits apply on top of its own
    tags: tuple[tuple[str, str], ...] = ()  # default tags of its requests, (name, value)
    expires_at: float | None = None  # refused from then on (epoch seconds); None: never
    # its own limits of budgets for each key, (budget name, nano-USD): a plan's key
    budget_limits: tuple[tuple[str, int], ...] = ()
    # its own requests and tokens per minute, replacing `rate_limits.keys."*"` for it
    # (a named entry there still wins); None when it has neither
    rates: tuple[int | None, int | None] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def state(self, now: float) -> Literal["active", "expired", "revoked"]:
        if self.revoked_at is not None:
            return "revoked"
        expires = self.expires_at
        return "expired" if expires is not None and expires <= now else "active"


def generate_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def well_formed(secret: str) -> bool:
    return _SHAPE.match(secret) is not None
