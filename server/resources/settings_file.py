"""Resources declared in the server's `--resources-file`, written to the store at start.

The file is JSON: `{"resources": [{"tenant": "acme", "name": "main_db",
"database": {"connection_string": "postgresql://app:${secret:DB_PASSWORD}@db/app",
"pool_size": 20}}, …]}`, each entry a Resource in its JSON form plus its
tenant. Every entry is checked like an API request; one bad entry stops the
start with its position and field, so a typo never leaves a workflow
without its database at run time.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from google.protobuf import json_format

from flowport.server.resources import spec
from flowport.server.storage.resources import ResourceTables
from flowport.v1 import resource_pb2


class ResourcesFileError(ValueError):
    """The resources file cannot be used; the message says where."""


def load(path: Path) -> list[resource_pb2.Resource]:
    """The resources in `path`, checked, with tenant and from_settings set."""
    try:
        document = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ResourcesFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ResourcesFileError(f"{path} is not JSON: {exc}") from None
    entries = document.get("resources") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ResourcesFileError(f'{path}: expected {{"resources": [ … ]}}')
    loaded: list[resource_pb2.Resource] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries):
        where = f"{path}: resources[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str) or not entry["tenant"]:
            raise ResourcesFileError(f"{where}: an object with a non-empty tenant")
        resource = resource_pb2.Resource()
        try:
            json_format.ParseDict(entry, resource)
        except json_format.ParseError as exc:
            raise ResourcesFileError(f"{where}: {exc}") from None
        problems = spec.check(resource, f"resources[{i}]")
        if problems:
            raise ResourcesFileError(f"{path}: " + "; ".join(f"{field} {rule}" for field, rule in problems))
        key = (resource.tenant, resource.name)
        if key in seen:
            raise ResourcesFileError(f"{where}: {resource.name!r} of tenant {resource.tenant!r} is declared twice")
        seen.add(key)
        resource.from_settings = True
        loaded.append(resource)
    return loaded


async def apply(store: ResourceTables, resources: list[resource_pb2.Resource], now_us: int) -> None:
    """Write each resource, replacing what the API may have changed since the last start."""
    for resource in resources:
        resource.update_time.FromMicroseconds(now_us)
        if not resource.HasField("create_time"):
            resource.create_time.FromMicroseconds(now_us)
        await store.put_resource(resource.tenant, resource, now_us)
