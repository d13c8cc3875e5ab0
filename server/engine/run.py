"""An execution in progress in this process, and what every path that changes one shares.

`Run` is what the walk (server/engine/walk.py) advances; starting one, the
takeover of executions from elsewhere (server/engine/takeover.py) and
cancelling one record their outcomes with the same statuses and events.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from flowport.server.engine.plan import Plan
from flowport.server.errors import DOMAIN, cut
from flowport.server.events.bus import EventBus
from flowport.server.nodes.base import MAX_MESSAGE_CHARS
from flowport.server.nodes.substitution import execution_variables
from flowport.v1 import execution_pb2

Execution = execution_pb2.Execution
NodeRun = execution_pb2.NodeRun
FINISHED = (Execution.STATE_SUCCEEDED, Execution.STATE_FAILED, Execution.STATE_CANCELLED)


def timestamp_now() -> timestamp_pb2.Timestamp:
    """Now, to the nanosecond."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def error_status(code: int, message: str, reason: str, metadata: dict[str, str]) -> status_pb2.Status:
    """The google.rpc.Status an execution or a node run ends with, its ErrorInfo naming `reason`."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    return status_pb2.Status(code=code, message=cut(message, MAX_MESSAGE_CHARS), details=[detail])


def mark_running(execution: Execution) -> None:
    """`execution` starts now."""
    execution.state = Execution.STATE_RUNNING
    execution.start_time.CopyFrom(timestamp_now())


def publish(bus: EventBus, type_: str, tenant: str, execution: Execution, data: dict[str, Any] | None = None) -> None:
    """Publish an event of `execution` (to its tenant's streams and webhooks)."""
    bus.publish(
        type_,
        tenant=tenant,
        session_id=execution.session_id,
        workflow_id=execution.workflow_id,
        execution_id=execution.execution_id,
        data=data,
    )


@dataclass
class Run:
    """An execution in progress in this process."""

    tenant: str
    plan: Plan
    execution: Execution
    inputs: dict[str, Any]
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)
    node_runs: dict[str, NodeRun] = field(default_factory=dict)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    finalizing: bool = False
    task: asyncio.Task[None] | None = None
    # The x-request-id of the call that started it, for its log lines.
    request_id: str | None = None
    # Recorded RUNNING by the call that created it: the walk counts and announces its start.
    starting: bool = False
    # Whether its row exists. A waited run of a rerunnable plan is written once, when it ends
    # (Executor.create), unless its id is handed out before that (Executor.wait).
    stored: bool = True
    # Serialized bytes of the execution as its nodes' outputs are added (output_limits.
    # MAX_EXECUTION_BYTES): its inputs and what it was taken over with count from the start.
    output_bytes: int = 0
    # About how many bytes its writes after a node's end have taken so far (walk.py bounds them).
    written: int = 0

    def __post_init__(self) -> None:
        self.output_bytes = self.execution.ByteSize()

    @functools.cached_property
    def variables(self) -> dict[str, Any]:
        """What `${tenant_id}` and the like mean in this execution's node configs."""
        e = self.execution
        return execution_variables(self.tenant, e.session_id, e.execution_id, e.workflow_id)
