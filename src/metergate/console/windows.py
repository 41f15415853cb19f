"""The time windows the console charts: how far back, and how wide each chart bucket is."""

from __future__ import annotations

from dataclasses import dataclass

from metergate.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    seconds: int
    step: int  # bucket width; seconds // step buckets, few enough to draw, many to see shape

    @property
    def buckets(self) -> int:
        return self.seconds // self.step


WINDOWS = {
    w.name: w
    for w in (
        Window("1h", 3_600, 60),
        Window("24h", 86_400, 900),
        Window("7d", 7 * 86_400, 3_600),
        Window("30d", 30 * 86_400, 4 * 3_600),
    )
}


def parse_window(value: str | None, default: str = "24h") -> Window:
    found = WINDOWS.get(value or default)
    if found is None:
        raise InvalidRequest(
            f"unknown window {value!r}; use one of {', '.join(WINDOWS)}", param="window"
        )
    return found
