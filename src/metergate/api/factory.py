"""Import-string entry point for the worker processes of `serve --workers N`.

A worker builds its app from what `serve` read, checked and recorded (`CONFIG_COPY`), not
from the file as it is when the worker starts: the file may have been edited since (not
yet reloaded) or broken. The copy is named after the file (`CONFIG_SOURCE`), which
reloads read. A worker (`JOINING`) takes the config version the gateway runs before it
serves, instead of recording its own as the newest. The workers share the tables of
their rate limits and budgets, in a directory made by `serve` (`HOST_DIR`), each worker
in its own column of the budgets' (`WORKER`), and stops when the supervisor dies
(`SUPERVISOR`, `private_dir.join`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from metergate import logs, private_dir
from metergate.config import parse_config, read_config

if TYPE_CHECKING:
    from metergate.api.app import GatewayApp

CONFIG_SOURCE = "METERGATE_CONFIG"  # the config file (the embedded default when unset)
CONFIG_COPY = "METERGATE_CONFIG_COPY"  # its text as `serve` read it
JOINING = "METERGATE_JOINING"  # set by `serve --workers N`, which records the config
HOST_DIR = "METERGATE_HOST_DIR"  # the workers' shared tables (`limits.host`, `budgets.host`)
WORKER = "METERGATE_WORKER"  # this worker's number, 0 to N - 1
SUPERVISOR = "METERGATE_SUPERVISOR"  # its pid: a worker stops when it dies


def create_app() -> GatewayApp:
    from metergate.api.app import GatewayApp  # not in the supervisor, which imports this

    logs.configure()
    copy = os.environ.get(CONFIG_COPY)
    if copy is None:
        loaded = read_config(os.environ.get(CONFIG_SOURCE) or None)
        config, text, source = loaded.config, loaded.text, loaded.source
    else:
        source = os.environ[CONFIG_SOURCE]
        text = Path(copy).read_text(encoding="utf-8")
        config = parse_config(text, source)
    host_dir = os.environ.get(HOST_DIR)
    if host_dir:
        private_dir.join(Path(host_dir).parent, int(os.environ[SUPERVISOR]))
    return GatewayApp(
        config,
        text,
        source,
        joining=bool(os.environ.get(JOINING)),
        host=(Path(host_dir), int(os.environ[WORKER])) if host_dir else None,
    )
