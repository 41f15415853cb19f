"""The real Claude Code (`claude -p`, installed from npm by scripts/test) set up as the
README says: ANTHROPIC_BASE_URL, ANTHROPIC_AUTH_TOKEN and model names from `models:`.
Against the simulator (translated) and the Anthropic fake (passed through)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.doors import Upstreams, ledger_row, upstreams  # noqa: F401 - fixture
from tests.harness import Gateway

INSTALLED = Path(__file__).parents[1] / ".cache" / "claude-code" / "node_modules" / "@anthropic-ai"
CLAUDE = next(iter(sorted(INSTALLED.glob("claude-code-*/claude"))), None)

pytestmark = pytest.mark.skipif(CLAUDE is None, reason="scripts/test installs Claude Code")


def run_claude(gateway: Gateway, model: str, home: Path) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": gateway.base_url.removesuffix("/v1"),
        "ANTHROPIC_AUTH_TOKEN": gateway.key,
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    assert CLAUDE is not None
    done = subprocess.run(
        [str(CLAUDE), "-p", "Say hello", "--output-format", "json", "--tools", ""],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("model", ["claude", "sim"])
def test_claude_code_through_the_gateway(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
    tmp_path: Path,
    model: str,
) -> None:
    gateway = gateway_factory(upstreams.config())
    result = run_claude(gateway, model, tmp_path)
    assert result["is_error"] is False and result["result"], result
    row = ledger_row(gateway, f"model = '{model}'")
    assert (row["api"], row["outcome"], row["stream"]) == ("messages", "success", 1)
    assert row["output_tokens"] == result["usage"]["output_tokens"]
    if model == "claude":  # passed through: Anthropic saw what Claude Code sent
        sent = upstreams.claude_recorder.last
        assert "claude-code-20250219" in sent.headers["anthropic-beta"]
        assert sent.body["model"] == "claude-sonnet-4-5" and sent.body["stream"] is True
        assert "authorization" not in sent.headers
