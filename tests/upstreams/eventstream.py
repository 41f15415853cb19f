"""AWS event-stream frames (`application/vnd.amazon.eventstream`), built per the spec.

A frame is: total length (uint32), headers length (uint32), CRC32 of those 8 bytes,
the headers, the payload, and a CRC32 of everything before it; all big-endian. A header
is its name length (uint8), name, value type (7 = string), value length (uint16) and
value. Bedrock's ConverseStream sends one JSON event per frame, named by `:event-type`
(or an error named by `:exception-type`). This encoder is the fakes' own, so that the
gateway's decoder (botocore's) is checked against the format, not against itself.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import orjson

_STRING = 7


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    encoded = b"".join(
        struct.pack(">B", len(name)) + name + struct.pack(">BH", _STRING, len(value)) + value
        for name, value in ((n.encode(), v.encode()) for n, v in headers.items())
    )
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(name: str, payload: dict[str, Any]) -> bytes:
    headers = {
        ":event-type": name,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return frame(headers, orjson.dumps(payload))


def exception(kind: str, message: str) -> bytes:
    headers = {
        ":exception-type": kind,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return frame(headers, orjson.dumps({"message": message}))
