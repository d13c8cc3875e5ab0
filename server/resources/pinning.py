"""Which node parameters must keep their workflow-config values when a node uses a resource.

A resource carries credentials. Execution inputs and connections may set
any node parameter, so without this a caller could run another statement
on a tenant's database resource, or send a profile's Authorization header
to another path or with another method. Node types record the config
values when a workflow version is prepared and check them at each run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from flowport.server.nodes.base import NodeError

# Stands for "not in the config" and "not given", so that both absent compare equal.
ABSENT: Final = object()


def pinned_to_config(params: Mapping[str, Any], pinned: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """NodeError RESOURCE_NOT_FROM_CONFIG unless each of `keys` has its config value in `params`."""
    for key in keys:
        if key not in pinned or params.get(key, ABSENT) != pinned[key]:
            raise NodeError(
                f"{key} must come from the workflow's config when a resource is used, "
                "not from an execution input or a connection",
                reason="RESOURCE_NOT_FROM_CONFIG",
            )
