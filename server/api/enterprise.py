"""The answers of Kailash's enterprise and durability routes (`/enterprise/health`,
`/durability/status`, `/durability/requests`, `/dashboard`), made from flowport's own records."""

from __future__ import annotations

import asyncio

from google.protobuf import struct_pb2, timestamp_pb2

from flowport.server import pagination
from flowport.server.health import overall
from flowport.server.storage.sql_store import SqlStore
from flowport.v1 import gateway_pb2
from flowport.v1.execution_pb2 import Execution

DASHBOARD = gateway_pb2.Dashboard(console="/console/", stats="/api/stats", events="/events", websocket="/ws")


def enterprise_health(health: gateway_pb2.Health, *, secrets_loaded: bool) -> gateway_pb2.Health:
    """GetHealth's answer under the component names of Kailash's enterprise server."""
    answer = gateway_pb2.Health()
    answer.CopyFrom(health)
    answer.ClearField("components")
    checked = health.components
    base = answer.components["base_server"]
    base.status = health.status  # every check of GetHealth, summed up as it sums them
    if health.status != "healthy":
        base.message = "GET /health names the components that are not healthy"
    resources = answer.components["resources"]
    if "database_pools" in checked:
        resources.CopyFrom(checked["database_pools"])
    else:
        resources.status = "healthy"  # no resource pool is open: nothing to fail
    runtime = answer.components["async_runtime"]
    # Executions run in this process; PythonCodeNode code in the sandbox workers.
    if "sandbox" in checked:
        runtime.CopyFrom(checked["sandbox"])
    else:
        runtime.status = "healthy"
    secrets = answer.components["secret_manager"]
    secrets.status = "healthy" if secrets_loaded else "unhealthy"
    if not secrets_loaded:
        secrets.message = "no secrets key is loaded"
    for component in answer.components.values():
        if not component.HasField("last_check"):
            component.last_check.CopyFrom(health.timestamp)
    # `resources` shows the tenants' database pools: one tenant's failing database must not turn
    # the gateway's public status (what an operator's monitor reads) to degraded, as in GetHealth.
    answer.status = overall([c.status for name, c in answer.components.items() if name != "resources"])
    return answer


async def durability_status(store: SqlStore, scope: str | None) -> gateway_pb2.DurabilityStatus:
    """Stored executions, remembered request ids and logged events of `scope` (None: every tenant)."""
    by_state, request_ids, events = await asyncio.gather(
        store.executions_by_state(scope), store.count_request_ids(scope), store.count_events(scope)
    )
    stored = sum(by_state.values())
    return gateway_pb2.DurabilityStatus(
        enabled=True,
        opt_in=False,
        active_requests=by_state["pending"] + by_state["running"],
        checkpoint_count=stored,
        event_count=events,
        checkpoint_stats=gateway_pb2.CheckpointStats(stored=stored, by_state=by_state),
        deduplication_stats=gateway_pb2.DeduplicationStats(cached_requests=request_ids),
        event_store_stats=gateway_pb2.EventStoreStats(event_count=events),
    )


async def durable_requests(store: SqlStore, tenant: str, creator: str | None) -> struct_pb2.Struct:
    """The newest executions of `tenant` not finished yet, keyed by id, as ListExecutions shows
    them to the caller."""
    rows = await store.unfinished_executions(tenant, limit=pagination.MAX_PAGE_SIZE, session_creator=creator)
    return pagination.bounded_map(
        (
            execution_id,
            {
                "state": "pending" if state == Execution.STATE_PENDING else "running",
                "workflow_id": workflow_id,
                "session_id": session_id,
                "created_at": _rfc3339(create_us),
            },
        )
        for execution_id, state, workflow_id, session_id, create_us in rows
    )


def _rfc3339(us: int) -> str:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(us)
    return stamp.ToJsonString()
