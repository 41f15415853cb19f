"""The log lines of loops that retry: an outage is a few lines, not one per attempt."""

from __future__ import annotations

import logging

from metergate.logs import RepeatedFailures


def test_a_run_of_failures_is_one_traceback_a_count_a_minute_and_one_recovery(caplog):
    caplog.set_level(logging.INFO, logger="test.loop")
    now = [100.0]
    failures = RepeatedFailures(
        logging.getLogger("test.loop"),
        "reloading keys",
        "keeping the previous set",
        every=60,
        clock=lambda: now[0],
    )

    def fail(error: Exception) -> None:
        try:
            raise error
        except Exception as caught:
            failures.failed(caught)

    for _ in range(30):  # a failure a second for half a minute
        fail(ConnectionRefusedError("connection refused"))
        now[0] += 1
    lines = [(r.levelname, r.message, r.exc_info is not None) for r in caplog.records]
    assert lines == [("ERROR", "reloading keys failed; keeping the previous set", True)]
    now[0] += 30  # a minute after the first line: one line of the count, no traceback
    fail(ConnectionRefusedError("connection refused"))
    assert caplog.records[-1].message == (
        "reloading keys failed again (31 times in a row over 60 s; keeping the previous set): "
        "ConnectionRefusedError: connection refused"
    )
    assert caplog.records[-1].exc_info is None
    fail(PermissionError("permission denied for table keys"))  # another kind: its traceback
    assert caplog.records[-1].exc_info is not None and len(caplog.records) == 3
    now[0] += 5
    failures.succeeded()
    failures.succeeded()
    assert [r.message for r in caplog.records[3:]] == [
        "reloading keys works again after 32 failures over 65 s"
    ]
    fail(ConnectionRefusedError("connection refused"))  # a new run starts over
    assert caplog.records[-1].exc_info is not None and len(caplog.records) == 5
