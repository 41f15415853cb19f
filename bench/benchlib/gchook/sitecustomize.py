"""Loaded by Python at start (this directory is put on PYTHONPATH by bench/gc_pauses.py):
counts the collector's passes per generation and the time they take, and writes the
totals every half second to the JSON file named by METERGATE_BENCH_GC_STATS."""

import gc
import json
import os
import threading
import time

_path = os.environ.get("METERGATE_BENCH_GC_STATS")
_totals = {"passes": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}
_started = [0.0]


def _observe(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    generation = info["generation"]
    _totals["passes"][generation] += 1
    _totals["seconds"][generation] += time.perf_counter() - _started[0]


def _write_forever() -> None:
    while True:
        time.sleep(0.5)
        temporary = _path + ".tmp"
        with open(temporary, "w") as out:
            json.dump(_totals, out)
        os.replace(temporary, _path)


if _path:
    gc.callbacks.append(_observe)
    threading.Thread(target=_write_forever, name="gc-stats", daemon=True).start()
