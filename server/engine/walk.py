"""The walk of one execution: its nodes run, each recorded, until it ends.

A node starts as soon as every node it depends on has finished, so
independent branches run concurrently. Each node attempt is bounded by the
node's timeout; retry-safe nodes are retried with exponential backoff and
jitter. Every state change is written (grouped with concurrent writes by the
store) and published as an event. A node that is not safe to run twice is
recorded RUNNING before it starts, so a crash can never make it run twice:
after a restart such an execution fails as INTERRUPTED instead
(server/engine/takeover.py).

A run holds one of the process's slots (server/engine/slots.py) from its
start until it ends; a server shutdown leaves it RUNNING in the store, for
recovery.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Protocol

from google.rpc import code_pb2, status_pb2

from flowport.server.engine.output_limits import add_outputs, built_outputs
from flowport.server.engine.plan import PlanNode
from flowport.server.engine.run import Execution, NodeRun, Run, error_status, mark_running, publish, timestamp_now
from flowport.server.engine.slots import Slots
from flowport.server.engine.stats import ExecutionCounters
from flowport.server.events.bus import EventBus
from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.server.nodes.paths import MISSING, lookup
from flowport.server.nodes.substitution import Parameters
from flowport.server.observability import tracing
from flowport.server.observability.context import CALL, EXECUTION, request_id
from flowport.server.observability.context import Execution as ExecutionContext
from flowport.server.resolver import RESOLVING_FOR
from flowport.server.storage.sql_store import SqlStore

if TYPE_CHECKING:
    from flowport.server.observability.prometheus import Prometheus

log = logging.getLogger(__name__)
# An end the store could not take is tried again after these many seconds, doubling to at most
# RECORD_RETRY_MAX, for RECORD_RETRY_FOR seconds in all.
RECORD_RETRY_FIRST = 0.5
RECORD_RETRY_MAX = 5.0
RECORD_RETRY_FOR = 600.0
# Ends held for a try again take at most this many bytes (serialized) in all.
RECORDING_MAX_BYTES = 256 * 2**20
BACKOFF_JITTER = 0.2
# Bytes an execution's writes after node ends may take before those of nodes safe to rerun wait
# for the next write that must be made (Walker._write_now): 64 MiB is hundreds of writes of any
# usual execution, and five of one at its 12 MiB.
INTERMEDIATE_WRITE_BYTES = 64 * 2**20


class NodeFailed(Exception):
    """A node failed after its last attempt; the execution fails with `status`."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _finish(node_run: NodeRun, state: int) -> None:
    node_run.state = state  # type: ignore[assignment]
    node_run.end_time.CopyFrom(timestamp_now())
    node_run.duration.FromNanoseconds(node_run.end_time.ToNanoseconds() - node_run.start_time.ToNanoseconds())


class Figures(Protocol):
    """Where the walk counts how executions end (the executor, whose figures GetStats and /metrics read)."""

    @property
    def counters(self) -> ExecutionCounters: ...

    @property
    def prometheus(self) -> Prometheus | None: ...

    def tenant_counters(self, tenant: str) -> ExecutionCounters: ...


class Walker:
    """Starts runs in this process's slots and walks each to its end."""

    def __init__(
        self, store: SqlStore, bus: EventBus, services: NodeServices, slots: Slots, *, figures: Figures, owner: str
    ) -> None:
        self._store = store
        self._bus = bus
        self._services = services
        self._slots = slots
        self._figures = figures
        self._owner = owner  # this process's lease owner id
        # Ends the store could not take when they came (its database down): written when it can,
        # each run kept in its slot meanwhile, so its lease is renewed and no sweep takes it over.
        self._recording: set[asyncio.Task[None]] = set()
        self._recording_bytes = 0

    def start(self, run: Run) -> None:
        """Run `run` in a slot of its own, in a task of its own."""
        # Read now, while the call that starts it (if any) is still open.
        call = CALL.get()
        run.request_id = request_id(call) if call is not None else None
        self._slots.add(run)
        run.task = asyncio.create_task(self._execute(run), name=f"execution {run.execution.execution_id}")

    def _system_error(self, tenant: str, execution: Execution, message: str) -> None:
        """A fault of the gateway's own (not of the workflow) that an execution met: `system.error`
        for the tenant's streams and webhooks. The message names the fault's kind, never its details."""
        publish(self._bus, "system.error", tenant, execution, {"error": message, "source": "executor"})

    async def _execute(self, run: Run) -> None:
        # This task's log lines name the execution and the request that started it
        # (server/observability/logs.py); the call that created it may be over.
        CALL.set(None)
        EXECUTION.set(ExecutionContext(run.tenant, run.execution.execution_id, run.request_id))
        prometheus = self._figures.prometheus
        if prometheus is not None:
            prometheus.executions_running.inc()
        try:
            if not tracing.enabled():
                await self._execute_traced(run, None)
                return
            # A child of the RPC that created it (the task inherited its context); a root
            # span for one resumed or taken from the queue.
            attributes = {
                "flowport.execution_id": run.execution.execution_id,
                "flowport.workflow_id": run.execution.workflow_id,
                "flowport.tenant": run.tenant,
            }
            with tracing.span("execution", attributes=attributes) as span:
                await self._execute_traced(run, span)
        finally:
            if prometheus is not None:
                prometheus.executions_running.dec()

    async def _execute_traced(self, run: Run, span: Any) -> None:
        execution = run.execution
        started = time.perf_counter()
        try:
            if execution.state == Execution.STATE_PENDING:  # taken from the queue, or left before it began
                mark_running(execution)
                await self._store.save_execution(execution, wait=False)
                run.starting = True
            if run.starting:
                self._figures.counters.started += 1
                self._figures.tenant_counters(run.tenant).started += 1
                data = {"workflow_version": execution.workflow_version}
                publish(self._bus, "execution.started", run.tenant, execution, data)
            await self._walk(run)
            execution.state = Execution.STATE_SUCCEEDED
        except NodeFailed as failure:
            execution.state = Execution.STATE_FAILED
            execution.error.CopyFrom(failure.status)
        except asyncio.CancelledError:
            if not run.cancel_requested:
                # Server shutdown: leave the execution RUNNING for recovery.
                self._slots.drop(run)
                run.finished.set()
                raise
            execution.state = Execution.STATE_CANCELLED
            execution.error.CopyFrom(error_status(code_pb2.CANCELLED, "cancelled by request", "CANCELLED", {}))
        except Exception as exc:
            log.exception("execution %s failed inside the executor", execution.execution_id)
            execution.state = Execution.STATE_FAILED
            execution.error.CopyFrom(
                error_status(code_pb2.INTERNAL, f"internal error: {type(exc).__name__}", "INTERNAL", {})
            )
            self._system_error(run.tenant, execution, execution.error.message)
        # From here the outcome is decided: a late cancel must not interrupt
        # recording it (the run would never be marked finished).
        run.finalizing = True
        for node_run in run.node_runs.values():
            if node_run.state == NodeRun.STATE_RUNNING:  # siblings stopped by a failure or a cancel
                _finish(node_run, NodeRun.STATE_CANCELLED)
        if span is not None:
            span.set_attribute("flowport.state", Execution.State.Name(execution.state))
            if execution.state != Execution.STATE_SUCCEEDED:
                tracing.fail(span, execution.error.message)
        recorded = True
        try:
            recorded = await asyncio.shield(self._finalize(run, started))
        finally:
            if recorded:
                self._slots.drop(run)
                self._slots.freed.set()
            run.finished.set()

    async def _finalize(self, run: Run, started: float) -> bool:
        """Record and announce the end; whether it was recorded now (else it is being retried, and
        the run keeps its slot until then)."""
        execution = run.execution
        execution.end_time.CopyFrom(timestamp_now())
        if execution.HasField("start_time"):
            execution.duration.FromNanoseconds(
                execution.end_time.ToNanoseconds() - execution.start_time.ToNanoseconds()
            )
        recorded = True
        try:
            await self._record_end(run.tenant, execution, stored=run.stored)
        except Exception as exc:  # noqa: BLE001 - the end is kept, and written once the store takes it
            recorded = self._keep_recording(run, exc)
        run.stored = True
        final = {
            Execution.STATE_SUCCEEDED: ("execution.completed", "succeeded"),
            Execution.STATE_FAILED: ("execution.failed", "failed"),
            Execution.STATE_CANCELLED: ("execution.cancelled", "cancelled"),
        }[execution.state]
        data: dict[str, Any] = {"state": Execution.State.Name(execution.state)}
        if execution.HasField("error"):
            data["error"] = execution.error.message
        publish(self._bus, final[0], run.tenant, execution, data)
        took = time.perf_counter() - started
        for counters in (self._figures.counters, self._figures.tenant_counters(run.tenant)):
            setattr(counters, final[1], getattr(counters, final[1]) + 1)
            counters.latencies_ms.append(1000 * took)
        prometheus = self._figures.prometheus
        if prometheus is not None:
            prometheus.execution_ended(run.tenant, execution.workflow_id, final[1], took)
        if execution.state == Execution.STATE_FAILED:
            log.info("execution ended failed: %s", execution.error.message)
        else:
            log.debug("execution ended %s in %.3f ms", final[1], 1000 * took)
        return recorded

    async def _record_end(self, tenant: str, execution: Execution, *, stored: bool, late: bool = False) -> bool:
        """Write an ended execution: over its stored record, or as its first (and only) one.
        `late` (a try again): over a record still unfinished and still this process's only, and
        an insert that finds the record there counts as written. Whether it was written."""
        if stored:
            if late:
                return await self._store.save_execution_end(execution, self._owner)
            await self._store.save_execution(execution)
            return True
        try:
            # Ended, so leased to nobody.
            await self._store.insert_execution(tenant, execution, None)
        except Exception as exc:
            # An earlier try that failed as far as this process saw may have committed it.
            if not late or not any(kind.__name__ == "IntegrityError" for kind in type(exc).__mro__):
                raise
        return True

    def _keep_recording(self, run: Run, failure: BaseException) -> bool:
        """The store refused an end: try it again in the background (the run keeps its slot, so its
        lease goes on being renewed); whether it is recorded (False: being retried)."""
        execution = run.execution
        size = execution.ByteSize()
        if self._recording_bytes + size > RECORDING_MAX_BYTES:
            # Held in memory until written: past the bound it is left as after a crash (recovered
            # by the next sweep or start, or lost for a run written once at its end).
            log.error(
                "could not record the end of execution %s (%s), and too many ends wait already; left for recovery",
                execution.execution_id,
                type(failure).__name__,
            )
            self._system_error(run.tenant, execution, "the end of the execution was not stored")
            return True
        log.warning(
            "could not record the end of execution %s (%s); trying again until the store takes it",
            execution.execution_id,
            type(failure).__name__,
        )
        ended = Execution()
        ended.CopyFrom(execution)
        self._recording_bytes += size
        task = asyncio.create_task(self._record_later(run, ended, stored=run.stored))
        self._recording.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._recording.discard(task)
            self._recording_bytes -= size
            self._slots.drop(run)
            self._slots.freed.set()

        task.add_done_callback(done)
        return False

    async def _record_later(self, run: Run, execution: Execution, *, stored: bool) -> None:
        """Keep trying to write an ended execution the store refused (its database unreachable),
        backing off to RECORD_RETRY_MAX seconds, for RECORD_RETRY_FOR seconds at most. Its caller
        and its streams already have its end; until it is written a stored record says RUNNING,
        or (a run written once at its end) there is none."""
        delay, deadline = RECORD_RETRY_FIRST, time.monotonic() + RECORD_RETRY_FOR
        while True:
            await asyncio.sleep(delay)
            try:
                written = await self._record_end(run.tenant, execution, stored=stored, late=True)
            except Exception as exc:  # noqa: BLE001 - tried again, then given up on, said both ways
                if time.monotonic() + delay > deadline:
                    log.error(
                        "gave up recording the end of execution %s after %.0fs (%s)",
                        execution.execution_id,
                        RECORD_RETRY_FOR,
                        type(exc).__name__,
                    )
                    self._system_error(run.tenant, execution, "the end of the execution was not stored")
                    return
                delay = min(delay * 2, RECORD_RETRY_MAX)
                continue
            if written:
                log.warning("recorded the end of execution %s once the store took it", execution.execution_id)
            else:
                log.error(
                    "the end of execution %s was not recorded: another process took it over", execution.execution_id
                )
            return

    def recording(self) -> set[asyncio.Task[None]]:
        """The tries of ends not recorded yet (a stop waits for them, up to its limit)."""
        return set(self._recording)

    async def close(self) -> None:
        """Stop the tries of ends not recorded yet, naming each left unwritten."""
        tasks = list(self._recording)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            log.error("%d executions ended without their end recorded (the store was unavailable)", len(tasks))

    def _inputs_for(self, run: Run, node: PlanNode) -> tuple[dict[str, Any], bool]:
        """The node's parameters, and whether it must be skipped."""
        params = dict(node.config)
        own = run.inputs.get(node.node_id)
        for key, value in run.inputs.items():
            if key == node.node_id and isinstance(value, dict):
                continue
            if node.reads is None or key in node.reads:
                params[key] = value
        if isinstance(own, dict):
            fixed = node.node_type.fixed_params
            # CreateExecution refuses the fixed ones; this keeps them out of a run started otherwise.
            params.update({k: v for k, v in own.items() if k not in fixed} if fixed else own)
        missing = 0
        for binding in node.inbound:
            outputs = run.done.get(binding.from_node)
            if outputs is None or binding.path[0] not in outputs:
                missing += 1  # the source was skipped or did not take this branch
                continue
            value = lookup(outputs, binding.path)
            if value is MISSING:
                raise NodeFailed(
                    error_status(
                        code_pb2.FAILED_PRECONDITION,
                        f"node {node.node_id!r}: output path {'.'.join(map(str, binding.path))!r} "
                        f"of node {binding.from_node!r} does not exist",
                        "MISSING_VALUE",
                        {"node_id": node.node_id, "from_node": binding.from_node},
                    )
                )
            params[binding.to_input] = value
        if node.inbound and missing:
            skip = missing == len(node.inbound) if node.node_type.runs_on_partial_inputs else True
            return params, skip
        return params, False

    async def _walk(self, run: Run) -> None:
        plan = run.plan
        started: set[str] = set(run.done) | run.skipped
        tasks: dict[asyncio.Task[dict[str, Any]], str] = {}
        try:
            while True:
                ready: list[tuple[str, PlanNode, dict[str, Any]]] = []
                # Once per step, not per node: rebuilt for each node, the walk of a long chain
                # cost time that grew with the cube of its length (0.36 s for 500 nodes).
                settled = set(run.done) | run.skipped
                progressed = True
                while progressed:
                    progressed = False
                    for nid in plan.order:
                        if nid in started:
                            continue
                        node = plan.nodes[nid]
                        if not node.upstream <= settled:
                            continue
                        started.add(nid)
                        params, skip = self._inputs_for(run, node)
                        if skip:
                            self._record_skip(run, node)
                            settled.add(nid)
                            progressed = True
                            continue
                        ready.append((nid, node, Parameters(params, run.variables)))
                if len(ready) == 1 and not tasks:
                    # The one node to run now (a chain's next): run in this
                    # task, without a task and a wait of its own.
                    nid, node, params = ready[0]
                    run.done[nid] = await self._run_node(run, node, params)  # raises NodeFailed
                else:
                    for nid, node, params in ready:
                        tasks[asyncio.create_task(self._run_node(run, node, params))] = nid
                    if not tasks:
                        return
                    finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        nid = tasks.pop(task)
                        run.done[nid] = task.result()  # raises NodeFailed
                total = len(plan.nodes)
                complete = len(run.done) + len(run.skipped)
                run.execution.progress = round(100 * complete / total, 2)  # saved with its next write
                publish(
                    self._bus,
                    "execution.progress",
                    run.tenant,
                    run.execution,
                    {"completed": complete, "total": total, "progress": complete / total},
                )
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _attempt(self, node: PlanNode, ctx: NodeContext, params: dict[str, Any]) -> dict[str, Any]:
        """One attempt of `node`, within its timeout, in a span of its own when tracing."""
        # Names the node looks up count against its tenant's share of the resolver's threads.
        acting = RESOLVING_FOR.set(ctx.tenant)
        try:
            return await self._attempt_within(node, ctx, params)
        finally:
            RESOLVING_FOR.reset(acting)

    async def _attempt_within(self, node: PlanNode, ctx: NodeContext, params: dict[str, Any]) -> dict[str, Any]:
        # asyncio.timeout, unlike wait_for, runs the node in this task: no extra task per node.
        async with asyncio.timeout(node.timeout):
            if not tracing.enabled():
                return await node.node_type.run(ctx, node.prepared, params)
            attributes = {
                "flowport.node_id": node.node_id,
                "flowport.node_type": node.node_type.type_name,
                "flowport.attempt": ctx.attempt,
            }
            with tracing.span(f"node {node.node_id}", attributes=attributes) as span:
                try:
                    return await node.node_type.run(ctx, node.prepared, params)
                except NodeError as exc:
                    tracing.fail(span, f"{exc.reason}: {exc.message}")
                    raise

    @staticmethod
    def _write_now(run: Run, node: PlanNode) -> bool:
        """Whether the end of `node` is written now. Each such write is the whole execution, so
        many nodes after a large output would write gigabytes through the writer every tenant
        shares: past INTERMEDIATE_WRITE_BYTES, a node safe to rerun is written with the next write
        that must be made (before a node not safe to rerun starts, at a failure, at the end). A
        crash meanwhile reruns such nodes, which is what being safe to rerun allows."""
        if node.retry_safe and run.written > INTERMEDIATE_WRITE_BYTES:
            return False
        run.written += run.output_bytes
        return True

    def _admit(self, run: Run, node: PlanNode, size: int) -> None:
        """Count `size` more bytes of outputs that `run` holds, or refuse them (NodeError) when its
        tenant's runs in this process hold their most. The node has run by then: retried (its
        tenant's other runs end meanwhile) only when it is safe to run again."""
        if not self._slots.outputs_fit(run.tenant, size):
            cap = self._slots.tenant_max_output_bytes
            raise NodeError(
                f"outputs of {size} bytes would bring this tenant's running executions past the {cap} bytes "
                "they may hold in a server process (--tenant-max-running-output-bytes)",
                reason="TENANT_OUTPUT_MEMORY",
                retryable=node.retry_safe,
            )
        self._slots.outputs_added(run, size)

    def _record_skip(self, run: Run, node: PlanNode) -> None:
        node_run = run.execution.node_runs.add(
            node_id=node.node_id, node_type=node.node_type.type_name, state=NodeRun.STATE_SKIPPED
        )
        node_run.start_time.CopyFrom(timestamp_now())
        node_run.end_time.CopyFrom(node_run.start_time)
        run.node_runs[node.node_id] = node_run
        run.skipped.add(node.node_id)

    async def _run_node(self, run: Run, node: PlanNode, params: dict[str, Any]) -> dict[str, Any]:
        execution = run.execution
        node_run = execution.node_runs.add(
            node_id=node.node_id, node_type=node.node_type.type_name, state=NodeRun.STATE_RUNNING
        )
        node_run.start_time.CopyFrom(timestamp_now())
        run.node_runs[node.node_id] = node_run
        if not node.retry_safe:
            # Durably RUNNING before it starts: after a crash it is never rerun.
            # (A run that is not stored has only retry-safe nodes.)
            await self._store.save_execution(execution)
        publish(
            self._bus, "node.started", run.tenant, execution, {"node_id": node.node_id, "node_type": node_run.node_type}
        )
        error = NodeError("no attempt made")
        for attempt in range(1, node.max_attempts + 1):
            node_run.attempts = attempt
            ctx = NodeContext(run.tenant, execution.execution_id, node.node_id, attempt, node.timeout, self._services)
            try:
                outputs = await self._attempt(node, ctx, params)
                try:
                    built = await built_outputs(node.node_id, outputs)
                    # With no await between: parallel nodes' outputs are each counted.
                    run.output_bytes = add_outputs(
                        execution.outputs, built, run.output_bytes, lambda size: self._admit(run, node, size)
                    )
                except (TypeError, ValueError) as exc:
                    raise NodeError(f"outputs are not JSON: {exc}", reason="BAD_OUTPUT") from None
            except NodeError as exc:
                error = exc
            except TimeoutError:
                error = NodeError(f"timed out after {node.timeout:g}s", reason="NODE_TIMEOUT", retryable=True)
            except Exception as exc:
                log.exception("node type %s raised", node.node_type.type_name)
                error = NodeError(f"{type(exc).__name__}: {exc}", reason="NODE_CRASHED")
            else:
                _finish(node_run, NodeRun.STATE_SUCCEEDED)
                # Awaited only when other nodes wait for this output: a node
                # starts only once what it reads is durable, so a restart never
                # reruns a node whose dependents already started. A last node
                # that is safe to rerun is written with the execution's end; one
                # that is not is written now, so a crash before the end does
                # not fail it as interrupted.
                if run.stored and (node.downstream or not node.retry_safe) and self._write_now(run, node):
                    await self._store.save_execution(execution, wait=bool(node.downstream))
                publish(
                    self._bus, "node.completed", run.tenant, execution, {"node_id": node.node_id, "attempts": attempt}
                )
                return outputs
            if attempt < node.max_attempts and error.retryable:
                delay = error.retry_after or min(node.max_backoff, node.initial_backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))  # noqa: S311
                continue
            break
        code = code_pb2.DEADLINE_EXCEEDED if error.reason in ("NODE_TIMEOUT", "SANDBOX_TIMEOUT") else code_pb2.ABORTED
        status = error_status(
            code,
            f"node {node.node_id!r} ({node.node_type.type_name}) failed: {error.message}",
            error.reason,
            {"node_id": node.node_id, "node_type": node.node_type.type_name, "attempts": str(node_run.attempts)},
        )
        node_run.error.CopyFrom(status)
        _finish(node_run, NodeRun.STATE_FAILED)
        if run.stored:
            await self._store.save_execution(execution)
        publish(
            self._bus,
            "node.failed",
            run.tenant,
            execution,
            {"node_id": node.node_id, "error": status.message, "reason": error.reason},
        )
        raise NodeFailed(status)
