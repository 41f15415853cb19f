"""Egress through an HTTP proxy: which proxy a provider uses, and the CONNECT tunnel.

Self-hosted gateways often reach providers only through a proxy. A provider's `proxy:`
setting wins: a URL (`http://[user:pass@]host:port`), or `direct` for none. Without it,
the standard environment applies as curl and most clients read it: `HTTPS_PROXY` for
https:// upstreams, `HTTP_PROXY` for http:// ones (lower-case names too), and `NO_PROXY`
(comma-separated hosts, domains, `*`) exempts hosts. TLS goes through a CONNECT tunnel,
so the proxy never sees the request; plain HTTP is sent to the proxy in absolute form.
Only `http://` proxies are supported (a TLS connection *to* the proxy is not).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from metergate.config.secrets import without_password

DIRECT = "direct"
_MAX_ANSWER = 16 * 1024


class ProxyError(Exception):
    """The proxy refused or broke the tunnel; the message says which."""


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: bytes  # a whole `Proxy-Authorization: ...\r\n` line, or b""

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"


def parse_proxy(url: str) -> Proxy:
    """A proxy URL as configured; raises ValueError with a message for the config check."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    shown = without_password(url)  # the message lands in logs and reload answers
    if parts.scheme != "http":
        raise ValueError(
            f"proxy {shown!r}: only http:// proxies are supported (TLS to the upstream is "
            "tunnelled through them with CONNECT)"
        )
    if not parts.hostname:
        raise ValueError(f"proxy {shown!r} has no host")
    authorization = b""
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        token = base64.b64encode(credentials.encode()).decode()
        authorization = f"Proxy-Authorization: Basic {token}\r\n".encode()
    return Proxy(parts.hostname, parts.port or 3128, authorization)


def proxy_for(base_url: str, setting: str | None) -> Proxy | None:
    """The proxy to reach `base_url` through: the provider's setting, else the environment."""
    if setting is not None:
        return None if setting == DIRECT else parse_proxy(setting)
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(parts.scheme)
    if not url or _bypassed(parts.hostname or "", parts.port, proxies.get("no", "")):
        return None
    return parse_proxy(url)


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """NO_PROXY as curl reads it: `*`, exact hosts, `host:port`, and domain suffixes
    (`example.com` and `.example.com` both cover `api.example.com`)."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and port is not None and entry_port != str(port):
            continue
        name = (name or entry).lstrip(".").strip("[]")
        if host == name or host.endswith("." + name):
            return True
    return False


async def open_tunnel(proxy: Proxy, host: str, port: int) -> socket.socket:
    """A socket connected through `proxy` to host:port (CONNECT), ready for TLS."""
    loop = asyncio.get_running_loop()
    sock = await _connect(loop, proxy.host, proxy.port)
    try:
        request = (
            f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
            + proxy.authorization
            + b"\r\n"
        )
        await loop.sock_sendall(sock, request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise ProxyError(f"proxy {proxy.netloc} closed the connection during CONNECT")
            answer += data
            if len(answer) > _MAX_ANSWER:
                raise ProxyError(f"proxy {proxy.netloc} sent an oversized CONNECT answer")
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[1].isdigit() or not 200 <= int(fields[1]) < 300:
            raise ProxyError(
                f"proxy {proxy.netloc} refused the tunnel to {host}:{port}: {status_line}"
            )
        return sock
    except BaseException:
        sock.close()
        raise


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    errors: list[OSError] = []
    for family, kind, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(exc)
        except BaseException:
            sock.close()
            raise
    raise errors[0] if errors else OSError(f"cannot resolve proxy host {host}")
