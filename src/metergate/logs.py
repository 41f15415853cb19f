"""The gateway's log lines: one format and level for `serve` and each of its workers
(a worker is a fresh interpreter; without this its INFO lines would be lost)."""

from __future__ import annotations

import logging


def configure() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The HTTP clients log every request's full URL at INFO: MCP servers, webhooks and
    # Prometheus URLs may carry a token in their query or path (Slack's hook URLs do).
    for client in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(client).setLevel(logging.WARNING)
