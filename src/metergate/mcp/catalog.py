"""Resources and prompts of the upstream servers, as one namespaced catalog per key.

A listing fans out to every server the key may use that announced the capability,
concurrently, one page each. The gateway's cursor carries each server's own cursor, so a
long list pages through every server while short ones come in one answer. A server that
is down or fails is left out of the page (its failure is metered), never failing the
whole listing. Reading a resource and getting a prompt go to the one server its URI or
name names, after the key's allow-list: what the key may not use and what does not exist
are refused alike, so a key learns nothing about what others may use.

Upstream answers are re-shaped on the way through: URIs and names namespaced (in tool
results and prompt messages too, so a resource link can be read back through the
gateway), the server's identity stamp removed, and caching hints made private (what a key
sees depends on its allow-list).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import mcp_types as types
import orjson
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types import SERVER_INFO_META_KEY
from pydantic import BaseModel

from metergate.mcp.config import McpAccess
from metergate.mcp.metrics import INVALID_PARAMS
from metergate.mcp.naming import qualify, qualify_uri, split_name, split_uri
from metergate.mcp.upstream import Upstream

log = logging.getLogger("metergate.mcp")

Item = TypeVar("Item", types.Resource, types.ResourceTemplate, types.Prompt)
Result = TypeVar("Result", bound=BaseModel)
_MAX_CURSOR = 16_384  # characters: a cursor holds one short cursor per server


@dataclass(frozen=True)
class _Listing(Generic[Item]):
    """One kind of listing: how to ask a server for a page, and what a key may see."""

    method: str
    capability: str  # the ServerCapabilities field a server announces it with
    items: Callable[[Any], list[Item]]
    request: Callable[[str | None], types.ClientRequest]
    result: type[BaseModel]
    may_use: Callable[[McpAccess, str], bool]
    allows: Callable[[McpAccess, str, Item], bool]
    rename: Callable[[str, Item], Item]


def _page(cursor: str | None) -> types.PaginatedRequestParams | None:
    return types.PaginatedRequestParams(cursor=cursor) if cursor is not None else None


RESOURCES = _Listing[types.Resource](
    method="resources/list",
    capability="resources",
    items=lambda result: result.resources,
    request=lambda cursor: types.ListResourcesRequest(params=_page(cursor)),
    result=types.ListResourcesResult,
    may_use=McpAccess.may_use_resources,
    allows=lambda access, server, item: access.allows_resource(server, item.uri),
    rename=lambda server, item: item.model_copy(update={"uri": qualify_uri(server, item.uri)}),
)
TEMPLATES = _Listing[types.ResourceTemplate](
    method="resources/templates/list",
    capability="resources",
    items=lambda result: result.resource_templates,
    request=lambda cursor: types.ListResourceTemplatesRequest(params=_page(cursor)),
    result=types.ListResourceTemplatesResult,
    may_use=McpAccess.may_use_resources,
    allows=lambda access, server, item: access.allows_template(server, item.uri_template),
    rename=lambda server, item: item.model_copy(
        update={"uri_template": qualify_uri(server, item.uri_template)}
    ),
)
PROMPTS = _Listing[types.Prompt](
    method="prompts/list",
    capability="prompts",
    items=lambda result: result.prompts,
    request=lambda cursor: types.ListPromptsRequest(params=_page(cursor)),
    result=types.ListPromptsResult,
    may_use=McpAccess.may_use_prompts,
    allows=lambda access, server, item: access.allows_prompt(server, item.name),
    rename=lambda server, item: item.model_copy(update={"name": qualify(server, item.name)}),
)


class Catalog:
    """The resources and prompts of whichever upstreams the gateway has right now."""

    def __init__(self, upstreams: Callable[[], dict[str, Upstream]]) -> None:
        self._upstreams = upstreams

    async def list_page(
        self, listing: _Listing[Item], access: McpAccess, cursor: str | None
    ) -> tuple[list[Item], str | None]:
        """One page of `listing` for `access`, and the cursor of the next (None: done)."""
        upstreams = self._upstreams()
        pages: dict[str, str | None] = {}
        if cursor is None:
            pages.update(
                (name, None) for name, u in upstreams.items() if offers(u, listing.capability)
            )
        else:
            pages.update(_decode(cursor))
        wanted = [
            (name, upstreams[name], page)
            for name, page in pages.items()
            if name in upstreams and listing.may_use(access, name)
        ]
        results = await asyncio.gather(
            *(self._ask(upstream, listing, page) for _, upstream, page in wanted),
            return_exceptions=True,
        )
        items: list[Item] = []
        more: dict[str, str] = {}
        for (name, _, _), result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                log.debug("MCP server %s left out of %s: %s", name, listing.method, result)
                continue
            items += [
                listing.rename(name, item)
                for item in listing.items(result)
                if listing.allows(access, name, item)
            ]
            next_cursor = getattr(result, "next_cursor", None)
            if next_cursor is not None:
                more[name] = next_cursor
        return items, _encode(more) if more else None

    async def _ask(self, upstream: Upstream, listing: _Listing[Item], cursor: str | None) -> Any:
        return await upstream.send(listing.method, listing.request(cursor), listing.result)

    async def read_resource(
        self, access: McpAccess, namespaced: str, progress: ProgressFnT | None
    ) -> types.ReadResourceResult:
        server, uri, upstream = self.resource(access, namespaced)
        request = types.ReadResourceRequest(params=types.ReadResourceRequestParams(uri=uri))
        try:
            result = await upstream.send(
                "resources/read", request, types.ReadResourceResult, progress
            )
        except MCPError as exc:
            if exc.error.code == INVALID_PARAMS:  # the server's "no such resource" (SEP-2164)
                raise unknown_resource(namespaced) from None
            raise
        contents = [_renamed(server, content) for content in result.contents]
        return types.ReadResourceResult(
            contents=contents, ttl_ms=result.ttl_ms, _meta=own_meta(result.meta)
        )

    def resource(self, access: McpAccess, namespaced: str) -> tuple[str, str, Upstream]:
        """The server, its own URI and its upstream; refused alike when not allowed or
        not there."""
        found = split_uri(namespaced)
        upstream = self._upstreams().get(found[0]) if found else None
        if (
            found is None
            or upstream is None
            or not found[1]
            or not access.allows_resource(*found)
            or (upstream.capabilities is not None and not offers(upstream, "resources"))
        ):
            raise unknown_resource(namespaced)
        return found[0], found[1], upstream

    async def get_prompt(
        self,
        access: McpAccess,
        name: str,
        arguments: dict[str, str] | None,
        progress: ProgressFnT | None,
    ) -> types.GetPromptResult:
        found = split_name(name)
        upstream = self._upstreams().get(found[0]) if found else None
        if found is None or upstream is None or not access.allows_prompt(*found):
            raise MCPError(INVALID_PARAMS, f"Unknown prompt: {name}")
        request = types.GetPromptRequest(
            params=types.GetPromptRequestParams(name=found[1], arguments=arguments)
        )
        result = await upstream.send("prompts/get", request, types.GetPromptResult, progress)
        messages = [
            message.model_copy(update={"content": renamed_content(found[0], [message.content])[0]})
            for message in result.messages
        ]
        return types.GetPromptResult(
            description=result.description, messages=messages, _meta=own_meta(result.meta)
        )


def offers(upstream: Upstream, capability: str) -> bool:
    """Whether the server announced `capability` (`resources`, `prompts`)."""
    capabilities = upstream.capabilities
    return capabilities is not None and getattr(capabilities, capability) is not None


def unknown_resource(namespaced: str) -> MCPError:
    return MCPError(INVALID_PARAMS, f"Unknown resource: {namespaced}", {"uri": namespaced})


def own_meta(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """An upstream's `_meta` without its identity stamp, which would claim the answer
    came from it rather than from the gateway."""
    if not meta or SERVER_INFO_META_KEY not in meta:
        return meta
    return {k: v for k, v in meta.items() if k != SERVER_INFO_META_KEY} or None


def own_tool_result(server: str, result: types.CallToolResult) -> types.CallToolResult:
    """A tool's result as the gateway's: resource links namespaced, no identity stamp."""
    meta = own_meta(result.meta)
    content = renamed_content(server, result.content)
    if meta is result.meta and content is result.content:
        return result
    return result.model_copy(update={"meta": meta, "content": content})


def renamed_content(server: str, content: Sequence[Any]) -> list[Any]:
    """Content blocks with the URIs of resource links and embedded resources namespaced."""
    if not any(isinstance(block, types.ResourceLink | types.EmbeddedResource) for block in content):
        return content if isinstance(content, list) else list(content)
    renamed: list[Any] = []
    for block in content:
        if isinstance(block, types.ResourceLink):
            block = _renamed(server, block)
        elif isinstance(block, types.EmbeddedResource):
            block = block.model_copy(update={"resource": _renamed(server, block.resource)})
        renamed.append(block)
    return renamed


def _renamed(server: str, item: Result) -> Result:
    return item.model_copy(update={"uri": qualify_uri(server, item.uri)})  # type: ignore[attr-defined]


def _encode(pages: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(pages)).decode()


def _decode(cursor: str) -> dict[str, str]:
    """The servers' own cursors a gateway cursor carries; a bad one is invalid params."""
    try:
        if len(cursor) > _MAX_CURSOR:
            raise ValueError("too long")
        pages = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(pages, dict) or not all(isinstance(v, str) for v in pages.values()):
            raise ValueError("not a map of cursors")
    except (ValueError, binascii.Error):
        raise MCPError(INVALID_PARAMS, "Invalid cursor") from None
    return pages
