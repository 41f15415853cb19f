"""Microsoft Entra ID access tokens for Azure OpenAI: the OAuth 2.0 client-credentials flow.

One POST of the app's id and secret to `{authority}/{tenant}/oauth2/v2.0/token` returns a
bearer token valid for about an hour. It is fetched through the gateway's own pooled
client (no Azure SDK needed), cached and refreshed minutes before it expires
(`providers.tokens`), so requests only read a prebuilt header line.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode, urlsplit

import orjson

from metergate.config.model import AzureSettings, ProviderConfig
from metergate.errors import (
    ConnectFailed,
    UpstreamFailure,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
)
from metergate.providers.h1 import Deadlines, H1Error, HttpClient
from metergate.providers.proxy import proxy_for
from metergate.providers.tokens import Refreshing

_FORM = b"content-type: application/x-www-form-urlencoded\r\naccept: application/json\r\n"


class EntraToken:
    """The `authorization: Bearer ...` header line of one Entra app, kept fresh."""

    def __init__(self, provider: str, config: ProviderConfig, settings: AzureSettings) -> None:
        assert settings.client_secret is not None and settings.tenant_id and settings.client_id
        self.provider = provider
        authority = settings.authority.rstrip("/")
        parts = urlsplit(authority)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._path = f"{parts.path}/{quote(settings.tenant_id, safe='')}/oauth2/v2.0/token"
        self._form = urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": settings.client_id,
                "client_secret": settings.client_secret.get_secret_value(),
                "scope": settings.scope,
            }
        ).encode()
        timeouts = config.timeouts
        self._deadlines = Deadlines(
            timeouts.connect, timeouts.first_byte, timeouts.total, None, timeouts.pool
        )
        self._proxy = proxy_for(self._origin, config.proxy)
        self._client: HttpClient | None = None
        self.cache: Refreshing[bytes] = Refreshing(self._fetch, f"the Entra token of {provider!r}")

    async def header(self) -> bytes:
        return await self.cache.get()

    async def close(self) -> None:
        self.cache.close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _fetch(self) -> tuple[bytes, float | None]:
        if self._client is None:
            self._client = HttpClient(self._origin, 2, proxy=self._proxy)
        try:
            response = await self._client.post(self._path, _FORM, self._form, self._deadlines)
        except (H1Error, OSError) as exc:
            raise ConnectFailed(f"could not reach the Entra token endpoint: {exc}") from exc
        try:
            data = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if response.status != 200 or not isinstance(data.get("access_token"), str):
            raise self._failure(response.status, data)
        token = data["access_token"]
        if any(c in token for c in "\r\n"):
            raise UpstreamServerError("the Entra token endpoint sent a malformed token")
        lifetime = float(data.get("expires_in") or 3599)
        return f"authorization: Bearer {token}\r\n".encode(), lifetime

    def _failure(self, status: int, data: dict[str, object]) -> UpstreamFailure:
        detail = str(data.get("error_description") or data.get("error") or f"HTTP {status}")
        detail = detail.splitlines()[0][:300]
        if status == 429:
            return UpstreamRateLimited(f"the Entra token endpoint is rate limiting: {detail}")
        if status >= 500 or status == 200:
            return UpstreamServerError(f"the Entra token endpoint failed: {detail}")
        # The gateway's app credentials were refused: a config problem, not the caller's.
        return UpstreamRejected(
            f"Microsoft Entra refused the gateway's client credentials ({status}): {detail}; "
            f"check tenant_id, client_id and client_secret of provider {self.provider!r}",
            error_type="upstream_error",
            upstream_status=status,
        )
