"""Loaded by Python at start (this directory is put on PYTHONPATH by bench/bytecodes.py):
SIGUSR1 starts counting the bytecodes the main thread executes, per function; SIGUSR2
stops and writes the counts to the file named by METERGATE_BENCH_BYTECODES, one
"count<TAB>file:line:function" per line. Counting slows the process over tenfold;
the counts do not depend on its speed."""

import collections
import os
import signal
import sys

_path = os.environ.get("METERGATE_BENCH_BYTECODES")
_counts: collections.Counter = collections.Counter()


def _opcode(frame, event, arg):  # type: ignore[no-untyped-def]
    if event == "opcode":
        _counts[frame.f_code] += 1
    return _opcode


def _call(frame, event, arg):  # type: ignore[no-untyped-def]
    frame.f_trace_opcodes = True
    frame.f_trace_lines = False
    return _opcode


def _start(signum, frame):  # type: ignore[no-untyped-def]
    _counts.clear()
    sys.settrace(_call)  # the main thread, where the event loop runs


def _stop(signum, frame):  # type: ignore[no-untyped-def]
    sys.settrace(None)
    temporary = f"{_path}.tmp"
    with open(temporary, "w") as out:
        for code, count in _counts.most_common():
            out.write(f"{count}\t{code.co_filename}:{code.co_firstlineno}:{code.co_name}\n")
    os.replace(temporary, _path)


if _path:
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
