"""The shared-state failure, importable without loading the Redis client."""


class Unavailable(Exception):
    """A shared-state call failed; the link is now down and recovering."""
