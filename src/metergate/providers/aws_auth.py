"""AWS credentials and SigV4 request signing for Bedrock, done by botocore.

Credentials come from the standard chain botocore resolves (environment, shared
config/credentials files and `profile`, web identity, SSO, container and instance
roles) or from explicit keys. Resolving and refreshing them may block (files, STS,
the instance metadata service), so it runs in a thread, once at a time, ahead of
expiry (`providers.tokens`); a request only signs with the credentials in hand.
The signature covers the body, so each request is signed as it is sent.
"""

from __future__ import annotations

import asyncio
import datetime

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.exceptions import (
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.session import Session

from metergate.config.model import BedrockSettings
from metergate.errors import ConnectFailed, UpstreamRejected
from metergate.providers.tokens import Refreshing

SERVICE = "bedrock"
_SIGNED_OUT = ("X-Amz-Date", "X-Amz-Security-Token", "Authorization")


class AwsSigner:
    """Signs Bedrock requests with SigV4 for one region and one set of credentials."""

    def __init__(self, provider: str, settings: BedrockSettings, region: str) -> None:
        self.provider = provider
        self.settings = settings
        self.region = region
        self._source: Credentials | None = None
        self.cache: Refreshing[ReadOnlyCredentials] = Refreshing(
            self._fetch, f"the AWS credentials of {provider!r}"
        )

    async def headers(self, url: str, body: bytes) -> bytes:
        """The header lines that sign a POST of `body` (JSON) to `url`."""
        credentials = await self.cache.get()
        request = AWSRequest(
            method="POST", url=url, data=body, headers={"content-type": "application/json"}
        )
        SigV4Auth(credentials, SERVICE, self.region).add_auth(request)
        return "".join(
            f"{name.lower()}: {request.headers[name]}\r\n"
            for name in _SIGNED_OUT
            if name in request.headers
        ).encode()

    async def _fetch(self) -> tuple[ReadOnlyCredentials, float | None]:
        return await asyncio.to_thread(self._resolve)

    def _resolve(self) -> tuple[ReadOnlyCredentials, float | None]:
        """(frozen credentials, seconds they stay valid); runs in a worker thread."""
        try:
            if self._source is None:
                self._source = self._chain()
            frozen = self._source.get_frozen_credentials()  # refreshes role credentials
        except (NoCredentialsError, PartialCredentialsError, ProfileNotFound) as exc:
            raise self._missing(str(exc)) from exc
        except UpstreamRejected:
            raise
        except Exception as exc:  # STS, SSO or the metadata service failed
            raise ConnectFailed(f"could not obtain AWS credentials: {exc}") from exc
        if not frozen.access_key or not frozen.secret_key:
            raise self._missing("the credentials found are incomplete")
        expiry = getattr(self._source, "_expiry_time", None)
        if not isinstance(expiry, datetime.datetime):
            return frozen, None
        remaining = expiry - datetime.datetime.now(datetime.UTC)
        return frozen, max(1.0, remaining.total_seconds())

    def _chain(self) -> Credentials:
        settings = self.settings
        if settings.access_key_id and settings.secret_access_key is not None:
            token = settings.session_token.get_secret_value() if settings.session_token else None
            return Credentials(
                settings.access_key_id, settings.secret_access_key.get_secret_value(), token
            )
        found = Session(profile=settings.profile).get_credentials()
        if found is None:
            raise self._missing("none were found in the environment, files or roles")
        return found

    def _missing(self, detail: str) -> UpstreamRejected:
        return UpstreamRejected(
            f"the gateway has no usable AWS credentials for provider {self.provider!r}: "
            f"{detail}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, a role, "
            "or a Bedrock API key as api_key",
            error_type="upstream_error",
        )
