"""A fake AWS STS answering AssumeRoleWithWebIdentity, the web-identity step of the
standard AWS credential chain (EKS service accounts, GitHub OIDC, ...).

The request is a form POST (`Action=AssumeRoleWithWebIdentity`, `RoleArn`,
`RoleSessionName`, `WebIdentityToken`), unsigned as the real call is; the web identity
token must be `TOKEN`. The answer is STS's XML with temporary credentials that expire
after `state.lifetime` seconds, each registered with the Bedrock fake so that requests
signed with them verify there.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass

from aiohttp import web

from tests.upstreams import bedrock_server

TOKEN = "eyJhbGciOiJSUzI1NiJ9.fake-web-identity.sig"
ROLE = "arn:aws:iam::123456789012:role/metergate-bedrock"


@dataclass
class State:
    bedrock: bedrock_server.State
    lifetime: float = 3600
    issued: int = 0


STATE = web.AppKey("state", State)


def create_app(state: State) -> web.Application:
    app = web.Application()
    app[STATE] = state

    async def sts(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("Action") != "AssumeRoleWithWebIdentity" or form.get("RoleArn") != ROLE:
            return _error(400, "ValidationError", "unexpected action or role")
        if form.get("WebIdentityToken") != TOKEN:
            return _error(400, "InvalidIdentityToken", "Couldn't retrieve verification key")
        state.issued += 1
        key = f"ASIAFAKEWEBIDENTITY{state.issued:03d}"
        secret, token = secrets.token_urlsafe(30), secrets.token_urlsafe(40)
        state.bedrock.credentials[key] = (secret, token)
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=state.lifetime)
        body = f"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>{key}</AccessKeyId>
      <SecretAccessKey>{secret}</SecretAccessKey>
      <SessionToken>{token}</SessionToken>
      <Expiration>{expires.strftime("%Y-%m-%dT%H:%M:%SZ")}</Expiration>
    </Credentials>
    <SubjectFromWebIdentityToken>system:serviceaccount:gw:metergate</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/metergate-bedrock/{form.get("RoleSessionName")}</Arn>
      <AssumedRoleId>AROAFAKE:{form.get("RoleSessionName")}</AssumedRoleId>
    </AssumedRoleUser>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>fake-{state.issued}</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"""
        return web.Response(text=body, content_type="text/xml")

    app.router.add_post("/", sts)
    return app


def _error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        "<RequestId>fake</RequestId></ErrorResponse>"
    )
    return web.Response(status=status, text=body, content_type="text/xml")
