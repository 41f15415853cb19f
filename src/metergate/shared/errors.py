"""The shared-state failure, importable without loading the Redis client."""


class Unavailable(Exception):
    """A shared-state call failed; the link is now down and recovering.

    `uncertain`: the call went out and no answer came, so Redis may still run it (a
    stalled server runs what it received once it resumes); otherwise it surely did not
    run (refused before it was sent, or answered with an error)."""

    def __init__(self, message: str, uncertain: bool = False) -> None:
        super().__init__(message)
        self.uncertain = uncertain
