"""A stdio MCP server's connection, with its answers bounded by `max_response_bytes`.

The SDK's stdio transport reads a server's output into a line of any length: one huge
answer, or output with no newline at all, grows the gateway's memory without bound. This
transport does what the SDK's does (start the server in its own process group with a
minimal environment, newline-delimited JSON-RPC both ways, on shutdown close its stdin,
wait, then end the whole group) but never holds more than `max_response_bytes` of a line.

The server inherits nothing of the gateway's but its stderr: under uvloop a child is
started by libuv, which leaves every inheritable descriptor open in it (`close_fds` is
not honoured), and uvicorn makes its listening socket inheritable for its workers. A
stdio server holding that socket could accept the gateway's callers, keys and all; so
the gateway's descriptors are made non-inheritable before a server starts.

A line over the limit cannot be read, so nothing in it can be trusted to say which
request it answers. The connection is then ended: every request in flight on it gets a
JSON-RPC error (-32603) that names the limit, in place of its answer, and the gateway's
supervisor starts the server again as after any lost connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator

import anyio
import mcp_types as types
import orjson
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.client.stdio import get_default_environment
from mcp.os.posix.utilities import terminate_posix_process_tree
from mcp.shared.message import SessionMessage

from metergate.mcp.config import McpServerConfig
from metergate.mcp.metrics import INTERNAL_ERROR

log = logging.getLogger("metergate.mcp")

EXIT_GRACE_SECONDS = 2.0
"""How long a server may take to exit once its stdin is closed, and again after SIGTERM."""
_POLL_SECONDS = 0.01

Incoming = SessionMessage | Exception
Streams = tuple[MemoryObjectReceiveStream[Incoming], MemoryObjectSendStream[SessionMessage]]


class Lines:
    """Splits a server's output into its lines, holding at most `limit` bytes of one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._partial = bytearray()
        self.overflowed = False

    def feed(self, chunk: bytes) -> list[bytearray]:
        """The lines `chunk` completes; once a line passes the limit, `overflowed` is set
        and nothing more is returned."""
        if self.overflowed:
            return []
        self._partial += chunk
        if b"\n" not in chunk:
            if len(self._partial) > self.limit:
                self._overflow()
            return []
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest)
        if len(rest) > self.limit or any(len(line) > self.limit for line in lines):
            self._overflow()
            return []
        return lines

    def _overflow(self) -> None:
        self.overflowed = True
        self._partial = bytearray()  # not read further: nothing of it is kept


def parse(line: bytes | bytearray) -> Incoming:
    """A line as a message, or the error that says why it is not one (as the SDK's)."""
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        answered = _answered_id(line)
        if answered is None:
            return exc
        # An answer to a request in flight that is not valid JSON-RPC (an error without
        # a message, a code that is no integer): that request fails now, as over HTTP,
        # rather than at its timeout (-32600: `upstream` reports it as a broken answer).
        detail = str(exc).splitlines()[0][:200]
        error = types.ErrorData(code=-32600, message=f"answer to request {answered}: {detail}")
        return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=answered, error=error))


def _answered_id(line: bytes | bytearray) -> int | str | None:
    """The id of the request a line answers, if it is an answer (a JSON object with an
    id and no method) at all."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or "method" in value:
        return None
    answered = value.get("id")
    return answered if type(answered) in (int, str) else None


def _keep_descriptors() -> None:
    """Make every descriptor of this process above stderr non-inheritable (see above).
    A serving process passes none to its children on purpose: the supervisor, which
    hands the socket to the workers it starts, runs no MCP server."""
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # (the listing's own, closed since)
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)


@contextlib.asynccontextmanager
async def bounded_stdio(server: str, config: McpServerConfig) -> AsyncIterator[Streams]:
    """Start `config.command` and talk to it over its stdin and stdout."""
    assert config.command is not None
    _keep_descriptors()
    try:
        process = await anyio.open_process(
            [config.command, *config.args],
            env=get_default_environment() | config.env,
            cwd=config.cwd,
            stderr=sys.stderr,
            start_new_session=True,  # its own group, so that ending it ends its children
        )
    except OSError as exc:
        raise OSError(f"cannot start {config.command!r}: {exc.strerror or exc}") from exc
    to_session, from_server = anyio.create_memory_object_stream[Incoming](0)
    to_server, from_session = anyio.create_memory_object_stream[SessionMessage](0)
    connection = _Connection(server, config.max_response_bytes, process, to_session)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(connection.read)
        tasks.start_soon(connection.write, from_session)
        try:
            yield from_server, to_server
        finally:
            with anyio.CancelScope(shield=True):  # the process must not outlive the scope
                for stream in (from_server, to_server):
                    stream.close()
                await connection.stop()
            tasks.cancel_scope.cancel()


class _Connection:
    def __init__(
        self,
        server: str,
        limit: int,
        process: Process,
        to_session: MemoryObjectSendStream[Incoming],
    ) -> None:
        self.server = server
        self.limit = limit
        self.process = process
        self.to_session = to_session
        self.in_flight: set[types.RequestId] = set()  # requests sent, not yet answered

    async def read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        lines = Lines(self.limit)
        try:
            async with self.to_session:
                async for chunk in stdout:
                    for line in lines.feed(chunk):
                        if line.strip():
                            await self._deliver(parse(line))
                    if lines.overflowed:
                        log.warning(
                            "MCP server %s wrote a line over its max_response_bytes (%d); "
                            "restarting it",
                            self.server,
                            self.limit,
                        )
                        await self._refuse_in_flight()
                        break
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the session has ended: only draining is left
        await _drain(stdout)  # a server blocked on a full pipe could not exit

    async def _deliver(self, item: Incoming) -> None:
        if isinstance(item, SessionMessage):
            message = item.message
            if isinstance(message, types.JSONRPCResponse | types.JSONRPCError):
                self.in_flight.discard(message.id)
        await self.to_session.send(item)

    async def _refuse_in_flight(self) -> None:
        """Answer every request in flight with the error that names the limit."""
        message = (
            f"MCP server {self.server!r} answered more than {self.limit} bytes "
            f"(its max_response_bytes); metergate refused the answer and restarts the server"
        )
        error = types.ErrorData(
            code=INTERNAL_ERROR, message=message, data={"max_response_bytes": self.limit}
        )
        for request_id in sorted(self.in_flight, key=str):
            refusal = types.JSONRPCError(jsonrpc="2.0", id=request_id, error=error)
            await self.to_session.send(SessionMessage(refusal))
        self.in_flight.clear()

    async def write(self, from_session: MemoryObjectReceiveStream[SessionMessage]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            async with from_session:
                async for item in from_session:
                    message = item.message
                    if isinstance(message, types.JSONRPCRequest):
                        self.in_flight.add(message.id)
                    text = message.model_dump_json(by_alias=True, exclude_unset=True)
                    await stdin.send(text.encode() + b"\n")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # The server stopped reading: end the session's stream so that its requests
            # fail now instead of waiting for their timeouts.
            await self.to_session.aclose()

    async def stop(self) -> None:
        """Close its stdin, let it exit, then end its process group (as the SDK does)."""
        process = self.process
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            assert process.stdin is not None
            await process.stdin.aclose()
        if not await _exited(process, EXIT_GRACE_SECONDS):
            await terminate_posix_process_tree(process, EXIT_GRACE_SECONDS)
            if not await _exited(process, EXIT_GRACE_SECONDS):
                log.warning("MCP server %s (pid %d) did not exit", self.server, process.pid)
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            assert process.stdout is not None
            await process.stdout.aclose()


async def _exited(process: Process, seconds: float) -> bool:
    """Poll: `wait()` would also wait for the pipes, which a child may hold open."""
    with anyio.move_on_after(seconds):
        while process.returncode is None:  # noqa: ASYNC110 (see the docstring)
            await anyio.sleep(_POLL_SECONDS)
    return process.returncode is not None


async def _drain(stdout: ByteReceiveStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError, OSError):
        while True:
            await stdout.receive()
