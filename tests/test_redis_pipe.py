"""The hot path's own Redis connection (`shared/pipe.py`), which admits and settles every
request under budgets or rate limits kept in Redis.

What a `redis:` URL means to redis-py it must mean here too (user and password, database,
unix socket, TLS checked against the URL's CA); replies come back in the order asked
with error replies in their place; and a server that stalls, hangs up or talks nonsense
fails the batch within the timeout instead of holding the gateway's requests."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import uvloop
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import AuthenticationError, ResponseError

from metergate.shared.pipe import Command, RedisPipe, Settings
from tests.harness import simulated_config, start_gateway
from tests.services import RedisServer, binary, certificates, free_port

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,  # what `metergate serve` runs on
}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[T]], T]:
    def run(coroutine: Awaitable[T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(coroutine)  # type: ignore[arg-type]

    return run


def settings(url: str, timeout: float = 5.0) -> Settings:
    return Settings.of(BlockingConnectionPool.from_url(url), timeout)


async def talk(url: str, *commands: Command) -> list[Any]:
    pipe = await RedisPipe.open(settings(url))
    try:
        return await pipe.execute(commands)
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server with an ACL user, a password, a unix socket and a TLS port besides
    its plain one: (server, TLS port, the CA that signed its certificate)."""
    workdir = tmp_path_factory.mktemp("redis-guarded")
    ca, cert, key = certificates(workdir)
    tls_port = free_port()
    server = RedisServer(
        binary("redis-server"),
        [
            "--unixsocket", str(workdir / "redis.sock"), "--unixsocketperm", "700",
            "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
        ],
    )  # fmt: skip
    server.start()
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", "alice", "on", ">alice-pass", "~*", "+@all")
    admin.config_set("requirepass", "default-pass")  # from now on PING needs it
    admin.close()
    try:
        yield server, tls_port, ca
    finally:
        server.stop()


def peek(server: RedisServer, db: int, key: str) -> bytes | None:
    client = redis.Redis(port=server.port, db=db, password="default-pass")
    try:
        return client.get(key)
    finally:
        client.close()


def test_a_batch_answers_in_order_with_error_replies_in_place(redis_server, run):
    redis_server.flushall()

    async def scenario() -> tuple[list[Any], list[Any], bool]:
        pipe = await RedisPipe.open(settings(redis_server.url))
        first = await pipe.execute(
            [
                ("SET", "pipe:a", "1"),
                ("INCRBY", "pipe:a", 41),
                ("HSET", "pipe:a", "field", "value"),  # wrong type: an error reply
                ("EVALSHA", "0" * 40, 0),  # a script Redis does not know
                ("GET", "pipe:a"),
                ("EVAL", "return {ARGV[1], tonumber(ARGV[2]) * 2}", 0, "é", 1.5),
            ]
        )
        second = await pipe.execute([("GET", "pipe:a")])  # still usable after an error reply
        closed = pipe.closed
        pipe.close()
        return first, second, closed

    first, second, closed = run(scenario())
    assert first[:2] == [b"OK", 42]
    assert isinstance(first[2], ResponseError) and str(first[2]).startswith("WRONGTYPE")
    assert isinstance(first[3], ResponseError) and str(first[3]).startswith("NOSCRIPT")
    assert first[4] == b"42"
    assert first[5] == ["é".encode(), 3]
    assert second == [b"42"] and not closed


def test_user_password_and_database_come_from_the_url(guarded, run):
    server, _, _ = guarded
    url = f"redis://alice:alice-pass@127.0.0.1:{server.port}/3"
    assert run(talk(url, ("SET", "pipe:user", "alice"))) == [b"OK"]
    assert peek(server, 3, "pipe:user") == b"alice"
    assert peek(server, 0, "pipe:user") is None  # SELECT 3 was sent first
    default = f"redis://:default-pass@127.0.0.1:{server.port}/0"
    assert run(talk(default, ("PING",))) == [b"PONG"]

    with pytest.raises(AuthenticationError) as refused:
        run(talk(f"redis://alice:wrong-pass@127.0.0.1:{server.port}/0", ("PING",)))
    assert "WRONGPASS" in str(refused.value) and "wrong-pass" not in str(refused.value)


def test_a_unix_socket_url_with_a_database(guarded, run):
    server, _, _ = guarded
    socket = server.extra_args[1]
    url = f"unix://:default-pass@{socket}?db=2"
    assert run(talk(url, ("SET", "pipe:unix", "1"))) == [b"OK"]
    assert peek(server, 2, "pipe:unix") == b"1"


def test_tls_checks_the_server_against_the_urls_ca(guarded, run):
    _, tls_port, ca = guarded
    base = f"rediss://:default-pass@127.0.0.1:{tls_port}/0"
    assert run(talk(f"{base}?ssl_ca_certs={ca}", ("PING",))) == [b"PONG"]
    with pytest.raises(ssl.SSLCertVerificationError):  # signed by a CA the system lacks
        run(talk(base, ("PING",)))


async def misbehaving(answer: Callable[[bytes], bytes | None]) -> tuple[asyncio.Server, str]:
    """A TCP server that reads a request and answers `answer(request)`, hangs up on None."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            reply = answer(data)
            if reply is None:
                break
            writer.write(reply)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize(
    ("answer", "failure", "message"),
    [
        (lambda _: b"", TimeoutError, "did not answer within 0.3 s"),
        (lambda _: None, ConnectionError, "closed the connection"),
        (lambda _: b"+OK\r\n+OK\r\n", ConnectionError, "not asked for"),
        (lambda _: b"HTTP/1.1 400 Bad Request\r\n\r\n", ConnectionError, "not RESP"),
    ],
    ids=["silent", "hangs-up", "an-extra-reply", "not-redis"],
)
def test_a_misbehaving_server_fails_the_batch_and_closes_the_pipe(answer, failure, message, run):
    async def scenario() -> tuple[BaseException, BaseException]:
        server, url = await misbehaving(answer)
        try:
            pipe = await RedisPipe.open(settings(url, timeout=0.3))
            with pytest.raises(failure) as failed:
                await pipe.execute([("PING",)])
            assert pipe.closed
            with pytest.raises(ConnectionError) as after:  # at once: no second wait
                await pipe.execute([("PING",)])
            return failed.value, after.value
        finally:
            server.close()

    failed, after = run(scenario())
    assert message in str(failed)
    assert isinstance(after, OSError)  # what the link counts as "Redis unreachable"


def test_a_server_that_refuses_on_connect_is_named_in_the_error(run):
    """Redis at `maxclients` answers a new connection with an error and closes it."""

    async def scenario() -> str:
        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"-ERR max number of clients reached\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            pipe = await RedisPipe.open(settings(f"redis://127.0.0.1:{port}/0"))
            deadline = time.monotonic() + 10
            while not pipe.closed:
                assert time.monotonic() < deadline, "the refusal was not noticed"
                await asyncio.sleep(0.01)
            with pytest.raises(ConnectionError) as failed:
                await pipe.execute([("PING",)])
            return str(failed.value)
        finally:
            server.close()

    assert "max number of clients reached" in run(scenario())


def test_a_gateway_admits_through_a_password_protected_database(guarded, bg, tmp_path, caplog):
    server, _, _ = guarded
    config = simulated_config(output_tokens=4)
    config["budgets"] = {"month": {"limit_usd": 100, "hard": True}}
    config["redis"] = {"url": f"redis://alice:alice-pass@127.0.0.1:{server.port}/5"}
    gateway = start_gateway(bg, config, tmp_path)
    try:
        client = gateway.client()
        for i in range(3):
            client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"q{i}"}]
            )
        assert gateway.metric("metergate_redis_up") == 1
        counters = gateway.runtime.plan.shared.counters
        bg.run(counters.drain())
        spent_key = counters.keys(gateway.runtime.plan.budgets.budgets[0]).spent
        spent = peek(server, 5, spent_key)
        assert spent is not None
        assert int(spent) == sum(r["cost_nano"] for r in gateway.ledger_rows()) > 0
    finally:
        gateway.stop()
    assert "alice-pass" not in caplog.text


def test_a_connection_redis_closed_while_idle_is_replaced_unnoticed(
    redis_server, bg, tmp_path, caplog
):
    """Servers and proxies close idle connections (`timeout` in redis.conf, managed
    Redis); the next request must not be refused for it, even with on_failure: closed."""
    redis_server.flushall()
    config = simulated_config(output_tokens=4)
    config["budgets"] = {"month": {"limit_usd": 100, "hard": True}}
    config["redis"] = {"url": redis_server.url, "on_failure": "closed"}
    gateway = start_gateway(bg, config, tmp_path)
    admin = redis.Redis(port=redis_server.port)
    try:
        client = gateway.client()  # no retries: a refusal fails the test
        ask = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
        client.chat.completions.create(**ask)
        link = gateway.runtime.plan.shared.link
        # Idle means idle: the request's settle (sent after its answer) has its reply,
        # or the kill would cut a call in flight, which rightly marks the link down.
        deadline = time.monotonic() + 10
        while not gateway.metric("metergate_budget_spent_usd", budget="month"):
            assert time.monotonic() < deadline, "the first request was never settled"
            time.sleep(0.01)
        pipe = link._pipe
        assert pipe is not None and not pipe.closed
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        deadline = time.monotonic() + 10
        while not pipe.closed:  # the gateway's loop has seen the connection end
            assert time.monotonic() < deadline, "the closed connection was not noticed"
            time.sleep(0.01)
        for _ in range(3):
            client.chat.completions.create(**ask)
        assert link._pipe is not pipe and gateway.metric("metergate_redis_up") == 1
    finally:
        admin.close()
        gateway.stop()
    assert "unreachable" not in caplog.text
