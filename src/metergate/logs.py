"""The gateway's log lines: one format and level for `serve` and each of its workers
(a worker is a fresh interpreter; without this its INFO lines would be lost)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def configure() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The HTTP clients log every request's full URL at INFO: MCP servers, webhooks and
    # Prometheus URLs may carry a token in their query or path (Slack's hook URLs do).
    for client in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(client).setLevel(logging.WARNING)


class RepeatedFailures:
    """The failures of a loop that retries (a background tick, a refresh), logged so that
    an outage of an hour is a few lines, not one traceback a second: the first failure,
    and one of another kind, with its traceback; the same one again as a line of its
    count at most every `every` seconds; and the first success after, once."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        meanwhile: str = "retrying",
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.what, self.meanwhile = logger, what, meanwhile
        self.every, self.clock = every, clock
        self.kind: type[BaseException] | None = None
        self.failures = 0  # in a row
        self.since = 0.0  # when the run of failures began
        self.logged_at = 0.0

    def failed(self, error: BaseException) -> None:
        """Log `error` (from an `except` block) as the run of failures calls for."""
        now = self.clock()
        if not self.failures:
            self.since = now
        self.failures += 1
        if type(error) is not self.kind:
            self.kind, self.logged_at = type(error), now
            self.logger.error("%s failed; %s", self.what, self.meanwhile, exc_info=error)
        elif now - self.logged_at >= self.every:
            self.logged_at = now
            self.logger.error(
                "%s failed again (%d times in a row over %.0f s; %s): %s: %s",
                self.what,
                self.failures,
                now - self.since,
                self.meanwhile,
                type(error).__name__,
                error,
            )

    def succeeded(self) -> None:
        """Say once that a run of failures has ended."""
        if self.failures:
            self.logger.info(
                "%s works again after %d failures over %.0f s",
                self.what,
                self.failures,
                self.clock() - self.since,
            )
            self.failures, self.kind = 0, None
