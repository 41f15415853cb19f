"""Read the gateway's own Prometheus samples, the way a scrape of this process sees them.

With several workers (PROMETHEUS_MULTIPROC_DIR set) the values live in shared files, so
they are read through the multiprocess collector and cover every worker, like /metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.samples import Sample

from metergate.metering.metrics import multiprocess_dir


def samples(registry: CollectorRegistry, names: set[str]) -> Iterator[Sample]:
    """Every sample whose name is in `names`."""
    source: Any = registry.restricted_registry(names)  # not every series of the gateway
    if multiprocess_dir():
        source = CollectorRegistry()
        multiprocess.MultiProcessCollector(source)
    for family in source.collect():
        for sample in family.samples:
            if sample.name in names:
                yield sample
