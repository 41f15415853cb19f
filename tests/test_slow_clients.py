"""Slow, idle and oversized clients against a real `metergate serve`, over raw sockets.

The limits are set low (seconds, 8 KiB) so that each test is short; the deadlines the
tests wait on are several times longer than the limits, so a loaded machine does not
make them flaky. Also: forwarded headers move the admin sign-in limiter only when they come
from a configured trusted proxy.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.services import GatewayProcess, create_key_sync

pytestmark = pytest.mark.timeout(120)

LIMITS = {
    "max_header_bytes": 8192,
    "header_timeout_seconds": 2,
    "body_timeout_seconds": 3,  # room for the test that sends its body in time
    "idle_timeout_seconds": 1,
    "send_timeout_seconds": 2,
}
PATIENCE = 10.0  # seconds a test waits for the gateway to act on a limit of a few
ADMIN_KEY = "admin-secret-for-tests-0123456789"


def serve(workdir: Path, server: dict[str, object]) -> tuple[GatewayProcess, str]:
    ledger = f"sqlite:///{workdir / 'ledger.db'}"
    config = {
        "server": server,
        "ledger": {"url": ledger},
        "admin": {"api_key": ADMIN_KEY},
        "providers": {
            "sim": {"type": "simulated"},
            "long": {  # ~15 MB of stream, token by token
                "type": "simulated",
                "simulated": {"output_tokens": 100_000, "tokens_per_second": 100_000},
            },
        },
        "upstreams": {
            "sim-up": {"provider": "sim", "model": "sim-1"},
            "long-up": {"provider": "long", "model": "sim-long"},
        },
        "models": {"sim": {"upstreams": ["sim-up"]}, "long": {"upstreams": ["long-up"]}},
    }
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    key = create_key_sync(ledger, "slow")
    gateway = GatewayProcess(path, workdir)
    try:
        gateway.wait_ready()
    except BaseException:
        gateway.kill_all()
        raise
    return gateway, key


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    process, key = serve(tmp_path_factory.mktemp("slow"), LIMITS)
    yield process, key
    process.kill_all()


@contextlib.contextmanager
def connection(process: GatewayProcess) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", process.port), timeout=PATIENCE)
    try:
        yield sock
    finally:
        sock.close()


def answer(sock: socket.socket) -> bytes:
    """What the gateway sends until it closes the connection (or PATIENCE runs out)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def one_response(sock: socket.socket) -> bytes:
    """One whole response (sized or chunked) from a kept-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += _more(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        (
            int(line[15:])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        ),
        None,
    )
    while (len(body) < length) if length is not None else not body.endswith(b"0\r\n\r\n"):
        body += _more(sock)
    return head + b"\r\n\r\n" + body


def _more(sock: socket.socket) -> bytes:
    if not (data := sock.recv(65536)):
        raise ConnectionError("the gateway closed the connection mid-answer")
    return data


def request(path: str, *headers: str, body: bytes = b"", method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", *headers, "", ""]
    return "\r\n".join(lines).encode() + body


def chat_request(key: str, length: int, body: bytes, *headers: str) -> bytes:
    """A chat request announcing a `length`-byte body, with `body` (its start, or none)."""
    return request(
        "/v1/chat/completions",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *headers,
        body=body,
        method="POST",
    )


@pytest.mark.parametrize("size", [1 << 20, 8 << 20])
def test_huge_request_headers_get_a_431(gateway: tuple[GatewayProcess, str], size: int) -> None:
    process, _ = gateway
    with connection(process) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request("/healthz", "X-Big: " + "a" * size))
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert (
        b"server.max_header_bytes" in reply and b'"code":"request_header_fields_too_large"' in reply
    )


def test_headers_within_the_limit_are_served(gateway: tuple[GatewayProcess, str]) -> None:
    process, _ = gateway
    response = httpx.get(f"{process.base_url}/healthz", headers={"x-pad": "a" * 7000})
    assert response.status_code == 200


def test_headers_sent_a_byte_at_a_time_get_a_408(gateway: tuple[GatewayProcess, str]) -> None:
    process, _ = gateway
    started = time.monotonic()
    with connection(process) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in request("/healthz", "X-Slow: " + "a" * 100):
                sock.send(bytes([byte]))
                time.sleep(0.1)  # the whole request would take 13 s
                if time.monotonic() - started > PATIENCE:
                    break
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"server.header_timeout_seconds" in reply
    assert time.monotonic() - started < PATIENCE


def test_a_connection_that_says_nothing_is_closed(gateway: tuple[GatewayProcess, str]) -> None:
    process, _ = gateway
    with connection(process) as sock:
        assert answer(sock).startswith(b"HTTP/1.1 408 ")


def ledger_row(process: GatewayProcess, request_id: str) -> tuple[str, int]:
    """(outcome, status) of the request's ledger row, once the ledger has written it."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(process.log_path.parent / "ledger.db")) as db:
            found = db.execute(
                "SELECT outcome, status FROM requests WHERE request_id = ?", (request_id,)
            ).fetchall()
        if found:
            assert len(found) == 1
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


def test_a_body_that_never_finishes_gets_a_408(gateway: tuple[GatewayProcess, str]) -> None:
    """And the ledger says 408, what the caller got, not that the caller left."""
    process, key = gateway
    with connection(process) as sock:
        sock.sendall(chat_request(key, 1000, b'{"model": "sim", ', "X-Request-Id: slow-body"))
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"server.body_timeout_seconds" in reply
    assert ledger_row(process, "slow-body") == ("invalid_request", 408)


def test_a_client_that_takes_none_of_its_answer_is_cut_off(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """It asks for a long stream, reads none of it and keeps its socket open: once the
    buffers are full and nothing has been taken for `send_timeout_seconds` (2 s here),
    the gateway cuts it off and the request ends (billed as a caller that left), instead
    of living, with its budget hold and its buffered answer, as long as the socket."""
    process, key = gateway
    body = json.dumps(
        {"model": "long", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little room on this side
    sock.settimeout(PATIENCE)
    sock.connect(("127.0.0.1", process.port))
    try:
        sock.sendall(chat_request(key, len(body), body, "X-Request-Id: stalled-reader"))
        assert ledger_row(process, "stalled-reader") == ("cancelled", 499)
    finally:
        sock.close()


def test_a_slow_client_that_takes_some_of_its_answer_in_time_is_not_cut_off(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """It reads 1 KiB every 0.1 s, far slower than the answer comes: writing stays paused
    past `send_timeout_seconds` (2 s), but something is taken in every period, so the
    request goes on (no ledger row yet) until the client leaves."""
    process, key = gateway
    body = json.dumps(
        {"model": "long", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(PATIENCE)
    sock.connect(("127.0.0.1", process.port))
    try:
        sock.sendall(chat_request(key, len(body), body, "X-Request-Id: slow-reader"))
        reading_until = time.monotonic() + 5 * LIMITS["send_timeout_seconds"]  # type: ignore[operator]
        while time.monotonic() < reading_until:
            assert sock.recv(1024)
            time.sleep(0.1)
        with contextlib.closing(sqlite3.connect(process.log_path.parent / "ledger.db")) as db:
            ended = db.execute("SELECT outcome FROM requests WHERE request_id = 'slow-reader'")
            assert ended.fetchall() == []  # still being answered
    finally:
        sock.close()
    assert ledger_row(process, "slow-reader") == ("cancelled", 499)  # it left, unfinished


def test_refusals_take_anthropic_shape_for_anthropic_callers(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """A 431 or 408 the HTTP layer sends itself reads as the caller's SDK expects: in
    Anthropic's error shape on the Messages door (or with `anthropic-version`)."""
    process, key = gateway

    def refused(raw: bytes) -> dict:
        with connection(process) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(raw)
            reply = answer(sock)
        return json.loads(reply.partition(b"\r\n\r\n")[2])

    big = "X-Big: " + "a" * (1 << 20)
    for path, headers in (("/v1/messages", ()), ("/v1/models", ("anthropic-version: 1",))):
        body = refused(request(path, *headers, big, method="POST"))
        assert body["type"] == "error" and "server.max_header_bytes" in body["error"]["message"]
    body = refused(request("/v1/chat/completions", big, method="POST"))
    assert body["error"]["code"] == "request_header_fields_too_large"  # OpenAI's shape
    start = request(
        "/v1/messages",
        f"x-api-key: {key}",
        "anthropic-version: 2023-06-01",
        "Content-Length: 1000",
        body=b'{"model": "sim", ',
        method="POST",
    )
    body = refused(start)
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "server.body_timeout_seconds" in body["error"]["message"]


def test_refusals_find_an_anthropic_caller_in_what_has_arrived(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """The shape is judged from every byte that arrived: an absolute-form target, a
    header line in a later read than the request line, and the last complete line of a
    head that stalls (which the parser holds back until the next line starts)."""
    process, _ = gateway
    big = "X-Big: " + "a" * (1 << 20)

    def refused(*parts: bytes) -> dict:
        with connection(process) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for part in parts:
                    sock.sendall(part)
                    time.sleep(0.2)  # apart, so that the gateway reads them apart
            reply = answer(sock)
        return json.loads(reply.partition(b"\r\n\r\n")[2])

    absolute = refused(request("http://gateway/v1/messages?beta=true", big, method="POST"))
    assert absolute["type"] == "error", absolute
    request_line = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n"
    later = refused(request_line, f"anthropic-version: 1\r\n{big}\r\n\r\n".encode())
    assert later["type"] == "error", later
    stalled = refused(request_line + b"anthropic-version: 2023-06-01\r\n")
    assert stalled["type"] == "error" and stalled["error"]["type"] == "invalid_request_error"
    assert "server.header_timeout_seconds" in stalled["error"]["message"]
    plain = refused(request_line + b"x-other: 1\r\n")
    assert plain["error"]["code"] == "request_timeout"  # OpenAI's shape


def responses(reply: bytes) -> list[tuple[bytes, dict]]:
    """The sized JSON responses in `reply`, each as (status line, parsed body)."""
    found = []
    while reply:
        head, _, rest = reply.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(line[15:]) for line in lines if line.lower().startswith(b"content-length:")
        )
        assert b"content-type: application/json" in head.lower(), head
        found.append((lines[0], json.loads(rest[:length])))
        reply = rest[length:]
    return found


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            "Content-Length",
        ),
        (b"GARBAGE\x01 / HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            "Transfer-Encoding",
        ),
    ],
    ids=["content-length", "request-line", "length-and-chunked"],
)
def test_broken_framing_gets_a_json_400(
    gateway: tuple[GatewayProcess, str], raw: bytes, detail: str
) -> None:
    """Bytes that break HTTP's framing get a 400 in the API's error shape, as every other
    refusal, and the connection closes."""
    process, _ = gateway
    with connection(process) as sock:
        sock.sendall(raw)
        reply = answer(sock)
    ((status, body),) = responses(reply)
    assert status.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert body["error"]["code"] == "invalid_http_request", body
    assert body["error"]["message"].startswith("malformed HTTP request: "), body
    assert detail.lower() in body["error"]["message"].lower(), body


def test_a_bad_chunk_size_is_the_requests_own_400(gateway: tuple[GatewayProcess, str]) -> None:
    process, key = gateway
    raw = chat_request(key, 0, b"", "X-Request-Id: bad-chunk").replace(
        b"Content-Length: 0", b"Transfer-Encoding: chunked"
    )
    with connection(process) as sock:
        sock.sendall(raw + b"zz\r\n{}\r\n0\r\n\r\n")
        reply = answer(sock)
    ((status, body),) = responses(reply)
    assert status.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert body["error"]["code"] == "invalid_http_request", body
    assert ledger_row(process, "bad-chunk") == ("invalid_request", 400)


def test_bytes_past_a_short_content_length_are_refused_after_its_answer(
    gateway: tuple[GatewayProcess, str],
) -> None:
    """A Content-Length 5 bytes short: the request gets its own answer (its body is cut
    JSON) and only then are the 5 bytes left over refused, as a message of their own."""
    process, key = gateway
    body = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}'
    with connection(process) as sock:
        sock.sendall(chat_request(key, len(body) - 5, body, "X-Request-Id: short-length"))
        reply = answer(sock)
    (first, own), (second, refused) = responses(reply)
    assert first.startswith(b"HTTP/1.1 400 ") and own["error"]["code"] == "invalid_json", own
    assert second.startswith(b"HTTP/1.1 400 "), reply[:600]
    assert refused["error"]["code"] == "invalid_http_request", refused
    assert ledger_row(process, "short-length") == ("invalid_request", 400)


@pytest.mark.parametrize("expect", [True, False])
def test_a_body_announced_too_large_is_refused_before_it_is_sent(
    gateway: tuple[GatewayProcess, str], expect: bool
) -> None:
    """Content-Length over server.max_body_bytes: a 413 at once, without `100 Continue`
    inviting the upload (curl asks for it on large bodies) or a wait for bytes that
    would only be thrown away; the connection closes, its body unread."""
    process, key = gateway
    headers = ["Expect: 100-continue"] if expect else []
    with connection(process) as sock:
        sock.sendall(chat_request(key, 100 << 20, b"", *headers, f"X-Request-Id: big-{expect}"))
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"server.max_body_bytes" in reply and b"connection: close" in reply.lower()
    assert ledger_row(process, f"big-{expect}") == ("invalid_request", 413)


def test_a_body_sent_in_pieces_in_time_is_served(gateway: tuple[GatewayProcess, str]) -> None:
    process, key = gateway
    body = b'{"model": "sim", "messages": [{"role": "user", "content": "' + b"x" * 200_000 + b'"}]}'
    with connection(process) as sock:
        sock.sendall(chat_request(key, len(body), b"", "Connection: close"))
        for start in range(0, len(body), 50_000):
            sock.sendall(body[start : start + 50_000])
            time.sleep(0.05)
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]


def test_an_idle_kept_alive_connection_is_closed(gateway: tuple[GatewayProcess, str]) -> None:
    process, _ = gateway
    with connection(process) as sock:
        sock.sendall(request("/healthz"))
        first = one_response(sock)
        assert first.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in first.lower()
        waited = time.monotonic()
        assert answer(sock) == b""  # closed without a word
        # after about the configured second: well before the 75 s default (or uvicorn's 5 s)
        assert time.monotonic() - waited < 4


def test_a_connection_in_use_outlives_the_idle_limit(gateway: tuple[GatewayProcess, str]) -> None:
    """The idle deadline restarts with each answer: a client asking every 0.3 s keeps its
    connection for several idle limits (the gateway's idle timer fires while requests are
    served and must wait out the rest of the new deadline, not close)."""
    process, _ = gateway
    with connection(process) as sock:
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < 3 * LIMITS["idle_timeout_seconds"]:  # type: ignore[operator]
            sock.sendall(request("/healthz"))
            assert one_response(sock).startswith(b"HTTP/1.1 200 "), f"after {answered} answers"
            answered += 1
            time.sleep(0.3)  # the client's pace, well inside the 1 s idle limit
        assert answer(sock) == b""  # then, left idle, it is closed


# -- forwarded headers and the sign-in limiter ------------------------------------------


def sign_in(process: GatewayProcess, key: str, forwarded_for: str | None = None) -> int:
    headers = {"authorization": f"Bearer {key}"}
    if forwarded_for:
        headers["x-forwarded-for"] = forwarded_for
    return httpx.get(f"{process.base_url}/admin/api/session", headers=headers).status_code


def test_forwarded_for_is_not_trusted_by_default(tmp_path: Path) -> None:
    """Rotating X-Forwarded-For does not give a client fresh sign-in attempts."""
    process, _ = serve(tmp_path, {})
    try:
        statuses = [sign_in(process, "wrong-key", f"203.0.113.{i}") for i in range(8)]
        assert statuses[:5] == [401] * 5 and statuses[5:] == [429] * 3
        assert sign_in(process, ADMIN_KEY, "198.51.100.7") == 429  # still this client
    finally:
        process.kill_all()


def test_forwarded_for_from_a_trusted_proxy_names_the_client(tmp_path: Path) -> None:
    process, _ = serve(tmp_path, {"trusted_proxies": ["127.0.0.0/8"]})
    try:
        assert [sign_in(process, "wrong-key", "203.0.113.1") for _ in range(6)] == [401] * 5 + [429]
        assert sign_in(process, ADMIN_KEY, "203.0.113.1") == 429  # that client is limited
        assert sign_in(process, ADMIN_KEY, "203.0.113.2") == 200  # another one is not
        # a client's own claim before the proxy's entry is believed only through trusted hops
        assert sign_in(process, ADMIN_KEY, "203.0.113.1, 203.0.113.3") == 200
    finally:
        process.kill_all()
