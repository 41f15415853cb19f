"""Read the gateway's own Prometheus samples, the way a scrape of this process sees them.

With several workers (PROMETHEUS_MULTIPROC_DIR set) the values live in shared files, so
they are read through the same merged view as /metrics and cover every worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

from metergate.metering import multiprocess_exposition
from metergate.metering.metrics import multiprocess_dir


def samples(registry: CollectorRegistry, names: set[str]) -> Iterator[Sample]:
    """Every sample whose name is in `names`."""
    directory = multiprocess_dir()
    if directory:
        yield from multiprocess_exposition.shared(directory).samples(names)
        return
    source: Any = registry.restricted_registry(names)  # not every series of the gateway
    for family in source.collect():
        for sample in family.samples:
            if sample.name in names:
                yield sample
