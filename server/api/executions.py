"""ExecutionService: run workflows, read, list, cancel and watch executions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from flowport.server import pagination
from flowport.server.api.common import idempotency_key, request_id_reused, require
from flowport.server.api.sessions import check_named_session, check_owner, check_session, may_see, session_scope
from flowport.server.api.workflows import workflow_not_found
from flowport.server.engine.executor import FINISHED, Executor
from flowport.server.errors import Aborted, InvalidArgument, NotFound, shown
from flowport.server.events.bus import EventBus, StreamsEnded, SubscriberOverflow
from flowport.server.limits import MAX_WAIT
from flowport.server.storage import IdempotencyConflict
from flowport.server.storage.sql_store import SqlStore
from flowport.server.tenancy import tenant_of
from flowport.server.transcoding import original_path
from flowport.server.types import Context
from flowport.v1 import event_pb2, execution_pb2, execution_pb2_grpc

DEFAULT_WAIT = 30.0

KAILASH_EXECUTE_SUFFIX = "/execute"

E = execution_pb2.Execution
# `state` in the words of Kailash's executions (`status`).
KAILASH_STATUS = {
    E.STATE_PENDING: "started",
    E.STATE_RUNNING: "running",
    E.STATE_SUCCEEDED: "completed",
    E.STATE_FAILED: "failed",
    E.STATE_CANCELLED: "cancelled",
}


def kailash_view(execution: execution_pb2.Execution) -> execution_pb2.Execution:
    """`execution` with Kailash's `status` (and `progress` once it succeeded) set from its state,
    whichever process or stored version it comes from."""
    execution.status = KAILASH_STATUS.get(execution.state, "")
    if execution.state == E.STATE_SUCCEEDED:
        execution.progress = 100.0
    return execution


def _not_found(execution_id: str) -> NotFound:
    return NotFound(
        f"execution {shown(execution_id)} does not exist",
        reason="EXECUTION_NOT_FOUND",
        metadata={"execution_id": execution_id},
    )


def _is_kailash_execute(context: Context) -> bool:
    """True for `POST /workflows/{id}/execute` and `POST /{id}/execute`, which always wait."""
    path = original_path(context)
    if path is None or not path.endswith(KAILASH_EXECUTE_SUFFIX):
        return False
    return path.startswith("/workflows/") or path.count("/") == 2


class ExecutionService(execution_pb2_grpc.ExecutionServiceServicer):
    """Executions of stored workflows."""

    def __init__(self, store: SqlStore, executor: Executor, bus: EventBus, heartbeat: float) -> None:
        self._store = store
        self._executor = executor
        self._bus = bus
        # Shorter than Envoy's stream idle timeout (settings enforce it).
        self._heartbeat = heartbeat

    async def CreateExecution(
        self, request: execution_pb2.CreateExecutionRequest, context: Context
    ) -> execution_pb2.Execution:
        require(request.workflow_id, "workflow_id")
        if request.config_overrides.fields:
            raise InvalidArgument(
                "config_overrides is not supported: a run takes its workflow version's node configs",
                reason="CONFIG_OVERRIDES_UNSUPPORTED",
                violations=[("config_overrides", "must be empty; create a new workflow version instead")],
            )
        key_message = request
        if request.request_id:
            # A retry that waits, or waits longer, asks for the same execution.
            key_message = execution_pb2.CreateExecutionRequest()
            key_message.CopyFrom(request)
            key_message.ClearField("wait")
            key_message.ClearField("wait_timeout")
        key = idempotency_key(request.request_id, key_message)
        wait = request.wait or _is_kailash_execute(context)
        timeout = DEFAULT_WAIT
        if request.HasField("wait_timeout"):
            timeout = request.wait_timeout.ToNanoseconds() / 1e9
            if not 0 < timeout <= MAX_WAIT:
                raise InvalidArgument(
                    f"wait_timeout must be more than 0s and at most {MAX_WAIT:g}s",
                    violations=[("wait_timeout", f"in (0s, {MAX_WAIT:g}s]")],
                )
        if request.workflow_version < 0:
            raise InvalidArgument("workflow_version must not be negative", violations=[("workflow_version", ">= 0")])
        tenant = tenant_of(context)
        # In the same lookup: a version created in another credential's session is missing.
        workflow = await self._store.get_workflow(
            tenant, request.workflow_id, request.workflow_version, session_creator=session_scope(context)
        )
        if workflow is None:
            raise workflow_not_found(request.workflow_id, request.workflow_version)
        if request.session_id:
            await check_session(self._store, context, request.session_id)
        try:
            execution, _ = await self._executor.create(
                tenant,
                workflow,
                request.inputs,
                session_id=request.session_id,
                request_id=request.request_id,
                request_hash=key[1] if key else None,
                waited=wait,
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "with a different request") from None
        if wait and execution.state not in FINISHED:
            waited = await self._executor.wait(tenant, execution.execution_id, timeout)
            if waited is not None:
                return kailash_view(waited)
        return kailash_view(execution)

    async def GetExecution(
        self, request: execution_pb2.GetExecutionRequest, context: Context
    ) -> execution_pb2.Execution:
        require(request.execution_id, "execution_id")
        if request.session_id:
            await check_named_session(self._store, context, request.session_id)
        execution = await self._executor.get(tenant_of(context), request.execution_id)
        # One in another credential's session is as missing as one that never existed.
        if execution is None or not await may_see(self._store, context, execution.session_id):
            raise _not_found(request.execution_id)
        if request.session_id and execution.session_id != request.session_id:
            raise _not_found(request.execution_id)
        return kailash_view(execution)

    async def ListExecutions(
        self, request: execution_pb2.ListExecutionsRequest, context: Context
    ) -> execution_pb2.ListExecutionsResponse:
        size = pagination.page_size(request.page_size)
        if request.state and request.state not in execution_pb2.Execution.State.values():
            raise InvalidArgument(f"unknown state {request.state}", violations=[("state", "not a known state")])
        filters = {"workflow_id": request.workflow_id, "session_id": request.session_id, "state": request.state}
        after = pagination.cursor_time_id(pagination.decode_token(request.page_token, filters))
        if request.session_id:
            await check_owner(self._store, context, request.session_id)
        tenant, creator = tenant_of(context), session_scope(context)
        workflow_id, session_id, state = request.workflow_id, request.session_id, request.state
        rows, total = await asyncio.gather(
            self._store.list_executions(
                tenant,
                workflow_id=workflow_id,
                session_id=session_id,
                state=state,
                after=after,
                limit=size + 1,
                session_creator=creator,
            ),
            self._store.count_listed_executions(
                tenant, workflow_id=workflow_id, session_id=session_id, state=state, session_creator=creator
            ),
        )
        executions, token = pagination.page(
            rows, size, filters, lambda e: [e.create_time.ToMicroseconds(), e.execution_id]
        )
        return execution_pb2.ListExecutionsResponse(
            executions=[kailash_view(e) for e in executions], next_page_token=token, total=total
        )

    async def CancelExecution(
        self, request: execution_pb2.CancelExecutionRequest, context: Context
    ) -> execution_pb2.Execution:
        require(request.execution_id, "execution_id")
        idempotency_key(request.request_id, request)  # validates the key's length
        tenant = tenant_of(context)
        if request.session_id:
            await check_named_session(self._store, context, request.session_id)
        if session_scope(context) is not None or request.session_id:
            # Read first: another credential's session's execution (or one of another
            # session than the one named) must stay untouched.
            seen = await self._executor.get(tenant, request.execution_id)
            if seen is None or not await may_see(self._store, context, seen.session_id):
                raise _not_found(request.execution_id)
            if request.session_id and seen.session_id != request.session_id:
                raise _not_found(request.execution_id)
        execution = await self._executor.cancel(tenant, request.execution_id)
        if execution is None:
            raise _not_found(request.execution_id)
        return kailash_view(execution)

    async def WatchExecution(
        self, request: execution_pb2.WatchExecutionRequest, context: Context
    ) -> AsyncIterator[execution_pb2.WatchExecutionResponse]:
        require(request.execution_id, "execution_id")
        tenant = tenant_of(context)
        execution_id = request.execution_id
        # Subscribe before reading the state, so no event falls in between.
        subscription = self._bus.subscribe(
            lambda e: e.execution_id == execution_id and e.tenant == tenant, client_stream=True, tenant=tenant
        )
        try:
            execution = await self._executor.get(tenant, execution_id)
            if execution is None or not await may_see(self._store, context, execution.session_id):
                raise _not_found(execution_id)
            yield execution_pb2.WatchExecutionResponse(execution=kailash_view(execution))
            if execution.state in FINISHED:
                return
            while True:
                try:
                    event = await subscription.next(self._heartbeat)
                except StreamsEnded:
                    # This server is shutting down: end cleanly; watching again (elsewhere)
                    # sends the execution as it is, then its new events.
                    return
                except SubscriberOverflow:
                    raise Aborted(
                        "the watch fell behind by more than its queue; watch again to get the current state",
                        reason="SUBSCRIBER_TOO_SLOW",
                    ) from None
                if event is None:
                    heartbeat = event_pb2.Event(type="heartbeat", execution_id=execution_id)
                    heartbeat.time.GetCurrentTime()
                    yield execution_pb2.WatchExecutionResponse(event=heartbeat)
                    continue
                yield execution_pb2.WatchExecutionResponse(event=event.to_proto())
                if event.type in ("execution.completed", "execution.failed", "execution.cancelled"):
                    return
        finally:
            subscription.close()
