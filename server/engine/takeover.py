"""Executions this process takes from elsewhere, into its free slots only.

Two kinds: those a stopped process left unfinished (recovery at start, and
the lease sweep every third of a lease, which takes over executions whose
process died), and those waiting in the shared work queue
(server/engine/work_queue.py) for any process with a free slot.

Every way into this process's slots respects both limits: the queue, the
takeover of executions whose process died, and recovery at start take at
most the free slots, and per tenant its free share; what does not fit stays
for a later sweep or another process. A process taking work from the shared
queue passes over a tenant at its share there (the entry goes back to the
queue for another process, or for later).

A resumed execution keeps its finished nodes' outputs. One whose node that
is not safe to run twice was caught RUNNING fails as INTERRUPTED instead.

This module sees the executor core only through `Slots` (the counts) and
`Starter` (starting a run in a slot): the executor composes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from google.rpc import code_pb2

from flowport.server.clock import now_us
from flowport.server.engine.elsewhere import WAIT_POLL
from flowport.server.engine.plan import InvalidWorkflow, PlanCache
from flowport.server.engine.run import Execution, NodeRun, Run, error_status, publish, timestamp_now
from flowport.server.engine.slots import Slots
from flowport.server.engine.stats import ExecutionCounters
from flowport.server.engine.values import struct_to_python_in_turns
from flowport.server.engine.work_queue import QUEUE_FAILURES, QueuedExecution, WorkQueue
from flowport.server.events.bus import EventBus
from flowport.server.leases import Leases
from flowport.server.storage.base import ExpiredExecution
from flowport.server.storage.sql_store import SqlStore

log = logging.getLogger(__name__)
QUEUE_RETRY_MAX = 5.0
# Seconds a stop waits for the queue's consumer to end by itself: one blocked read (1 s, its socket
# timeout a few more) and the give-back after it.
CONSUMER_END = 6.0


class Starter(Protocol):
    """Starts a claimed execution's run in a slot of this process (server/engine/walk.py)."""

    def start(self, run: Run) -> None: ...


class Takeover:
    """Recovers, takes over and takes from the work queue executions that fit here."""

    def __init__(
        self,
        store: SqlStore,
        plans: PlanCache,
        bus: EventBus,
        leases: Leases,
        queue: WorkQueue | None,
        *,
        slots: Slots,
        starter: Starter,
        counters: ExecutionCounters,
        exclusive: bool,
    ) -> None:
        """`exclusive`: no other process can share the store (SQLite), so what
        is unfinished at start is free to take at once, whatever its lease says."""
        self._store = store
        self._plans = plans
        self._bus = bus
        self._leases = leases
        # Shared with other processes; None: executions run where they are created.
        self._queue = queue
        self._slots = slots
        self._starter = starter
        self._counters = counters
        self._exclusive = exclusive
        self._leasing: asyncio.Task[None] | None = None
        self._consuming: asyncio.Task[None] | None = None
        # Set by stop_taking() when the process starts shutting down: it only renews its own leases.
        self._draining = False
        self._stopping = asyncio.Event()  # set with _draining: wakes the consumer to end

    def start(self) -> None:
        """Keep this process's leases fresh, take over executions of processes that died,
        and take queued executions while there is room."""
        self._leasing = asyncio.create_task(self._leases.keep(self._renew_and_claim, "executions"))
        if self._queue is not None:
            self._consuming = asyncio.create_task(self._consume(), name="execution work queue")

    @property
    def consuming(self) -> bool:
        """Whether this process still reads the shared work queue."""
        return self._consuming is not None and not self._consuming.done()

    async def stop_taking(self) -> None:
        """Take no more work from the queue or from stopped processes (this one is stopping:
        the others take it); keep renewing the leases of what runs here.

        The queue's consumer is not cancelled: it ends by itself once its read
        returns (within the read's block time), giving back whatever that read
        handed it. A read cancelled midway could leave an entry Redis already
        handed to this process pending, for another process to reclaim only
        after an idle lease.
        """
        self._draining = True
        self._stopping.set()

    async def stop(self) -> None:
        """Stop taking executions (those started stay running)."""
        if self._consuming is not None and self._draining:
            await asyncio.wait({self._consuming}, timeout=CONSUMER_END)
        for background in (self._consuming, self._leasing):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)

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
        expired = [e for e in await self._store.expired_executions(now_us()) if e.execution_id not in self._slots.runs]
        if self._queue is not None and any(not e.owner for e in expired):
            expired = await self._without_queued(expired)
        picked = self._fitting(expired)
        if not picked:
            return 0, 0
        # Held from the pick until each is running (or failed), so new work cannot take the room meanwhile.
        held = {e.execution_id: e.tenant for e in picked}
        for tenant in held.values():
            self._slots.reserve(tenant, 1)
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
                    if execution.execution_id in self._slots.runs:
                        continue  # ours already (its lease ran out under a stalled loop)
                    if await self._resume(execution):
                        resumed += 1
                    else:
                        failed += 1
                finally:
                    self._slots.reserve(claimed_tenant, -1)
        finally:
            for left in held.values():  # taken by another process meanwhile, or not reached
                self._slots.reserve(left, -1)
        return resumed, failed

    def _fitting(self, expired: list[ExpiredExecution]) -> list[ExpiredExecution]:
        """The first of `expired` that fit in the free slots, each tenant within its free share."""
        room = self._slots.room()
        picked: list[ExpiredExecution] = []
        taking: dict[str, int] = {}
        for candidate in expired:
            if len(picked) >= room:
                break
            held = self._slots.held(candidate.tenant) + taking.get(candidate.tenant, 0)
            if self._slots.tenant_max is not None and held >= self._slots.tenant_max:
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
            self._counters.queue_failures += 1
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
                self._counters.queue_failures += 1
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
                plan = await self._plans.get(tenant, workflow)
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
                error_status(
                    code_pb2.ABORTED,
                    f"interrupted: {reason}",
                    "INTERRUPTED",
                    {"execution_id": execution.execution_id},
                )
            )
            execution.end_time.CopyFrom(timestamp_now())
            await self._store.save_execution(execution)
            publish(self._bus, "execution.failed", tenant, execution)
            self._counters.failed += 1
            return False
        run = Run(tenant, plan, execution, await struct_to_python_in_turns(execution.inputs))
        outputs = await struct_to_python_in_turns(execution.outputs)
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
        self._starter.start(run)
        return True

    async def _renew_and_claim(self) -> int:
        # Only what runs here: a claimed row that never started must expire.
        await self._store.renew_leases(self._leases.owner, self._leases.until(), list(self._slots.runs))
        if self._draining:
            return 0
        resumed, failed = await self.recover(expired_only=True)
        taken = 0
        room = self._slots.room()
        if self._queue is not None and room > 0:
            try:
                # Entries a process read and died before claiming; no more than fit.
                stalled = await self._queue.reclaim(int(self._leases.seconds * 1000), count=room)
                taken, _ = await self._run_queued(stalled)
            except QUEUE_FAILURES as exc:
                self._counters.queue_failures += 1
                log.warning("could not take over the execution work queue's stalled entries: %s", exc)
        return resumed + failed + taken

    # -- the shared work queue ------------------------------------------------

    async def _consume(self) -> None:
        """Forever: while this process has free slots, take queued executions and run them."""
        assert self._queue is not None
        delay = 0.1
        while not self._draining:
            free = self._slots.room()
            if free <= 0:
                await self._until_freed(None)
                continue
            try:
                entries = await self._queue.take(free)
                # Executions created here while the read waited may have taken the room,
                # and a process that began stopping meanwhile runs none of them.
                room = 0 if self._draining else max(0, self._slots.room())
                await self._queue.give_back(entries[room:])
                started, passed_over = await self._run_queued(entries[:room])
                delay = 0.1
                if passed_over and not started:
                    # Only tenants at their share here are queued: read again once a
                    # run ends, or after a while (other processes add work meanwhile).
                    await self._until_freed(WAIT_POLL)
            except Exception as exc:  # Redis or the database failing: retry, never stop
                if _cancelling():
                    # redis-py can turn the cancellation of a blocked read into a connection
                    # error: retrying then would outlive the shutdown that cancelled this loop.
                    raise asyncio.CancelledError from exc
                if not isinstance(exc, QUEUE_FAILURES):
                    log.exception("taking executions from the work queue failed; will retry")
                else:
                    self._counters.queue_failures += 1
                    log.warning("the execution work queue cannot be reached (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                delay = min(delay * 2, QUEUE_RETRY_MAX)

    async def _until_freed(self, timeout: float | None) -> None:
        """Until a run here ends (a slot is free) or the process begins to stop; at most `timeout` seconds."""
        self._slots.freed.clear()
        waits = {asyncio.ensure_future(self._slots.freed.wait()), asyncio.ensure_future(self._stopping.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

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
            # A process that began stopping meanwhile starts none of the rest: they go back.
            if self._draining or self._slots.room() <= 0 or self._slots.tenant_full(entry.tenant):
                passed_over.append(entry)
                continue
            self._slots.reserve(entry.tenant, 1)
            try:
                execution = await self._store.claim_execution(
                    entry.tenant,
                    entry.execution_id,
                    self._leases.owner,
                    now_us=now_us(),
                    lease_until_us=self._leases.until(),
                )
                if execution is None or execution.execution_id in self._slots.runs:
                    continue
                if await self._resume(execution):
                    self._counters.taken_from_queue += 1
                    started += 1
            finally:
                self._slots.reserve(entry.tenant, -1)
        await self._queue.done([entry for entry in entries if entry not in passed_over])
        await self._queue.give_back(passed_over)
        return started, len(passed_over)


def _cancelling() -> bool:
    """Whether the running task was asked to stop (however the await it was in ended)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
