"""Shared fixtures: a background loop for servers, and factories for gateways and upstreams."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import BackgroundLoop, Gateway, UpstreamServer, start_gateway
from tests.services import (  # noqa: F401 - real PostgreSQL and Redis on loopback, per session
    fresh_postgres_url,
    postgres_server,
    postgres_url,
    redis_server,
    redis_url,
)
from tests.upstreams import openai_server


@pytest.fixture(scope="session")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.stop()


@pytest.fixture
def gateway_factory(bg: BackgroundLoop, tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(config: dict[str, Any] | str) -> Gateway:
        gateway = start_gateway(bg, config, tmp_path / f"gw{len(started)}")
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()


@pytest.fixture
def openai_upstream(bg: BackgroundLoop) -> Iterator[tuple[UpstreamServer, openai_server.State]]:
    app, state = openai_server.create_app()
    server = UpstreamServer(bg, app)
    yield server, state
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database of each kind the gateway supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))
