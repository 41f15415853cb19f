"""The stand-in upstream: nginx answering fixed OpenAI bodies from `bench/nginx/`.

nginx costs a few microseconds per request, so "direct" numbers are close to what the
client and the loopback cost, and "gateway - direct" is what metergate adds.
The bodies are defined here once, written where nginx serves them from, and used to
check that the gateway passes them through unchanged.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import BenchError, Processes, Started, free_port, pinned, tool, wait_ready

TEMPLATE = Path(__file__).resolve().parent.parent / "nginx" / "nginx.conf.template"
CHAT_PATH = "/v1/chat/completions"
STREAM_PATH = "/stream/v1/chat/completions"
SLOW_PATH = "/slow/v1/chat/completions"
STREAM_CHUNKS = 50
SLOW_SECONDS = 10.0  # how long nginx takes to send the whole stream at SLOW_PATH
CREATED = 1700000000


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


CHAT_BODY: bytes = _json(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }
).encode()


def _chunk(choices: list[object], usage: object = None) -> str:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "bench-model",
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {_json(body)}\n\n"


def _stream_body(chunks: int = STREAM_CHUNKS) -> bytes:
    """`chunks` content events (one token each), a usage-only event, then [DONE]."""
    events = []
    for i in range(chunks):
        delta = {"content": f"tok{i} "} if i else {"role": "assistant", "content": "tok0 "}
        finish = "stop" if i == chunks - 1 else None
        events.append(_chunk([{"index": 0, "delta": delta, "finish_reason": finish}]))
    usage = {"prompt_tokens": 11, "completion_tokens": chunks, "total_tokens": 11 + chunks}
    events.append(_chunk([], usage))
    events.append("data: [DONE]\n\n")
    return "".join(events).encode()


STREAM_BODY: bytes = _stream_body()


def slow_rate() -> int:
    """Bytes per second that spread STREAM_BODY over about SLOW_SECONDS."""
    return max(1, round(len(STREAM_BODY) / SLOW_SECONDS))


def render_config(prefix: Path, port: int) -> str:
    text = TEMPLATE.read_text().replace("@SLOW_RATE@", str(slow_rate()))
    return text.replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port))


@dataclass(frozen=True)
class Upstream:
    process: Started
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_nginx(processes: Processes, workdir: Path, cpus: str | None) -> Upstream:
    """Run nginx in the foreground from a private prefix dir (no root paths, no system pid)."""
    prefix = workdir / "nginx"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    port = free_port()
    (prefix / "html").mkdir(exist_ok=True)
    (prefix / "html/chat.json").write_bytes(CHAT_BODY)
    (prefix / "html/stream.sse").write_bytes(STREAM_BODY)
    conf = prefix / "nginx.conf"
    conf.write_text(render_config(prefix, port))
    base = [tool("nginx"), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")]
    test = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise BenchError(f"nginx rejected {conf}:\n{test.stderr}")
    started = processes.start("nginx", pinned(base, cpus), prefix / "logs/stdout.log")
    # GET is enough to know it listens; POST answers are checked by the caller.
    wait_ready(started, f"http://127.0.0.1:{port}{CHAT_PATH}", timeout=15)
    return Upstream(started, port)
