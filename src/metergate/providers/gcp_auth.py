"""Google access tokens for Vertex AI, through google-auth.

The credentials are a service-account or external-account (workload identity
federation) key file, or Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS,
the GKE/GCE metadata server, gcloud). google-auth loads and refreshes them with
blocking I/O, so both run in a worker thread, one refresh at a time, minutes before the
token expires (`providers.tokens`); requests only read the cached header line.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import google.auth
import google.auth.exceptions
from google.auth import aws, identity_pool
from google.auth.transport.requests import Request
from google.oauth2 import service_account

from metergate.config.model import VertexSettings
from metergate.errors import ConnectFailed, UpstreamRejected
from metergate.providers.tokens import Refreshing

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


class GoogleToken:
    """The `authorization: Bearer ...` header line of one set of Google credentials."""

    def __init__(self, provider: str, settings: VertexSettings) -> None:
        self.provider = provider
        self.settings = settings
        self._credentials: Any = None
        self._request: Request | None = None
        self.cache: Refreshing[bytes] = Refreshing(
            self._fetch, f"the Google access token of {provider!r}"
        )

    async def header(self) -> bytes:
        return await self.cache.get()

    def close(self) -> None:
        self.cache.close()
        if self._request is not None:
            self._request.session.close()

    async def _fetch(self) -> tuple[bytes, float | None]:
        return await asyncio.to_thread(self._refresh)

    def _refresh(self) -> tuple[bytes, float | None]:
        """Load the credentials once, refresh them; runs in a worker thread."""
        try:
            if self._credentials is None:
                self._credentials = self._load()
                self._request = Request()
            self._credentials.refresh(self._request)
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise self._rejected(f"no usable credentials: {exc}") from exc
        except google.auth.exceptions.RefreshError as exc:
            if _retryable(exc):
                raise ConnectFailed(f"could not refresh the Google access token: {exc}") from exc
            raise self._rejected(f"the token endpoint refused the credentials: {exc}") from exc
        except google.auth.exceptions.TransportError as exc:
            raise ConnectFailed(f"could not reach the Google token endpoint: {exc}") from exc
        token = self._credentials.token
        if not isinstance(token, str) or any(c in token for c in "\r\n"):
            raise ConnectFailed("the Google token endpoint sent no usable token")
        expiry = self._credentials.expiry  # naive UTC, as google-auth keeps it
        lifetime = None
        if isinstance(expiry, datetime.datetime):
            now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
            lifetime = max(1.0, (expiry - now).total_seconds())
        return f"authorization: Bearer {token}\r\n".encode(), lifetime

    def _load(self) -> Any:
        path = self.settings.credentials_file
        if not path:
            credentials, _ = google.auth.default(scopes=SCOPES)
            return credentials
        with open(path, encoding="utf-8") as file:
            info = json.load(file)
        kind = info.get("type") if isinstance(info, dict) else None
        if kind == "service_account":
            return service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
        if kind == "external_account":  # workload identity federation
            source = info.get("credential_source") or {}
            if str(source.get("environment_id", "")).startswith("aws"):
                return aws.Credentials.from_info(info, scopes=SCOPES)
            return identity_pool.Credentials.from_info(info, scopes=SCOPES)
        raise google.auth.exceptions.DefaultCredentialsError(
            f"{path} holds credentials of type {kind!r}; expected service_account or "
            "external_account"
        )

    def _rejected(self, detail: str) -> UpstreamRejected:
        return UpstreamRejected(
            f"Google refused or lacks the gateway's credentials for provider "
            f"{self.provider!r}: {detail}; check vertex.credentials_file or the "
            "Application Default Credentials",
            error_type="upstream_error",
        )


def _retryable(exc: google.auth.exceptions.RefreshError) -> bool:
    """google-auth marks token endpoint failures worth retrying (5xx, timeouts)."""
    return bool(getattr(exc, "retryable", False))
