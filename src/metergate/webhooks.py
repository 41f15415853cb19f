"""Notices (budget thresholds, rollout transitions) to webhooks, sent off the request path.

The payload is Slack's incoming-webhook shape (`text`), which most chat tools accept;
the structured fields ride along for receivers that want them.

A notice is sent once per event, so losing it to a passing failure would lose the
alert: a receiver that cannot be reached, times out, answers 429 or a 5xx is tried
again, up to `ATTEMPTS` times in all, waiting 1, 2, 4 s (or its `Retry-After`, up to
`MAX_WAIT_SECONDS`). Any other answer is final. Only its status and headers are read:
a body is of no use here, and a URL that points at something else than a webhook could
send gigabytes. What is logged names the receiver's host only: a webhook URL's path,
query or user part often is its secret.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx2


log = logging.getLogger("metergate.webhooks")

ATTEMPTS = 4
FIRST_WAIT_SECONDS = 1.0
MAX_WAIT_SECONDS = 30.0


class WebhookNotifier:
    def __init__(self, timeout: float = 10, first_wait: float = FIRST_WAIT_SECONDS) -> None:
        self._session: httpx2.AsyncClient | None = None
        self._timeout = timeout
        self._first_wait = first_wait
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, url: str, text: str, fields: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._post(url, {"text": text, **fields}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, payload: dict[str, Any]) -> None:
        import httpx2  # loaded only when a notice is actually sent

        if self._session is None:
            self._session = httpx2.AsyncClient(timeout=self._timeout)
        host = _host(url)
        for attempt in range(1, ATTEMPTS + 1):
            wait: float | None = None
            try:
                async with self._session.stream("POST", url, json=payload) as response:
                    status, retry_after = response.status_code, response.headers.get("retry-after")
            except httpx2.TransportError as exc:  # unreachable, reset, timed out
                problem = f"failed: {type(exc).__name__}"
            except Exception as exc:  # a URL it cannot send to, say: trying again cannot help
                log.warning("webhook %s failed: %s", host, type(exc).__name__)
                return
            else:
                if status < 300:
                    return
                problem = f"answered {status}"
                if status != 429 and status < 500:
                    log.warning("webhook %s %s; not sent again", host, problem)
                    return
                wait = _retry_after(retry_after)
            if attempt == ATTEMPTS:
                log.warning("webhook %s %s; gave up after %d attempts", host, problem, attempt)
                return
            if wait is None:
                wait = self._first_wait * 2 ** (attempt - 1)
            log.info("webhook %s %s; trying again in %.0f s", host, problem, wait)
            await asyncio.sleep(min(wait, MAX_WAIT_SECONDS))

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
            for task in self._tasks:  # still waiting to try again: the process is stopping
                task.cancel()
        if self._session is not None:
            await self._session.aclose()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` given in seconds (a date is rare here: ignored)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def _host(url: str) -> str:
    """The host (and port) alone: never the user, password, path or query."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "?"
    return f"{host}:{port}" if port is not None else host
