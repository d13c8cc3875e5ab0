"""Named resources as nodes use them: looked up for the execution's tenant,
secrets filled in, and (for databases) the tenant's shared pool.

A resolved resource is kept for `ttl` seconds, so a busy workflow does not
read the store and open secrets on every node run; a change made through
this process's API is seen at once (`forget`), one made through another
process within `ttl`. A changed resource or a rotated secret changes the
pool's fingerprint, which replaces the pool (server/nodes/sql_pools.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from flowport.server.errors import shown
from flowport.server.nodes.base import NodeContext, NodeError
from flowport.server.resources.spec import parse_url
from flowport.server.secrets.references import insert_secrets, secret_references
from flowport.server.secrets.resolver import open_secrets
from flowport.v1 import resource_pb2

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from flowport.server.nodes.sql_pools import SqlPools

DEFAULT_TTL = 1.0


class ResourceReader(Protocol):
    """Where resources are stored (server/storage/resources.py)."""

    async def get_resource(self, tenant: str, name: str) -> resource_pb2.Resource | None:
        """`tenant`'s resource `name`, or None."""
        ...


@dataclass(frozen=True)
class DatabaseResource:
    """A database resource with its secrets filled in."""

    name: str
    connection_string: str
    pool_size: int
    max_overflow: int
    pool_recycle: int
    # Values from the secret store, masked wherever the node reports text.
    secret_values: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        settings = f"{self.connection_string}\0{self.pool_size}\0{self.max_overflow}\0{self.pool_recycle}"
        return hashlib.sha256(settings.encode()).hexdigest()


@dataclass(frozen=True)
class HttpResource:
    """An HTTP profile with its secrets filled in."""

    name: str
    base_url: str
    headers: Mapping[str, str]
    timeout: float | None
    # Header names (lower case) that hold a secret: dropped on a redirect to another origin.
    secret_headers: frozenset[str]
    secret_values: tuple[str, ...]


Resolved = DatabaseResource | HttpResource


class ResourceDirectory:
    """The resources of every tenant, as one process's nodes see them."""

    def __init__(self, store: ResourceReader, pools: SqlPools, *, ttl: float = DEFAULT_TTL) -> None:
        self._store = store
        self._pools = pools
        self._ttl = ttl
        self._cache: dict[tuple[str, str], tuple[float, Resolved]] = {}

    async def database(self, ctx: NodeContext, name: str) -> DatabaseResource:
        """The database resource `name` of `ctx.tenant`, secrets filled in; NodeError when there is none."""
        resolved = await self._resolve(ctx, name, "database")
        assert isinstance(resolved, DatabaseResource)
        return resolved

    def pool(self, tenant: str, resolved: DatabaseResource) -> AsyncEngine:
        """The tenant's shared pool of `resolved` (opened on first use; use it inside `pools.using`)."""
        return self._pools.resource_engine(
            tenant,
            resolved.name,
            resolved.fingerprint,
            resolved.connection_string,
            pool_size=resolved.pool_size,
            max_overflow=resolved.max_overflow,
            pool_recycle=resolved.pool_recycle,
        )

    async def http(self, ctx: NodeContext, name: str) -> HttpResource:
        """The HTTP profile `name` of `ctx.tenant`; NodeError when there is none."""
        resolved = await self._resolve(ctx, name, "http")
        assert isinstance(resolved, HttpResource)
        return resolved

    def forget(self, tenant: str, name: str) -> None:
        """Drop what this process holds of a changed or deleted resource (its pool too)."""
        self._cache.pop((tenant, name), None)
        self._pools.discard_resource(tenant, name)

    async def still_current(self, tenant: str, name: str, fingerprint: str) -> bool | None:
        """Whether a pool's resource is unchanged in the store: None when it cannot tell
        (its secrets are not readable here), False when it was deleted or changed."""
        resource = await self._store.get_resource(tenant, name)
        if resource is None or not resource.HasField("database"):
            return False
        names = {n for _, n in secret_references(resource.database.connection_string)}
        if names:
            return None  # the fingerprint includes secret values; the node-side TTL catches rotation
        return _database(resource, {}).fingerprint == fingerprint

    async def _resolve(self, ctx: NodeContext, name: str, kind: str) -> Resolved:
        key = (ctx.tenant, name)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            resolved = cached[1]
        else:
            resource = await self._store.get_resource(ctx.tenant, name)
            if resource is None:
                raise NodeError(
                    f"resource {shown(name)} does not exist in this tenant: create it with POST /api/resources",
                    reason="RESOURCE_NOT_FOUND",
                )
            resolved = await _fill(ctx, resource)
            self._cache[key] = (now + self._ttl, resolved)
        wanted = DatabaseResource if kind == "database" else HttpResource
        if not isinstance(resolved, wanted):
            raise NodeError(
                f"resource {shown(name)} is not a {kind} resource; this node needs one", reason="RESOURCE_KIND_MISMATCH"
            )
        return resolved


async def _fill(ctx: NodeContext, resource: resource_pb2.Resource) -> Resolved:
    texts: dict[str, object] = {}
    if resource.HasField("database"):
        texts["connection_string"] = resource.database.connection_string
    elif resource.HasField("http"):
        texts["headers"] = dict(resource.http.headers)
    names = frozenset(name for _, name in secret_references(texts))
    values = await open_secrets(ctx, names) if names else {}
    if resource.HasField("database"):
        return _database(resource, values)
    profile = resource.http
    headers = {header: insert_secrets(value, values) for header, value in profile.headers.items()}
    return HttpResource(
        name=resource.name,
        base_url=profile.base_url,
        headers=headers,
        timeout=profile.timeout_seconds or None,
        secret_headers=frozenset(h.lower() for h, v in profile.headers.items() if "${secret:" in v),
        secret_values=tuple(values.values()),
    )


def _fill_url(connection_string: str, values: Mapping[str, str]) -> str:
    """`connection_string` with its secret references filled in part by part, then rendered:
    a password with '@', ':' or '/' is percent-encoded and cannot change where the URL points."""
    if not values:
        return connection_string
    url, tokens = parse_url(connection_string)

    def fill(part: str) -> str:
        for token, name in tokens.items():
            part = part.replace(token, values[name])
        return part

    def fill_optional(part: str | None) -> str | None:
        return None if part is None else fill(part)

    query: dict[str, str | tuple[str, ...]] = {
        key: fill(value) if isinstance(value, str) else tuple(fill(v) for v in value)
        for key, value in url.query.items()
    }
    url = url.set(
        username=fill_optional(url.username),
        password=fill_optional(None if url.password is None else str(url.password)),
        host=fill_optional(url.host),
        database=fill_optional(url.database),
        query=query,
    )
    return url.render_as_string(hide_password=False)


def _database(resource: resource_pb2.Resource, values: Mapping[str, str]) -> DatabaseResource:
    pool = resource.database
    return DatabaseResource(
        name=resource.name,
        connection_string=_fill_url(pool.connection_string, values),
        pool_size=pool.pool_size,
        max_overflow=pool.max_overflow,
        pool_recycle=pool.pool_recycle_seconds,
        secret_values=tuple(values.values()),
    )
