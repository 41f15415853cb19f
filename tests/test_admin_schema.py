"""The admin API against its own OpenAPI document, fuzzed by schemathesis.

Every operation of `/admin/openapi.json` gets schema-valid requests (each must be served,
with an answer that matches the document) and schema-violating ones (each must be
refused with a 4xx), then stateful sequences (create a key, change it, revoke it), wrong
methods (405 with `Allow`) and wrong keys. Zero server errors and zero disagreements in
either direction. The run is bounded: a fixed seed (a failure reproduces), a fixed
number of examples per operation, one worker, and a timeout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Gateway
from tests.test_console_api import ADMIN_KEY, console_config, lenient, send_traffic

pytestmark = pytest.mark.timeout(600)

SCHEMATHESIS = Path(sys.executable).parent / "st"


def test_admin_api_agrees_with_its_openapi_document(gateway_factory, tmp_path: Path) -> None:
    gateway: Gateway = gateway_factory(console_config())
    lenient(gateway)  # the fuzzer presents wrong keys on purpose (the `ignored_auth` check)
    send_traffic(gateway, chat=4, streams=2, flaky=4)  # rows for the requests endpoints
    origin = gateway.base_url.removesuffix("/v1")
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{origin}/admin/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN_KEY}",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        "40",
        "--seed",
        "14",
        "--workers",
        "1",
        "--request-timeout",
        "20",
        # generating for an enum-only or tiny schema can trip Hypothesis' health checks,
        # which judge the generator, not the API
        "--suppress-health-check",
        "all",
        "--output-sanitize",
        "false",
        "--no-color",
    ]
    run = subprocess.run(  # in tmp_path: it keeps replay files in ./.schemathesis
        command, cwd=tmp_path, capture_output=True, text=True, timeout=540, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20_000:]
    # every operation fuzzed (teams, usage, one request, the request log export too)
    assert "Selected: 20/20" in output and "Tested: 20" in output, output[-5_000:]
    assert "No issues found" in output, output[-5_000:]
