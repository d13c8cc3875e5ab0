"""The executor: runs executions of compiled plans, durably and concurrently.

`Executor` is what the services use: it creates, reads, waits for, cancels
and recovers executions, composing the pieces that do the work, each in a
module of its own:

- server/engine/walk.py: the walk of one execution (its nodes, their
  timeouts and retries, every state change written and published);
- server/engine/slots.py: this process's execution slots, per tenant;
- server/engine/takeover.py: recovery at start, the takeover of executions
  whose process died, and taking executions from the shared work queue;
- server/engine/elsewhere.py: waiting for and cancelling executions that
  another process runs.

An execution is written PENDING before anything runs. Every state change of
it is then written and published as an event, and a node that is not safe to
run twice is recorded RUNNING before it starts, so a crash can never make it
run twice: after a restart such an execution fails as INTERRUPTED instead.

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
there, and every other way into this process's slots respects both limits
too (server/engine/takeover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.rpc import code_pb2

from flowport.server.clock import now_us
from flowport.server.engine.elsewhere import Elsewhere
from flowport.server.engine.execution_bytes import ExecutionBytesCap
from flowport.server.engine.plan import Plan, PlanCache
from flowport.server.engine.run import FINISHED, Execution, Run, error_status, mark_running, publish, timestamp_now
from flowport.server.engine.slots import Slots
from flowport.server.engine.stats import ExecutionCounters
from flowport.server.engine.takeover import Takeover
from flowport.server.engine.values import one_turn, read_in_turns, struct_to_python
from flowport.server.engine.walk import Walker
from flowport.server.engine.work_queue import QUEUE_FAILURES, WorkQueue
from flowport.server.errors import InvalidArgument, NotFound, ResourceExhausted
from flowport.server.events.bus import EventBus
from flowport.server.ids import new_id
from flowport.server.leases import Leases
from flowport.server.nodes.base import NodeServices
from flowport.server.storage.sql_store import SqlStore
from flowport.server.tenant_shares import TenantShares
from flowport.v1 import workflow_pb2

if TYPE_CHECKING:
    from flowport.server.observability.prometheus import Prometheus

# FINISHED: the states an execution ends in, for the services.
__all__ = ["FINISHED", "QUEUE_DEPTH", "Executor"]

log = logging.getLogger(__name__)
# A queued backlog beyond this many times max_concurrent is refused, not queued.
QUEUE_DEPTH = 4
# Seconds between looks at the runs still going while a shutdown waits for them (runs started meanwhile included).
SETTLE_POLL = 0.1


@dataclass(frozen=True, slots=True)
class _Asked:
    """An execution asked for, its inputs checked: what starting or queueing it takes."""

    tenant: str
    plan: Plan
    values: dict[str, Any]
    inputs: Any
    workflow: workflow_pb2.Workflow
    session_id: str
    request_id: str
    key: tuple[str, bytes] | None
    waited: bool


class Executor:
    """Starts, runs, cancels and recovers executions."""

    def __init__(
        self,
        store: SqlStore,
        plans: PlanCache,
        bus: EventBus,
        services: NodeServices,
        *,
        max_concurrent: int,
        leases: Leases | None = None,
        exclusive: bool = True,
        queue: WorkQueue | None = None,
        tenant_share: int | None = None,
        tenant_max_bytes: int | None = None,
        tenant_max_output_bytes: int | None = None,
    ) -> None:
        """`tenant_share`: executions one tenant may run at once here (None: up to `max_concurrent`);
        `tenant_max_bytes`: bytes of stored executions one tenant may keep (None: no cap);
        `tenant_max_output_bytes`: bytes of outputs one tenant's runs may hold here (None: no cap)."""
        self._slots = Slots(max_concurrent, tenant_share, tenant_max_output_bytes)
        # Inputs read in more than one turn (values.py), one call of a tenant's at a time: reading
        # holds the call's values as they are made, before any tenant check, and other calls run
        # meanwhile (a tenant's many calls of 4 MiB of `[[],…]` would each hold about 60 MiB).
        self._large_inputs = TenantShares(1)
        self.bytes_cap = ExecutionBytesCap(store, tenant_max_bytes)
        self._store = store
        self._plans = plans
        self._bus = bus
        # Per tenant: its CreateExecution calls admitted to the queue whose rows are not written yet.
        self._tenant_queuing: dict[str, int] = {}
        self._queue_admission = asyncio.Lock()
        # Each execution this process runs is leased to it (server/leases.py).
        # `exclusive`: no other process can share the store (SQLite), so what
        # is unfinished at start is free to take at once, whatever its lease says.
        self._leases = leases or Leases()
        # Shared with other processes; None: executions run where they are created.
        self._queue = queue
        # Set by stop_taking: the process is stopping, and hands new executions to the queue.
        self._draining = False
        self.counters = ExecutionCounters()
        self._tenant_counters: dict[str, ExecutionCounters] = {}
        # Set by the app when /metrics is on (server/observability/prometheus.py).
        self.prometheus: Prometheus | None = None
        self._walker = Walker(store, bus, services, self._slots, figures=self, owner=self._leases.owner)
        self._takeover = Takeover(
            store,
            plans,
            bus,
            self._leases,
            queue,
            slots=self._slots,
            starter=self._walker,
            counters=self.counters,
            exclusive=exclusive,
        )
        self._elsewhere = Elsewhere(bus, self._slots, local=self)

    @property
    def taking_queued_work(self) -> bool:
        """Whether this process still reads the shared work queue (until a while after stop_taking)."""
        return self._takeover.consuming

    @property
    def running(self) -> int:
        """Executions in progress in this process."""
        return len(self._slots.runs)

    @property
    def tenant_share(self) -> int:
        """Executions one tenant may run at once in this process."""
        return self._slots.max if self._slots.tenant_max is None else self._slots.tenant_max

    def tenant_running(self, tenant: str) -> int:
        """`tenant`'s executions in progress (or being admitted) in this process."""
        return self._slots.held(tenant)

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
        waited: bool = False,
    ) -> tuple[Execution, bool]:
        """Record and start an execution; returns it and whether it is a replay.

        `waited`: the caller waits for its end (`wait`) before it answers. A
        waited run without a request id, of a workflow whose nodes are all
        safe to run twice, that starts at once, is written once, when it
        ends: its caller holds no id before then, and if this process dies
        meanwhile the caller's call fails and nothing is left to resume (the
        caller runs it again). Other processes see it once it has ended.

        Raises InvalidArgument for missing inputs, FailedPrecondition for a stored version that
        no longer validates, ResourceExhausted when full.
        """
        plan = await self._plans.runnable(tenant, workflow)
        if one_turn(inputs):
            values = struct_to_python(inputs)
        else:
            async with self._large_inputs.slot(tenant):
                values = await read_in_turns(inputs)
        missing = plan.missing_inputs(values)
        if missing:
            raise InvalidArgument(
                f"inputs missing for workflow {workflow.workflow_id!r}: {', '.join(missing)}",
                violations=[(f"inputs.{name}", "required by the workflow") for name in missing],
            )
        fixed = plan.fixed_inputs(values)
        if fixed:
            raise InvalidArgument(
                f"inputs set parameters that workflow {workflow.workflow_id!r} fixes: {', '.join(fixed)}",
                violations=[(f"inputs.{where}", "set by the workflow, not by execution inputs") for where in fixed],
            )
        key = (request_id, request_hash) if request_id and request_hash is not None else None
        # A stopping process hands an execution nobody waits for to the shared queue, for a
        # process that stays (started here, the stop would cut it off, to be run again by
        # another process after its lease). A waited one runs here: its call is in flight
        # here anyway, and most end within the drain. So does one the queue has no room for.
        asked = _Asked(tenant, plan, values, inputs, workflow, session_id, request_id, key, waited)
        if self._draining and not waited and await self._queue_has_room():
            try:
                return await self._start(asked, handing_off=True)
            except ResourceExhausted:
                pass  # the queue, or the tenant's share of it, is full: run it here
        return await self._start(asked, handing_off=False)

    async def _start(self, asked: _Asked, *, handing_off: bool) -> tuple[Execution, bool]:
        """`create` once the inputs are checked: start it here, or queue it (`handing_off`, or when full).
        A ResourceExhausted raised here has recorded nothing."""
        tenant, plan, values, inputs, workflow = asked.tenant, asked.plan, asked.values, asked.inputs, asked.workflow
        session_id, request_id, key, waited = asked.session_id, asked.request_id, asked.key, asked.waited
        # Awaited first: the slot checks below and the slot taken after them must see the same
        # state, with no wait in between (another call could take the last slot meanwhile).
        over_bytes = await self.bytes_cap.over(tenant)
        tenant_full = not handing_off and self._slots.tenant_full(tenant)
        queued = handing_off or self._slots.room() <= 0
        if queued or tenant_full or over_bytes:
            # A retry of a call that already started an execution is answered
            # even when full: it asks for nothing new.
            first_id = None if key is None else await self._store.replayed_execution(tenant, key)
            if first_id is not None:
                return await self._replayed(tenant, first_id), True
            if over_bytes:
                raise self.bytes_cap.refuse(tenant)
            if tenant_full:
                # Refused, not queued: queueing a tenant's overflow would let it
                # fill the shared backlog the other tenants need.
                raise ResourceExhausted(
                    f"this tenant is running its share of {self._slots.tenant_max} of the server's {self._slots.max} "
                    "concurrent executions; retry shortly",
                    reason="TENANT_EXECUTION_SHARE",
                    metadata={
                        "tenant_max_concurrent_executions": str(self._slots.tenant_max),
                        "max_concurrent_executions": str(self._slots.max),
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
            create_time=timestamp_now(),
            tenant=tenant,
            request_id=request_id,
        )
        # A queued execution is recorded unowned, to be checked one lease
        # from now: if it is still waiting then, the lease sweep of some
        # process makes sure its queue entry still exists (Takeover._without_queued).
        owner, admitting = ("", 0) if queued else (self._leases.owner, 1)
        if not queued:
            # It starts now: recorded RUNNING, not written again when it starts.
            mark_running(execution)
        if not queued and waited and key is None and plan.rerunnable:
            run = Run(tenant, plan, execution, values, starting=True, stored=False)
            self._walker.start(run)
            return execution, False
        self._slots.admitting += admitting
        self._slots.hold(tenant, admitting)
        counted = False
        try:
            if queued:
                counted = await self._admit_to_queue(tenant)
            result = await self._store.insert_execution(
                tenant, execution, key, owner=owner, lease_until_us=self._leases.until()
            )
        finally:
            self._slots.admitting -= admitting
            self._slots.hold(tenant, -admitting)
            if counted and (left := self._tenant_queuing.pop(tenant) - 1):
                self._tenant_queuing[tenant] = left
        if result.replayed:
            return await self._replayed(tenant, result.response.decode()), True
        if queued:
            await self._submit(tenant, execution.execution_id)
        else:
            self._walker.start(Run(tenant, plan, execution, values, starting=True))
        return execution, False

    async def _replayed(self, tenant: str, execution_id: str) -> Execution:
        """The execution a repeated request_id made; NotFound once it was removed (its tenant's
        executions past --tenant-max-execution-bytes lose their oldest, whatever their age)."""
        first = await self.get(tenant, execution_id)
        if first is None:
            raise NotFound(
                "the execution this request_id started has been removed (its tenant's stored "
                "executions reached their cap); use a new request_id to run it again",
                reason="EXECUTION_REMOVED",
                metadata={"execution_id": execution_id},
            )
        return first

    async def _admit_to_queue(self, tenant: str) -> bool:
        """Raise ResourceExhausted unless `tenant`'s execution may wait in the shared queue.

        Returns whether it was counted in `_tenant_queuing` (the caller uncounts it once its row exists).
        """
        if not await self._queue_has_room():
            raise ResourceExhausted(
                f"the server is running its maximum of {self._slots.max} executions; retry shortly",
                reason="TOO_MANY_EXECUTIONS",
                metadata={"max_concurrent_executions": str(self._slots.max)},
                retry_delay=1.0,
            )
        if self._slots.tenant_max is None:
            return False
        limit = QUEUE_DEPTH * self._slots.tenant_max
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
                f"this tenant already has its share of {limit} of the {QUEUE_DEPTH * self._slots.max} executions "
                "the server queues waiting for a free slot; retry shortly",
                reason="TENANT_QUEUE_SHARE",
                metadata={
                    "tenant_max_queued_executions": str(limit),
                    "max_queued_executions": str(QUEUE_DEPTH * self._slots.max),
                },
                retry_delay=1.0,
            )

    async def _queue_has_room(self) -> bool:
        if self._queue is None:
            return False
        try:
            return await self._queue.backlog() < QUEUE_DEPTH * self._slots.max
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

    # -- reading, waiting, cancelling --------------------------------------

    async def get(self, tenant: str, execution_id: str) -> Execution | None:
        """The execution as it is now (from memory while it runs here)."""
        run = self._slots.runs.get(execution_id)
        if run is not None and run.tenant == tenant:
            snapshot = Execution()
            snapshot.CopyFrom(run.execution)
            return snapshot
        return await self._store.get_execution(tenant, execution_id)

    async def wait(self, tenant: str, execution_id: str, timeout: float) -> Execution | None:
        """The execution once it has ended, or as it is when `timeout` passes."""
        run = self._slots.runs.get(execution_id)
        if run is None or run.tenant != tenant:
            return await self._elsewhere.wait(tenant, execution_id, timeout)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await run.finished.wait()
        snapshot = Execution()
        snapshot.CopyFrom(run.execution)
        if not run.stored:
            # Still running when the wait ends: its id is handed out now, so its row must exist.
            run.stored = True
            await self._store.insert_execution(
                tenant, snapshot, None, owner=self._leases.owner, lease_until_us=self._leases.until()
            )
        return snapshot

    async def cancel(self, tenant: str, execution_id: str) -> Execution | None:
        """Cancel; an execution that has ended is returned unchanged."""
        run = self._slots.runs.get(execution_id)
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
            return await self._elsewhere.cancel(tenant, execution_id)
        # Recorded but not running anywhere (queued, or left by a stopped
        # process): claimed first, so no process starts it meanwhile.
        execution = await self._store.claim_execution(
            tenant, execution_id, self._leases.owner, now_us=now_us(), lease_until_us=self._leases.until()
        )
        if execution is None:
            execution = await self._store.get_execution(tenant, execution_id)
            if execution is None or execution.state in FINISHED:
                return execution
            return await self._elsewhere.cancel(tenant, execution_id)  # a live process took it meanwhile
        execution.state = Execution.STATE_CANCELLED
        execution.error.CopyFrom(error_status(code_pb2.CANCELLED, "cancelled by request", "CANCELLED", {}))
        execution.end_time.CopyFrom(timestamp_now())
        await self._store.save_execution(execution)
        publish(self._bus, "execution.cancelled", tenant, execution)
        self.counters.cancelled += 1
        return execution

    async def stop_taking(self) -> None:
        """The process is shutting down: take no more executions from the shared queue or from
        stopped processes, and hand the ones created here by calls still served to the queue
        (run here when there is none, or it is full)."""
        self._draining = True
        await self._takeover.stop_taking()

    async def settle(self, limit: float) -> bool:
        """Wait up to `limit` seconds for the executions running here to end (resumed elsewhere
        they would rerun their current nodes, or fail as INTERRUPTED where a node is not safe to
        run twice). Returns whether none is left running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while self._slots.runs or self._slots.admitting:
            left = deadline - loop.time()
            if left <= 0:
                return False
            # A run whose end is being written again (its store away) has ended: its try is waited for.
            tasks = {run.task for run in self._slots.runs.values() if run.task is not None and not run.task.done()}
            tasks |= self._walker.recording()
            if tasks:
                await asyncio.wait(tasks, timeout=min(left, SETTLE_POLL))
            else:  # being admitted, not started yet
                await asyncio.sleep(min(left, SETTLE_POLL))
        return True

    async def shutdown(self) -> None:
        """Stop running executions without recording an end: they stay
        RUNNING in the store, with their leases released, and are recovered
        by the next start or by another process sharing the store."""
        await self._takeover.stop()
        await self._elsewhere.stop()
        await self.bytes_cap.close()
        tasks = [run.task for run in self._slots.runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._walker.close()
        try:
            await self._store.release_leases(self._leases.owner)
        except Exception:  # noqa: BLE001 - the store may be failing; the leases then simply expire
            log.warning("could not release execution leases; other processes take over when they expire")

    def start_leasing(self) -> None:
        """Keep this process's leases fresh, take over executions of processes that died,
        and cancel local runs that another process was asked to cancel."""
        self._takeover.start()
        self._elsewhere.follow_cancels()

    async def recover(self, *, expired_only: bool | None = None) -> tuple[int, int]:
        """Claim and resume (or fail) executions a stopped process left unfinished, as many as fit
        (server/engine/takeover.py). Returns (resumed, failed)."""
        return await self._takeover.recover(expired_only=expired_only)
