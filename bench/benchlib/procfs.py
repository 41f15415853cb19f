"""Memory of a started process (and anything it forked), read from /proc.

`VmRSS` is what is resident now, `VmHWM` the highest it has been since the process
started. A benchmark target runs in its own session (`Processes.start`), so its whole
tree is "every process whose session id is the target's pid".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Memory:
    rss_kib: int  # VmRSS summed over the session
    hwm_kib: int  # VmHWM summed over the session (an upper bound of the joint peak)
    processes: int

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024

    @property
    def hwm_mib(self) -> float:
        return self.hwm_kib / 1024


def _status(pid: int) -> dict[str, str]:
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command: state ppid pgrp session ...
    return int(stat.rsplit(")", 1)[1].split()[3])


def session_pids(leader: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _session(int(entry.name)) == leader:
            pids.append(int(entry.name))
    return pids or [leader]


def memory(leader: int) -> Memory:
    rss = hwm = count = 0
    for pid in session_pids(leader):
        status = _status(pid)
        if "VmRSS" not in status:
            continue  # exited, or a kernel thread
        rss += int(status["VmRSS"].split()[0])
        hwm += int(status.get("VmHWM", "0 kB").split()[0])
        count += 1
    return Memory(rss, hwm, count)


def cpu_seconds(leader: int) -> float:
    """User + system CPU time of the session so far (every thread of every process)."""
    ticks = 0
    for pid in session_pids(leader):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpus_busy_seconds(cpus: list[int] | None = None) -> float:
    """CPU time the machine's `cpus` (None: all) spent on anything but idling so far,
    from /proc/stat: every process on them, and the kernel's interrupt work. Time the
    hypervisor took (steal) and I/O waits are not counted as busy."""
    ticks = 0
    wanted = None if cpus is None else {f"cpu{n}" for n in cpus}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or (wanted and name not in wanted):
            continue
        user, nice, system, _idle, _iowait, irq, softirq = map(int, values[:7])
        ticks += user + nice + system + irq + softirq
    return ticks / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Polls `memory(leader)` every `every` seconds while awaited; keeps the peak."""

    def __init__(self, leader: int, every: float = 0.1) -> None:
        self.leader = leader
        self.every = every
        self.peak_rss_kib = 0
        self.samples = 0

    async def run(self) -> None:
        while True:
            current = memory(self.leader)
            self.peak_rss_kib = max(self.peak_rss_kib, current.rss_kib)
            self.samples += 1
            await asyncio.sleep(self.every)
