"""The README's configuration reference is a config that really loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from metergate.config import parse_config

README = Path(__file__).parents[1] / "README.md"


def test_configuration_reference_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    reference = text.split("## Configuration reference", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", reference, re.S)
    assert block is not None
    for variable in set(re.findall(r"\$\{([A-Z_]+)\}", block.group(1))):
        value = "placeholder-secret"
        if variable.endswith("_URL"):
            value = "redis://127.0.0.1:6379/0" if "REDIS" in variable else "https://hook.test/x"
        monkeypatch.setenv(variable, value)
    config = parse_config(block.group(1), "README.md")
    assert config.models["gpt-4.1"].retry.retry_on == [
        "connection_error",
        "timeout",
        "rate_limited",
        "upstream_error",
    ]
    assert config.models["gpt-4.1"].fallbacks == ["claude"]
