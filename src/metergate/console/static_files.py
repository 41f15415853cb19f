"""The console's static files, read once at start and served from memory.

`/console` (and `/console/`) is the page; everything else under `static/` is served at
`/console/<path>`. The page is `no-store`; assets are `no-cache` with an ETag, so a
browser revalidates them cheaply and a new gateway version is picked up at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
PAGE = "index.html"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: bytes

    @property
    def is_page(self) -> bool:
        return self.content_type.startswith("text/html")


def _walk(node: Traversable, prefix: str) -> dict[str, Traversable]:
    found: dict[str, Traversable] = {}
    for child in node.iterdir():
        path = f"{prefix}/{child.name}"
        if child.is_dir():
            found.update(_walk(child, path))
        elif child.is_file():
            found[path] = child
    return found


def load_assets(root: Traversable | None = None) -> dict[str, Asset]:
    """URL path -> asset for every servable file (unknown file types are left out)."""
    root = root or resources.files("metergate.console").joinpath("static")
    assets: dict[str, Asset] = {}
    for relative, node in sorted(_walk(root, "").items()):
        suffix = "." + relative.rsplit(".", 1)[-1] if "." in relative else ""
        content_type = _TYPES.get(suffix)
        if content_type is None:
            continue
        body = node.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        asset = Asset(body, content_type, etag)
        if relative == f"/{PAGE}":
            assets["/console"] = assets["/console/"] = asset
        else:
            assets[f"/console{relative}"] = asset
    return assets
