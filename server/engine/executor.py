"""The executor: runs executions of compiled plans, durably and concurrently.

An execution is written PENDING before anything runs. Its nodes start as
soon as every node they depend on has finished, so independent branches
run concurrently. Each node attempt is bounded by the node's timeout;
retry-safe nodes are retried with exponential backoff and jitter. Every
state change is written (grouped with concurrent writes by the store) and
published as an event. A node that is not safe to run twice is recorded
RUNNING before it starts, so a crash can never make it run twice: after a
restart such an execution fails as INTERRUPTED instead.

At most `max_concurrent` executions run at once in this process. Beyond
that, processes sharing PostgreSQL and Redis hand the execution to the
shared work queue (server/engine/work_queue.py), where any process with a
free slot takes it, up to a backlog of QUEUE_DEPTH times `max_concurrent`;
past that, or with no queue, CreateExecution fails fast with
RESOURCE_EXHAUSTED (and a RetryInfo) rather than queueing without bound.

One tenant runs at most `tenant_share` of those slots at once in a process:
beyond it that tenant's new executions fail the same way (reason
TENANT_EXECUTION_SHARE), while other tenants still start theirs; and it has
at most QUEUE_DEPTH times its share waiting in the queue (reason
TENANT_QUEUE_SHARE), so it cannot fill the backlog the others need. A
process taking work from the shared queue passes over a tenant at its share
there (the entry goes back to the queue for another process, or for later).

Every way into this process's slots respects both limits: the queue, the
takeover of executions whose process died, and recovery at start take at
most the free slots, and per tenant its free share; what does not fit stays
for a later sweep or another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from flowport.server.clock import now_us
from flowport.server.engine.plan import InvalidWorkflow, Plan, PlanCache, PlanNode
from flowport.server.engine.stats import ExecutionCounters
from flowport.server.engine.values import python_to_struct, struct_to_python
from flowport.server.engine.work_queue import QUEUE_FAILURES, QueuedExecution, RedisWorkQueue
from flowport.server.errors import DOMAIN, InvalidArgument, ResourceExhausted
from flowport.server.events.bus import EventBus, Subscription
from flowport.server.ids import new_id
from flowport.server.leases import Leases
from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.server.nodes.paths import MISSING, lookup
from flowport.server.nodes.substitution import Parameters, execution_variables
from flowport.server.observability import tracing
from flowport.server.observability.context import CALL, EXECUTION, request_id
from flowport.server.observability.context import Execution as ExecutionContext
from flowport.server.storage.base import ExpiredExecution, Store
from flowport.v1 import execution_pb2, workflow_pb2

if TYPE_CHECKING:
    from flowport.server.observability.prometheus import Prometheus

log = logging.getLogger(__name__)
# Asks the process running an execution to cancel it (cancel through another process).
CANCEL_REQUESTED = "execution.cancel_requested"
TERMINAL_EVENTS = frozenset({"execution.completed", "execution.failed", "execution.cancelled"})
CANCEL_WAIT = 10.0
# A queued backlog beyond this many times max_concurrent is refused, not queued.
QUEUE_DEPTH = 4
# How often a wait for an execution running elsewhere rereads it, in case the
# event that says it ended was lost (Redis unreachable between the processes).
WAIT_POLL = 1.0
QUEUE_RETRY_MAX = 5.0

Execution = execution_pb2.Execution
NodeRun = execution_pb2.NodeRun
FINISHED = (Execution.STATE_SUCCEEDED, Execution.STATE_FAILED, Execution.STATE_CANCELLED)
BACKOFF_JITTER = 0.2


class NodeFailed(Exception):
    """A node failed after its last attempt; the execution fails with `status`."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def _status(code: int, message: str, reason: str, metadata: dict[str, str]) -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    return status_pb2.Status(code=code, message=message, details=[detail])


def _finish(node_run: NodeRun, state: int) -> None:
    node_run.state = state  # type: ignore[assignment]
    node_run.end_time.CopyFrom(_now())
    node_run.duration.FromNanoseconds(node_run.end_time.ToNanoseconds() - node_run.start_time.ToNanoseconds())


@dataclass
class _Run:
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

    @functools.cached_property
    def variables(self) -> dict[str, Any]:
        """What `${tenant_id}` and the like mean in this execution's node configs."""
        e = self.execution
        return execution_variables(self.tenant, e.session_id, e.execution_id, e.workflow_id)


class Executor:
    """Starts, runs, cancels and recovers executions."""

    def __init__(
        self,
        store: Store,
        plans: PlanCache,
        bus: EventBus,
        services: NodeServices,
        *,
        max_concurrent: int,
        leases: Leases | None = None,
        exclusive: bool = True,
        queue: RedisWorkQueue | None = None,
        tenant_share: int | None = None,
    ) -> None:
        """`tenant_share`: executions one tenant may run at once here (None: up to `max_concurrent`)."""
        if tenant_share is not None and tenant_share < 1:
            raise ValueError("a tenant's share of the execution slots must be at least one")
        self._store = store
        self._plans = plans
        self._bus = bus
        self._services = services
        self._max = max_concurrent
        # None when one tenant may fill every slot anyway.
        self._tenant_max = tenant_share if tenant_share is not None and tenant_share < max_concurrent else None
        # Per tenant: its runs in _runs plus its executions being admitted (as len(_runs) + _admitting).
        self._tenant_slots: dict[str, int] = {}
        # Per tenant: its CreateExecution calls admitted to the queue whose rows are not written yet.
        self._tenant_queuing: dict[str, int] = {}
        self._queue_admission = asyncio.Lock()
        # Each execution this process runs is leased to it (server/leases.py).
        # `exclusive`: no other process can share the store (SQLite), so what
        # is unfinished at start is free to take at once, whatever its lease says.
        self._leases = leases or Leases()
        self._exclusive = exclusive
        # Shared with other processes; None: executions run where they are created.
        self._queue = queue
        self._consuming: asyncio.Task[None] | None = None
        self._slot_freed = asyncio.Event()
        self._leasing: asyncio.Task[None] | None = None
        self._following: asyncio.Task[None] | None = None
        self._cancelling: set[asyncio.Task[Execution | None]] = set()
        self._runs: dict[str, _Run] = {}
        self._admitting = 0
        self.counters = ExecutionCounters()
        self._tenant_counters: dict[str, ExecutionCounters] = {}
        # Set by the app when /metrics is on (server/observability/prometheus.py).
        self.prometheus: Prometheus | None = None

    @property
    def running(self) -> int:
        """Executions in progress in this process."""
        return len(self._runs)

    @property
    def tenant_share(self) -> int:
        """Executions one tenant may run at once in this process."""
        return self._max if self._tenant_max is None else self._tenant_max

    def tenant_running(self, tenant: str) -> int:
        """`tenant`'s executions in progress (or being admitted) in this process."""
        return self._tenant_slots.get(tenant, 0)

    def _tenant_full(self, tenant: str) -> bool:
        return self._tenant_max is not None and self._tenant_slots.get(tenant, 0) >= self._tenant_max

    def _hold_slot(self, tenant: str, change: int) -> None:
        left = self._tenant_slots.get(tenant, 0) + change
        if left > 0:
            self._tenant_slots[tenant] = left
        else:
            self._tenant_slots.pop(tenant, None)

    def _room(self) -> int:
        """Slots free in this process (runs and admissions hold one each)."""
        return self._max - len(self._runs) - self._admitting

    def _reserve(self, tenant: str, change: int) -> None:
        """Hold (or, negative, free) slots for executions being claimed, so nothing else takes them meanwhile."""
        self._admitting += change
        self._hold_slot(tenant, change)
        if change < 0:
            self._slot_freed.set()

    def tenant_counters(self, tenant: str) -> ExecutionCounters:
        """`tenant`'s execution figures in this process (GetStats for a tenant's users)."""
        counters = self._tenant_counters.get(tenant)
        if counters is None:
            counters = self._tenant_counters[tenant] = ExecutionCounters(latencies_ms=deque(maxlen=1000))
        return counters

    # -- starting ---------------------------------------------------------

    async def create(
        self,
        tenant: str,
        workflow: workflow_pb2.Workflow,
        inputs: Any,
        *,
        session_id: str,
        request_id: str,
        request_hash: bytes | None,
    ) -> tuple[Execution, bool]:
        """Record and start an execution; returns it and whether it is a replay.

        Raises InvalidArgument for missing inputs, ResourceExhausted when full.
        """
        plan = self._plans.get(tenant, workflow)
        values = struct_to_python(inputs)
        missing = [name for name in plan.inputs_schema["required"] if name not in values]
        if missing:
            raise InvalidArgument(
                f"inputs missing for workflow {workflow.workflow_id!r}: {', '.join(missing)}",
                violations=[(f"inputs.{name}", "required by the workflow") for name in missing],
            )
        key = (request_id, request_hash) if request_id and request_hash is not None else None
        tenant_full = self._tenant_full(tenant)
        queued = len(self._runs) + self._admitting >= self._max
        if queued or tenant_full:
            # A retry of a call that already started an execution is answered
            # even when full: it asks for nothing new.
            first_id = None if key is None else await self._store.replayed_execution(tenant, key)
            if first_id is not None:
                first = await self.get(tenant, first_id)
                assert first is not None, "an idempotency record points at a missing execution"
                return first, True
            if tenant_full:
                # Refused, not queued: queueing a tenant's overflow would let it
                # fill the shared backlog the other tenants need.
                raise ResourceExhausted(
                    f"this tenant is running its share of {self._tenant_max} of the server's {self._max} "
                    "concurrent executions; retry shortly",
                    reason="TENANT_EXECUTION_SHARE",
                    metadata={
                        "tenant_max_concurrent_executions": str(self._tenant_max),
                        "max_concurrent_executions": str(self._max),
                    },
                    retry_delay=1.0,
                )
        execution = Execution(
            execution_id=new_id("exe"),
            workflow_id=workflow.workflow_id,
            workflow_version=workflow.version,
            session_id=session_id,
            state=Execution.STATE_PENDING,
            inputs=inputs,
            create_time=_now(),
            tenant=tenant,
            request_id=request_id,
        )
        # A queued execution is recorded unowned, to be checked one lease
        # from now: if it is still waiting then, the lease sweep of some
        # process makes sure its queue entry still exists (see _without_queued).
        owner, admitting = ("", 0) if queued else (self._leases.owner, 1)
        self._admitting += admitting
        self._hold_slot(tenant, admitting)
        counted = False
        try:
            if queued:
                counted = await self._admit_to_queue(tenant)
            result = await self._store.insert_execution(
                tenant, execution, key, owner=owner, lease_until_us=self._leases.until()
            )
        finally:
            self._admitting -= admitting
            self._hold_slot(tenant, -admitting)
            if counted and (left := self._tenant_queuing.pop(tenant) - 1):
                self._tenant_queuing[tenant] = left
        if result.replayed:
            first = await self.get(tenant, result.response.decode())
            assert first is not None, "an idempotency record points at a missing execution"
            return first, True
        if queued:
            await self._submit(tenant, execution.execution_id)
        else:
            self._start(_Run(tenant, plan, execution, values))
        return execution, False

    async def _admit_to_queue(self, tenant: str) -> bool:
        """Raise ResourceExhausted unless `tenant`'s execution may wait in the shared queue.

        Returns whether it was counted in `_tenant_queuing` (the caller uncounts it once its row exists).
        """
        if not await self._queue_has_room():
            raise ResourceExhausted(
                f"the server is running its maximum of {self._max} executions; retry shortly",
                reason="TOO_MANY_EXECUTIONS",
                metadata={"max_concurrent_executions": str(self._max)},
                retry_delay=1.0,
            )
        if self._tenant_max is None:
            return False
        limit = QUEUE_DEPTH * self._tenant_max
        # One admission at a time, so two calls of a burst never both take the last place; and
        # the calls admitted whose rows are not written yet are counted BEFORE the store is
        # read: one that finishes its write meanwhile is then in one of the two counts (or
        # both, refusing a moment early), never in neither.
        async with self._queue_admission:
            in_flight = self._tenant_queuing.get(tenant, 0)
            waiting = await self._store.count_queued_executions(tenant) + in_flight
            if waiting < limit:
                self._tenant_queuing[tenant] = self._tenant_queuing.get(tenant, 0) + 1
                return True
            raise ResourceExhausted(
                f"this tenant already has its share of {limit} of the {QUEUE_DEPTH * self._max} executions "
                "the server queues waiting for a free slot; retry shortly",
                reason="TENANT_QUEUE_SHARE",
                metadata={
                    "tenant_max_queued_executions": str(limit),
                    "max_queued_executions": str(QUEUE_DEPTH * self._max),
                },
                retry_delay=1.0,
            )

    async def _queue_has_room(self) -> bool:
        if self._queue is None:
            return False
        try:
            return await self._queue.backlog() < QUEUE_DEPTH * self._max
        except QUEUE_FAILURES as exc:
            self.counters.queue_failures += 1
            log.warning("the execution work queue cannot be reached (%s); refusing work beyond this process", exc)
            return False

    async def _submit(self, tenant: str, execution_id: str) -> None:
        assert self._queue is not None
        try:
            await self._queue.submit(tenant, execution_id)
        except QUEUE_FAILURES as exc:
            # Recorded all the same: a lease from now the lease sweep finds it
            # missing from the queue and adds it again (runs it, if Redis is still down).
            self.counters.queue_failures += 1
            log.warning(
                "could not queue execution %s (%s); the lease sweep queues it again in %gs",
                execution_id,
                exc,
                self._leases.seconds,
            )
        else:
            self.counters.queued += 1

    def _start(self, run: _Run) -> None:
        # Read now, while the call that starts it (if any) is still open.
        call = CALL.get()
        run.request_id = request_id(call) if call is not None else None
        self._runs[run.execution.execution_id] = run
        self._hold_slot(run.tenant, 1)
        run.task = asyncio.create_task(self._execute(run), name=f"execution {run.execution.execution_id}")

    # -- reading, waiting, cancelling --------------------------------------

    async def get(self, tenant: str, execution_id: str) -> Execution | None:
        """The execution as it is now (from memory while it runs here)."""
        run = self._runs.get(execution_id)
        if run is not None and run.tenant == tenant:
            snapshot = Execution()
            snapshot.CopyFrom(run.execution)
            return snapshot
        return await self._store.get_execution(tenant, execution_id)

    async def wait(self, tenant: str, execution_id: str, timeout: float) -> Execution | None:
        """The execution once it has ended, or as it is when `timeout` passes."""
        run = self._runs.get(execution_id)
        if run is None or run.tenant != tenant:
            return await self._wait_elsewhere(tenant, execution_id, timeout)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await run.finished.wait()
        snapshot = Execution()
        snapshot.CopyFrom(run.execution)
        return snapshot

    async def _wait_elsewhere(self, tenant: str, execution_id: str, timeout: float) -> Execution | None:
        """Wait for an execution this process is not running (queued, or run by another process)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Subscribed before the first read, so an end between the two is not missed.
        ended = self._bus.subscribe(
            lambda e: e.execution_id == execution_id and e.tenant == tenant and e.type in TERMINAL_EVENTS
        )
        try:
            while True:
                run = self._runs.get(execution_id)
                if run is not None and run.tenant == tenant:  # taken from the queue by this process
                    return await self.wait(tenant, execution_id, max(0.0, deadline - loop.time()))
                execution = await self.get(tenant, execution_id)
                remaining = deadline - loop.time()
                if execution is None or execution.state in FINISHED or remaining <= 0:
                    return execution
                await ended.next(min(remaining, WAIT_POLL))
        finally:
            ended.close()

    async def cancel(self, tenant: str, execution_id: str) -> Execution | None:
        """Cancel; an execution that has ended is returned unchanged."""
        run = self._runs.get(execution_id)
        if run is not None and run.tenant == tenant and run.task is not None:
            if not run.finalizing and not run.cancel_requested:
                run.cancel_requested = True
                run.task.cancel()
            # Ended, or ending anyway: its outcome stands.
            await run.finished.wait()
            return await self.get(tenant, execution_id)
        lease = await self._store.execution_lease(tenant, execution_id)
        if lease is None:
            return None
        if lease[0] not in ("", self._leases.owner) and lease[1] > now_us():
            # Running in another live process: ask it (through the bus) to
            # cancel its run, which records the outcome; wait for that.
            return await self._cancel_elsewhere(tenant, execution_id)
        # Recorded but not running anywhere (queued, or left by a stopped
        # process): claimed first, so no process starts it meanwhile.
        execution = await self._store.claim_execution(
            tenant, execution_id, self._leases.owner, now_us=now_us(), lease_until_us=self._leases.until()
        )
        if execution is None:
            execution = await self._store.get_execution(tenant, execution_id)
            if execution is None or execution.state in FINISHED:
                return execution
            return await self._cancel_elsewhere(tenant, execution_id)  # a live process took it meanwhile
        execution.state = Execution.STATE_CANCELLED
        execution.error.CopyFrom(_status(code_pb2.CANCELLED, "cancelled by request", "CANCELLED", {}))
        execution.end_time.CopyFrom(_now())
        await self._store.save_execution(execution)
        self._publish("execution.cancelled", tenant, execution)
        self.counters.cancelled += 1
        return execution

    async def shutdown(self) -> None:
        """Stop running executions without recording an end: they stay
        RUNNING in the store, with their leases released, and are recovered
        by the next start or by another process sharing the store."""
        for background in (self._consuming, self._leasing, self._following):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._store.release_leases(self._leases.owner)
        except Exception:  # noqa: BLE001 - the store may be failing; the leases then simply expire
            log.warning("could not release execution leases; other processes take over when they expire")

    async def _cancel_elsewhere(self, tenant: str, execution_id: str) -> Execution | None:
        ended = self._bus.subscribe(
            lambda e: e.execution_id == execution_id and e.tenant == tenant and e.type in TERMINAL_EVENTS
        )
        try:
            self._bus.publish(CANCEL_REQUESTED, tenant=tenant, execution_id=execution_id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_WAIT):
                    await ended.next()
        finally:
            ended.close()
        return await self.get(tenant, execution_id)

    def start_leasing(self) -> None:
        """Keep this process's leases fresh, take over executions of processes that died,
        and cancel local runs that another process was asked to cancel."""
        self._leasing = asyncio.create_task(self._leases.keep(self._renew_and_claim, "executions"))
        if self._queue is not None:
            self._consuming = asyncio.create_task(self._consume(), name="execution work queue")
        requests = self._bus.subscribe(lambda e: e.type == CANCEL_REQUESTED and e.execution_id in self._runs)
        self._following = asyncio.create_task(self._follow_cancels(requests), name="cancel requests")

    async def _follow_cancels(self, requests: Subscription) -> None:
        try:
            async for event in requests:
                run = self._runs.get(event.execution_id)
                if run is not None and run.tenant == event.tenant:
                    task = asyncio.create_task(self.cancel(event.tenant, event.execution_id))
                    self._cancelling.add(task)  # held, or the loop may drop it
                    task.add_done_callback(self._cancelling.discard)
        finally:
            requests.close()

    async def _renew_and_claim(self) -> int:
        # Only what runs here: a claimed row that never started must expire.
        await self._store.renew_leases(self._leases.owner, self._leases.until(), list(self._runs))
        resumed, failed = await self.recover(expired_only=True)
        taken = 0
        room = self._room()
        if self._queue is not None and room > 0:
            try:
                # Entries a process read and died before claiming; no more than fit.
                stalled = await self._queue.reclaim(int(self._leases.seconds * 1000), count=room)
                taken, _ = await self._run_queued(stalled)
            except QUEUE_FAILURES as exc:
                self.counters.queue_failures += 1
                log.warning("could not take over the execution work queue's stalled entries: %s", exc)
        return resumed + failed + taken

    # -- the shared work queue ------------------------------------------------

    async def _consume(self) -> None:
        """Forever: while this process has free slots, take queued executions and run them."""
        assert self._queue is not None
        delay = 0.1
        while True:
            free = self._room()
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                entries = await self._queue.take(free)
                # Executions created here while the read waited may have taken the room.
                room = max(0, self._max - len(self._runs) - self._admitting)
                await self._queue.give_back(entries[room:])
                started, passed_over = await self._run_queued(entries[:room])
                delay = 0.1
                if passed_over and not started:
                    # Only tenants at their share here are queued: read again once a
                    # run ends, or after a while (other processes add work meanwhile).
                    self._slot_freed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WAIT_POLL):
                            await self._slot_freed.wait()
            except Exception as exc:  # Redis or the database failing: retry, never stop
                if not isinstance(exc, QUEUE_FAILURES):
                    log.exception("taking executions from the work queue failed; will retry")
                else:
                    self.counters.queue_failures += 1
                    log.warning("the execution work queue cannot be reached (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, QUEUE_RETRY_MAX)

    async def _run_queued(self, entries: list[QueuedExecution]) -> tuple[int, int]:
        """Claim and start the executions of `entries`, then remove the entries.

        An entry whose execution another process holds or that has ended is
        removed unrun: the database claim decides who runs what. An entry of a
        tenant at its share here, or one beyond the free slots, goes back to
        the end of the queue, unclaimed. Returns how many started and how many
        went back.
        """
        assert self._queue is not None
        started = 0
        passed_over: list[QueuedExecution] = []
        for entry in entries:
            if self._room() <= 0 or self._tenant_full(entry.tenant):
                passed_over.append(entry)
                continue
            self._reserve(entry.tenant, 1)
            try:
                execution = await self._store.claim_execution(
                    entry.tenant,
                    entry.execution_id,
                    self._leases.owner,
                    now_us=now_us(),
                    lease_until_us=self._leases.until(),
                )
                if execution is None or execution.execution_id in self._runs:
                    continue
                if await self._resume(execution):
                    self.counters.taken_from_queue += 1
                    started += 1
            finally:
                self._reserve(entry.tenant, -1)
        await self._queue.done([entry for entry in entries if entry not in passed_over])
        await self._queue.give_back(passed_over)
        return started, len(passed_over)

    # -- recovery -------------------------------------------------------------

    async def recover(self, *, expired_only: bool | None = None) -> tuple[int, int]:
        """Claim and resume (or fail) executions a stopped process left unfinished, as many as fit.

        Finished nodes keep their outputs. A node caught RUNNING is rerun when
        its type is retry-safe; otherwise the execution fails as INTERRUPTED.
        At start (`expired_only` None) an exclusive store's unfinished
        executions are all free to take, whatever their leases say; otherwise
        only those whose lease expired. Oldest first, it takes at most the free
        slots, and per tenant at most its free share: the rest stay unfinished
        for the next sweep (a third of a lease later) or another process.
        Queued executions still in the work queue are not taken: they wait
        their turn there. Returns (resumed, failed).
        """
        if expired_only is None:
            expired_only = not self._exclusive
        if not expired_only:
            await self._store.expire_leases_except(self._leases.owner)
        expired = [e for e in await self._store.expired_executions(now_us()) if e.execution_id not in self._runs]
        if self._queue is not None and any(not e.owner for e in expired):
            expired = await self._without_queued(expired)
        picked = self._fitting(expired)
        if not picked:
            return 0, 0
        # Held from the pick until each is running (or failed), so new work cannot take the room meanwhile.
        held = {e.execution_id: e.tenant for e in picked}
        for tenant in held.values():
            self._reserve(tenant, 1)
        resumed = failed = 0
        try:
            claimed = await self._store.claim_executions(
                self._leases.owner,
                now_us=now_us(),
                lease_until_us=self._leases.until(),
                execution_ids=list(held),
            )
            for execution in claimed:
                claimed_tenant = held.pop(execution.execution_id)
                try:
                    if execution.execution_id in self._runs:
                        continue  # ours already (its lease ran out under a stalled loop)
                    if await self._resume(execution):
                        resumed += 1
                    else:
                        failed += 1
                finally:
                    self._reserve(claimed_tenant, -1)
        finally:
            for left in held.values():  # taken by another process meanwhile, or not reached
                self._reserve(left, -1)
        return resumed, failed

    def _fitting(self, expired: list[ExpiredExecution]) -> list[ExpiredExecution]:
        """The first of `expired` that fit in the free slots, each tenant within its free share."""
        room = self._room()
        picked: list[ExpiredExecution] = []
        taking: dict[str, int] = {}
        for candidate in expired:
            if len(picked) >= room:
                break
            held = self._tenant_slots.get(candidate.tenant, 0) + taking.get(candidate.tenant, 0)
            if self._tenant_max is not None and held >= self._tenant_max:
                continue
            picked.append(candidate)
            taking[candidate.tenant] = taking.get(candidate.tenant, 0) + 1
        return picked

    async def _without_queued(self, expired: list[ExpiredExecution]) -> list[ExpiredExecution]:
        """`expired` without the queued (unowned) executions, unless the queue cannot be read.

        A queued execution whose check time passed has waited a lease: if
        its entry is still in the queue it only waits its turn (checked again
        a lease later); if the entry was lost, it is added again. Either way
        the queue, not this sweep, hands it to a process with room. When
        Redis cannot be reached they stay in: taken within the free slots,
        they still run once (the database claim decides).
        """
        assert self._queue is not None
        try:
            in_queue = await self._queue.queued()
        except QUEUE_FAILURES as exc:
            self.counters.queue_failures += 1
            log.warning("cannot read the execution work queue (%s); taking queued executions directly", exc)
            return expired
        unowned = {e.execution_id: e for e in expired if not e.owner}
        # Only one of several processes sweeping at once gets each row back, so only one adds it again.
        waiting = await self._store.defer_queued_executions(
            list(unowned), now_us=now_us(), until_us=self._leases.until()
        )
        for execution_id in waiting:
            if execution_id in in_queue:
                continue
            try:
                await self._queue.submit(unowned[execution_id].tenant, execution_id)
            except QUEUE_FAILURES as exc:
                self.counters.queue_failures += 1
                log.warning("could not queue execution %s again (%s); checking again in a lease", execution_id, exc)
            else:
                log.warning(
                    "execution %s was missing from the work queue (lost with Redis?); queued again", execution_id
                )
        return [e for e in expired if e.owner]

    async def _resume(self, execution: Execution) -> bool:
        """Start a claimed execution: afresh when PENDING, after its finished nodes when RUNNING.

        Returns False when it cannot go on and was failed as INTERRUPTED instead.
        """
        tenant = execution.tenant
        workflow = await self._store.get_workflow(
            tenant, execution.workflow_id, execution.workflow_version, include_deleted=True
        )
        reason = ""
        plan = None
        if workflow is None:
            reason = f"workflow {execution.workflow_id!r} version {execution.workflow_version} no longer exists"
        else:
            try:
                plan = self._plans.get(tenant, workflow)
            except InvalidWorkflow as exc:
                reason = f"workflow {execution.workflow_id!r} no longer validates ({exc})"
                plan = None
            nodes = plan.nodes if plan is not None else {}
            for node_run in execution.node_runs if plan is not None else ():
                node = nodes.get(node_run.node_id)
                if node_run.state == NodeRun.STATE_RUNNING and (node is None or not node.retry_safe):
                    reason = (
                        f"node {node_run.node_id!r} ({node_run.node_type}) was running when the server stopped "
                        "and is not safe to run twice"
                    )
                    break
        if reason or plan is None:
            execution.state = Execution.STATE_FAILED
            execution.error.CopyFrom(
                _status(
                    code_pb2.ABORTED,
                    f"interrupted: {reason}",
                    "INTERRUPTED",
                    {"execution_id": execution.execution_id},
                )
            )
            execution.end_time.CopyFrom(_now())
            await self._store.save_execution(execution)
            self._publish("execution.failed", tenant, execution)
            self.counters.failed += 1
            return False
        run = _Run(tenant, plan, execution, struct_to_python(execution.inputs))
        outputs = struct_to_python(execution.outputs)
        kept = []
        for node_run in execution.node_runs:
            if node_run.state == NodeRun.STATE_SUCCEEDED and node_run.node_id in outputs:
                run.done[node_run.node_id] = outputs[node_run.node_id]
            elif node_run.state == NodeRun.STATE_SKIPPED:
                run.skipped.add(node_run.node_id)
            else:
                continue  # a retry-safe node caught RUNNING: dropped, it reruns
            kept.append(node_run)
        del execution.node_runs[:]
        for node_run in kept:
            run.node_runs[node_run.node_id] = execution.node_runs.add()
            run.node_runs[node_run.node_id].CopyFrom(node_run)
        if execution.state == Execution.STATE_RUNNING:
            log.info(
                "resuming execution %s after a restart (%d nodes already done)", execution.execution_id, len(run.done)
            )
        self._start(run)
        return True

    # -- running ----------------------------------------------------------

    def _system_error(self, tenant: str, execution: Execution, message: str) -> None:
        """A fault of the gateway's own (not of the workflow) that an execution met: `system.error`
        for the tenant's streams and webhooks. The message names the fault's kind, never its details."""
        self._publish("system.error", tenant, execution, {"error": message, "source": "executor"})

    def _publish(self, type_: str, tenant: str, execution: Execution, data: dict[str, Any] | None = None) -> None:
        self._bus.publish(
            type_,
            tenant=tenant,
            session_id=execution.session_id,
            workflow_id=execution.workflow_id,
            execution_id=execution.execution_id,
            data=data,
        )

    async def _execute(self, run: _Run) -> None:
        # This task's log lines name the execution and the request that started it
        # (server/observability/logs.py); the call that created it may be over.
        CALL.set(None)
        EXECUTION.set(ExecutionContext(run.tenant, run.execution.execution_id, run.request_id))
        prometheus = self.prometheus
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

    async def _execute_traced(self, run: _Run, span: Any) -> None:
        execution = run.execution
        started = time.perf_counter()
        try:
            if execution.state == Execution.STATE_PENDING:
                execution.state = Execution.STATE_RUNNING
                execution.start_time.CopyFrom(_now())
                self.counters.started += 1
                self.tenant_counters(run.tenant).started += 1
                await self._store.save_execution(execution, wait=False)
                self._publish(
                    "execution.started", run.tenant, execution, {"workflow_version": execution.workflow_version}
                )
            await self._walk(run)
            execution.state = Execution.STATE_SUCCEEDED
        except NodeFailed as failure:
            execution.state = Execution.STATE_FAILED
            execution.error.CopyFrom(failure.status)
        except asyncio.CancelledError:
            if not run.cancel_requested:
                # Server shutdown: leave the execution RUNNING for recovery.
                self._drop(run)
                run.finished.set()
                raise
            execution.state = Execution.STATE_CANCELLED
            execution.error.CopyFrom(_status(code_pb2.CANCELLED, "cancelled by request", "CANCELLED", {}))
        except Exception as exc:
            log.exception("execution %s failed inside the executor", execution.execution_id)
            execution.state = Execution.STATE_FAILED
            execution.error.CopyFrom(
                _status(code_pb2.INTERNAL, f"internal error: {type(exc).__name__}", "INTERNAL", {})
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
        try:
            await asyncio.shield(self._finalize(run, started))
        finally:
            self._drop(run)
            run.finished.set()
            self._slot_freed.set()

    def _drop(self, run: _Run) -> None:
        """No longer in progress here: its slot, and its tenant's, are free."""
        if self._runs.pop(run.execution.execution_id, None) is not None:
            self._hold_slot(run.tenant, -1)

    async def _finalize(self, run: _Run, started: float) -> None:
        execution = run.execution
        execution.end_time.CopyFrom(_now())
        if execution.HasField("start_time"):
            execution.duration.FromNanoseconds(
                execution.end_time.ToNanoseconds() - execution.start_time.ToNanoseconds()
            )
        try:
            await self._store.save_execution(execution)
        except Exception as exc:
            log.exception("could not record the end of execution %s", execution.execution_id)
            self._system_error(run.tenant, execution, f"the end of the execution was not stored: {type(exc).__name__}")
        final = {
            Execution.STATE_SUCCEEDED: ("execution.completed", "succeeded"),
            Execution.STATE_FAILED: ("execution.failed", "failed"),
            Execution.STATE_CANCELLED: ("execution.cancelled", "cancelled"),
        }[execution.state]
        data: dict[str, Any] = {"state": Execution.State.Name(execution.state)}
        if execution.HasField("error"):
            data["error"] = execution.error.message
        self._publish(final[0], run.tenant, execution, data)
        took = time.perf_counter() - started
        for counters in (self.counters, self.tenant_counters(run.tenant)):
            setattr(counters, final[1], getattr(counters, final[1]) + 1)
            counters.latencies_ms.append(1000 * took)
        if self.prometheus is not None:
            self.prometheus.executions.labels(final[1]).inc()
            self.prometheus.execution_duration.labels(run.tenant, execution.workflow_id, final[1]).observe(took)
        if execution.state == Execution.STATE_FAILED:
            log.info("execution ended failed: %s", execution.error.message)
        else:
            log.debug("execution ended %s in %.3f ms", final[1], 1000 * took)

    def _inputs_for(self, run: _Run, node: PlanNode) -> tuple[dict[str, Any], bool]:
        """The node's parameters, and whether it must be skipped."""
        params = dict(node.config)
        own = run.inputs.get(node.node_id)
        for key, value in run.inputs.items():
            if key == node.node_id and isinstance(value, dict):
                continue
            if node.reads is None or key in node.reads:
                params[key] = value
        if isinstance(own, dict):
            params.update(own)
        missing = 0
        for binding in node.inbound:
            outputs = run.done.get(binding.from_node)
            if outputs is None or binding.path[0] not in outputs:
                missing += 1  # the source was skipped or did not take this branch
                continue
            value = lookup(outputs, binding.path)
            if value is MISSING:
                raise NodeFailed(
                    _status(
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

    async def _walk(self, run: _Run) -> None:
        plan = run.plan
        started: set[str] = set(run.done) | run.skipped
        tasks: dict[asyncio.Task[dict[str, Any]], str] = {}
        try:
            while True:
                progressed = True
                while progressed:
                    progressed = False
                    for nid in plan.order:
                        node = plan.nodes[nid]
                        if nid in started or not node.upstream <= (set(run.done) | run.skipped):
                            continue
                        started.add(nid)
                        params, skip = self._inputs_for(run, node)
                        if skip:
                            self._record_skip(run, node)
                            progressed = True
                            continue
                        params = Parameters(params, run.variables)
                        task = asyncio.create_task(self._run_node(run, node, params))
                        tasks[task] = nid
                if not tasks:
                    return
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    nid = tasks.pop(task)
                    run.done[nid] = task.result()  # raises NodeFailed
                total = len(plan.nodes)
                complete = len(run.done) + len(run.skipped)
                run.execution.progress = round(100 * complete / total, 2)  # saved with its next write
                self._publish(
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

    def _record_skip(self, run: _Run, node: PlanNode) -> None:
        node_run = run.execution.node_runs.add(
            node_id=node.node_id, node_type=node.node_type.type_name, state=NodeRun.STATE_SKIPPED
        )
        node_run.start_time.CopyFrom(_now())
        node_run.end_time.CopyFrom(node_run.start_time)
        run.node_runs[node.node_id] = node_run
        run.skipped.add(node.node_id)

    async def _run_node(self, run: _Run, node: PlanNode, params: dict[str, Any]) -> dict[str, Any]:
        execution = run.execution
        node_run = execution.node_runs.add(
            node_id=node.node_id, node_type=node.node_type.type_name, state=NodeRun.STATE_RUNNING
        )
        node_run.start_time.CopyFrom(_now())
        run.node_runs[node.node_id] = node_run
        if not node.retry_safe:
            # Durably RUNNING before it starts: after a crash it is never rerun.
            await self._store.save_execution(execution)
        self._publish("node.started", run.tenant, execution, {"node_id": node.node_id, "node_type": node_run.node_type})
        error = NodeError("no attempt made")
        for attempt in range(1, node.max_attempts + 1):
            node_run.attempts = attempt
            ctx = NodeContext(run.tenant, execution.execution_id, node.node_id, attempt, node.timeout, self._services)
            try:
                outputs = await self._attempt(node, ctx, params)
                try:
                    python_to_struct({node.node_id: outputs}, execution.outputs)
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
                # reruns a node whose dependents already started. A last node's
                # write is committed with the execution's end.
                await self._store.save_execution(execution, wait=bool(node.downstream))
                self._publish("node.completed", run.tenant, execution, {"node_id": node.node_id, "attempts": attempt})
                return outputs
            if attempt < node.max_attempts and error.retryable:
                delay = error.retry_after or min(node.max_backoff, node.initial_backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))  # noqa: S311
                continue
            break
        code = code_pb2.DEADLINE_EXCEEDED if error.reason in ("NODE_TIMEOUT", "SANDBOX_TIMEOUT") else code_pb2.ABORTED
        status = _status(
            code,
            f"node {node.node_id!r} ({node.node_type.type_name}) failed: {error.message}",
            error.reason,
            {"node_id": node.node_id, "node_type": node.node_type.type_name, "attempts": str(node_run.attempts)},
        )
        node_run.error.CopyFrom(status)
        _finish(node_run, NodeRun.STATE_FAILED)
        await self._store.save_execution(execution)
        self._publish(
            "node.failed",
            run.tenant,
            execution,
            {"node_id": node.node_id, "error": status.message, "reason": error.reason},
        )
        raise NodeFailed(status)
