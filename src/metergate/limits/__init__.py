"""Per-request limits: max_tokens caps."""

from metergate.limits.caps import apply_max_tokens_cap, requested_max_tokens

__all__ = ["apply_max_tokens_cap", "requested_max_tokens"]
