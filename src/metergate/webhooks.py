"""Notices (budget thresholds, rollout transitions) to webhooks, sent off the request path.

The payload is Slack's incoming-webhook shape (`text`), which most chat tools accept;
the structured fields ride along for receivers that want them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx2


log = logging.getLogger("metergate.webhooks")


class WebhookNotifier:
    def __init__(self, timeout: float = 10) -> None:
        self._session: httpx2.AsyncClient | None = None
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, url: str, text: str, fields: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._post(url, {"text": text, **fields}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, payload: dict[str, Any]) -> None:
        """POST once; a failure is logged (without the URL's path, which may hold a token)."""
        if self._session is None:
            import httpx2  # loaded only when a notice is actually sent

            self._session = httpx2.AsyncClient(timeout=self._timeout)
        try:
            response = await self._session.post(url, json=payload)
            if response.status_code >= 300:
                log.warning("webhook %s answered %s", _host(url), response.status_code)
        except Exception as exc:
            log.warning("webhook %s failed: %s", _host(url), exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._session is not None:
            await self._session.aclose()


def _host(url: str) -> str:
    return urlsplit(url).netloc
