"""Fair shares between tenants: the sandbox pool's round-robin line with a cap per
tenant, the executor's per-tenant share of execution slots, and both through a
real server where one tenant floods it while another runs a trivial workflow."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, json_format

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import Running, start, stop
from flowport.server.engine.executor import Executor
from flowport.server.engine.plan import PlanCache
from flowport.server.engine.redis_work_queue import RedisWorkQueue
from flowport.server.errors import ResourceExhausted
from flowport.server.events.bus import EventBus
from flowport.server.leases import Leases
from flowport.server.limits import tenant_share
from flowport.server.nodes.base import NodeServices
from flowport.server.sandbox import SandboxLimits, SandboxPool
from flowport.server.sandbox.fairness import FairQueue
from flowport.server.settings import Settings, SettingsError
from flowport.server.storage import SqliteStore
from flowport.v1 import apikey_pb2, execution_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings
from .test_executor import GATES, REGISTRY, inputs, wf

Execution = execution_pb2.Execution
LONG = "import time\ntime.sleep(20)\nresult = 'slept'"  # cancelled long before it ends


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- the line itself ----------------------------------------------------------------


async def _futures(n: int) -> list[asyncio.Future[str]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(n)]


def _serve_all(line: FairQueue[str], names: dict[asyncio.Future[str], str]) -> list[str]:
    """Pop whoever is first in line until nobody may be served; their names, in order."""
    served = []
    while ready := line.ready():
        served.append(names[line.pop(ready[0])])
    return served


async def test_waiting_tenants_are_served_round_robin_not_first_come() -> None:
    line: FairQueue[str] = FairQueue(cap=100)
    a = await _futures(100)
    b, c = await _futures(2)
    names = {f: f"a{n}" for n, f in enumerate(a)} | {b: "b", c: "c"}
    for waiter in a:  # tenant a queued a hundred jobs first
        line.push("a", waiter)
    line.push("b", b)
    line.push("c", c)
    served = _serve_all(line, names)
    assert served[:4] == ["a0", "b", "c", "a1"], "b and c are served in the first round, not after a's hundred"
    assert served[4:] == [f"a{n}" for n in range(2, 100)], "within a tenant: first come, first served"
    assert line.held("a") == 100 and line.held("b") == line.held("c") == 1


async def test_a_tenant_at_its_cap_waits_while_others_are_served() -> None:
    line: FairQueue[str] = FairQueue(cap=2)
    a = await _futures(4)
    (b,) = await _futures(1)
    names = {f: f"a{n}" for n, f in enumerate(a)} | {b: "b"}
    for waiter in a:
        line.push("a", waiter)
    line.push("b", b)
    assert _serve_all(line, names) == ["a0", "b", "a1"], "a stops at two held"
    assert line.ready() == [] and len(line) == 2
    line.release("a")
    assert _serve_all(line, names) == ["a2"]
    line.release("b")  # b's share frees nothing of a's
    assert _serve_all(line, names) == []
    line.release("a")
    line.release("a")
    assert _serve_all(line, names) == ["a3"] and line.held("a") == 1


async def test_a_waiter_that_gave_up_is_skipped_and_removed() -> None:
    line: FairQueue[str] = FairQueue(cap=1)
    first, second, other = await _futures(3)
    line.push("a", first)
    line.push("a", second)
    line.push("b", other)
    first.cancel()  # cancelled, not yet removed by its caller
    assert line.pop(line.ready()[0]) is second
    line.remove("b", other)
    line.remove("b", other)  # twice: no-op
    assert line.ready() == [] and len(line) == 0
    with pytest.raises(ValueError):
        FairQueue[str](cap=0)


@pytest.mark.parametrize(
    ("fraction", "total", "share"),
    [(0.5, 2, 1), (0.5, 3, 2), (0.5, 1, 1), (0.5, 256, 128), (0.1, 10, 1), (0.001, 5, 1), (1.0, 7, 7), (0.3, 10, 3)],
)
def test_a_share_is_rounded_up_and_at_least_one(fraction: float, total: int, share: int) -> None:
    assert tenant_share(fraction, total) == share


@pytest.mark.parametrize("name", ["tenant_execution_share", "tenant_sandbox_share"])
@pytest.mark.parametrize("value", ["0", "1.5", "half"])
def test_a_bad_share_fails_at_start_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"invalid setting {name} \\(environment FLOWPORT_{name.upper()}\\)"):
        Settings.load(environ={f"FLOWPORT_{name.upper()}": value})


# -- the sandbox pool ------------------------------------------------------------------


async def test_a_tenant_flooding_the_pool_leaves_a_worker_for_another() -> None:
    pool = SandboxPool(size=2, limits=SandboxLimits(wall_seconds=60), tenant_share=1)
    await pool.start()
    flood: list[asyncio.Task[Any]] = []
    try:
        flood = [asyncio.create_task(pool.run(LONG, {}, tenant="a")) for _ in range(4)]

        async def a_settled() -> bool:
            return pool.held("a") == 1 and pool.waiting == 3

        await eventually(a_settled, "a's first job to run and the rest to wait")
        assert await pool.run("result = 42", {}, tenant="b") == 42
        assert not any(task.done() for task in flood), "b ran while a's jobs were all still running or waiting"
        assert pool.held("a") == 1 and pool.stats.share_waits == 3
    finally:
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        await pool.close()


async def test_a_freed_worker_goes_to_the_next_tenant_in_turn() -> None:
    # One worker, so the cap is the whole pool: only the round-robin order helps b.
    pool = SandboxPool(size=1, limits=SandboxLimits(wall_seconds=60))
    await pool.start()
    finished: list[str] = []
    jobs: list[asyncio.Task[Any]] = []
    try:
        first = asyncio.create_task(pool.run(LONG, {}, tenant="a"))

        async def first_running() -> bool:
            return pool.held("a") == 1

        await eventually(first_running, "a's first job to take the worker")
        for tenant in ("a", "a", "a", "b"):  # a queues three before b queues one
            job = asyncio.create_task(pool.run("result = t", {"t": tenant}, tenant=tenant, timeout=60))
            job.add_done_callback(lambda task: finished.append(task.result()))
            jobs.append(job)

        async def all_waiting() -> bool:
            return pool.waiting == 4

        await eventually(all_waiting, "the four jobs to queue")
        first.cancel()  # frees the worker (killed and replaced)
        await asyncio.gather(*jobs)
        assert finished == ["a", "b", "a", "a"], "b is served in the round after a's, not after all of a's"
    finally:
        first.cancel()
        for job in jobs:
            job.cancel()
        await asyncio.gather(first, *jobs, return_exceptions=True)
        await pool.close()


# -- executions over the shared work queue ----------------------------------------------


async def test_the_queue_consumer_passes_over_a_tenant_at_its_share(tmp_path: Path, redis_url: str) -> None:
    GATES.clear()
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    bus = EventBus()
    workflows = {}
    for tenant in ("x", "t", "u"):
        workflow = wf("gated", [{"type": "GateNode", "name": "g", "config": {"gate": "fair-open"}}])
        workflow.tenant = tenant
        await store.create_workflow(tenant, workflow, None)
        workflows[tenant] = workflow
    queues = [RedisWorkQueue(redis_url, name, block_ms=100) for name in ("full", "consumer")]
    # Two processes sharing the queue: one full (it only queues), one with room that takes from it.
    full = Executor(store, PlanCache(REGISTRY), bus, NodeServices(), max_concurrent=1, queue=queues[0], leases=Leases())
    consumer = Executor(
        store,
        PlanCache(REGISTRY),
        bus,
        NodeServices(),
        max_concurrent=4,
        queue=queues[1],
        leases=Leases(),
        tenant_share=1,
    )
    created: list[Execution] = []
    try:
        for executor, tenant in ((full, "x"), (consumer, "t"), (full, "t"), (full, "u")):
            execution, _ = await executor.create(
                tenant, workflows[tenant], inputs(), session_id="", request_id="", request_hash=None
            )
            created.append(execution)
        t_queued = created[2]
        assert full.counters.queued == 2 and consumer.tenant_running("t") == 1, "t is at its share in the consumer"
        consumer.start_leasing()

        async def u_taken() -> bool:
            return consumer.tenant_running("u") == 1

        await eventually(u_taken, "the consumer to run u's queued execution")
        # t's entry was queued before u's, and passed over: still waiting, unclaimed.
        row = await store.get_execution("t", t_queued.execution_id)
        assert row is not None and row.state == Execution.STATE_PENDING
        assert consumer.tenant_running("t") == 1 and consumer.counters.taken_from_queue == 1
        GATES.setdefault("fair-open", asyncio.Event()).set()  # every gated run ends: t has room again

        async def all_done() -> bool:
            rows = [await store.get_execution(e.tenant, e.execution_id) for e in created]
            return all(row is not None and row.state == Execution.STATE_SUCCEEDED for row in rows)

        await eventually(all_done, "t's queued execution to run once t had room")
        assert consumer.counters.taken_from_queue == 2 and await queues[0].backlog() == 0
    finally:
        for executor in (full, consumer):
            await executor.shutdown()
        for queue in queues:
            await queue.close()
        await store.close()


# -- leases passing while executions wait: never more than fits --------------------------

LEASE = 0.6  # seconds: a sweep every 0.2 s, so a few leases pass within a test; a stall of
# the machine has 0.4 s before a held lease lapses


def track_peaks(executor: Executor) -> dict[str, int]:
    """The most executions `executor` ran at once, in all ("*") and per tenant, updated at each start."""
    peaks: dict[str, int] = {}
    start = executor._walker.start

    def tracked(run: Any) -> None:
        start(run)
        tenants = [r.tenant for r in executor._slots.runs.values()]
        peaks["*"] = max(peaks.get("*", 0), len(tenants))
        peaks[run.tenant] = max(peaks.get(run.tenant, 0), tenants.count(run.tenant))

    executor._walker.start = tracked  # type: ignore[method-assign]
    return peaks


async def _gated_workflows(store: Any, tenants: str, gate: str) -> dict[str, workflow_pb2.Workflow]:
    workflows = {}
    for tenant in tenants:
        workflow = wf("gated", [{"type": "GateNode", "name": "g", "config": {"gate": gate}}])
        workflow.tenant = tenant
        await store.create_workflow(tenant, workflow, None)
        workflows[tenant] = workflow
    return workflows


async def _all_succeed_once(store: Any, events: Any, created: list[Execution]) -> None:
    """Every one of `created` ends SUCCEEDED, having started exactly once (its gate node too)."""

    async def all_done() -> bool:
        rows = [await store.get_execution(e.tenant, e.execution_id) for e in created]
        return all(row is not None and row.state == Execution.STATE_SUCCEEDED for row in rows)

    await eventually(all_done, "every execution to succeed")
    starts: dict[tuple[str, str], int] = {}
    while (event := await events.next(0.05)) is not None:
        starts[(event.type, event.execution_id)] = starts.get((event.type, event.execution_id), 0) + 1
    for kind in ("execution.started", "node.started", "execution.completed"):
        assert {e.execution_id: starts.get((kind, e.execution_id), 0) for e in created} == {
            e.execution_id: 1 for e in created
        }, f"each execution has exactly one {kind}"


@pytest.fixture
def shared_store(engine_store: Any) -> Any:
    """One store that two executors share, as processes share PostgreSQL."""
    return engine_store


@pytest.mark.timeout(120)
async def test_queued_executions_past_their_lease_never_overfill_a_process(shared_store: Any, redis_url: str) -> None:
    GATES.clear()
    store = shared_store
    bus = EventBus()
    events = bus.subscribe(lambda e: e.type in ("execution.started", "node.started", "execution.completed"))
    workflows = await _gated_workflows(store, "xtu", "lease-open")
    queues = [RedisWorkQueue(redis_url, name, block_ms=100) for name in ("full", "consumer")]
    # Two processes on one store and queue: one full that only queues, and one with three slots, two per tenant.
    full = Executor(
        store,
        PlanCache(REGISTRY),
        bus,
        NodeServices(),
        max_concurrent=3,
        queue=queues[0],
        leases=Leases(LEASE),
        exclusive=False,
    )
    full.start_leasing()  # keeps its own runs' leases, as a live process does, and sweeps too
    consumer = Executor(
        store,
        PlanCache(REGISTRY),
        bus,
        NodeServices(),
        max_concurrent=3,
        queue=queues[1],
        leases=Leases(LEASE),
        exclusive=False,
        tenant_share=2,
    )
    peaks, full_peaks = track_peaks(consumer), track_peaks(full)
    created: list[Execution] = []
    try:
        for tenant in "xxxtututttt":
            execution, _ = await full.create(
                tenant, workflows[tenant], inputs(), session_id="", request_id="", request_hash=None
            )
            created.append(execution)
        assert full.running == 3 and full.counters.queued == 8
        await asyncio.sleep(2 * LEASE)  # every queued row has now waited longer than a lease
        assert full.running == 3 and full_peaks == {"*": 3, "x": 3}, "the full process's sweeps took none"
        consumer.start_leasing()

        async def consumer_full() -> bool:
            return consumer.running == 3

        await eventually(consumer_full, "the consumer to fill its slots from the queue")
        await asyncio.sleep(5 * LEASE)  # fifteen sweeps of the consumer, and of the full process
        assert (consumer.running, consumer.tenant_running("t"), consumer.tenant_running("u")) == (3, 2, 1)
        assert peaks == {"*": 3, "t": 2, "u": 1}, "no sweep started more than the slots and the share allow"
        assert full.running == 3 and full_peaks == {"*": 3, "x": 3}, "nor one of the full process"
        # The other five wait their turn: still in the queue and unowned, not taken over as abandoned.
        waiting = []
        for execution in created[3:]:
            lease = await store.execution_lease(execution.tenant, execution.execution_id)
            row = await store.get_execution(execution.tenant, execution.execution_id)
            assert lease is not None and row is not None
            if lease[0] == "" and row.state == Execution.STATE_PENDING:
                waiting.append(execution.execution_id)
        assert len(waiting) == 5 and await queues[0].backlog() == 5
        GATES.setdefault("lease-open", asyncio.Event()).set()
        await _all_succeed_once(store, events, created)
        assert peaks["*"] <= 3 and peaks["t"] <= 2 and peaks["u"] <= 2 and full_peaks["*"] <= 3
        assert full.counters.taken_from_queue + consumer.counters.taken_from_queue == 8
        assert await queues[0].backlog() == 0
    finally:
        events.close()
        for executor in (full, consumer):
            await executor.shutdown()
        for queue in queues:
            await queue.close()


async def test_a_queued_execution_whose_entry_was_lost_still_runs_once(tmp_path: Path, redis_url: str) -> None:
    GATES.clear()
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    bus = EventBus()
    events = bus.subscribe(lambda e: e.type in ("execution.started", "node.started", "execution.completed"))
    workflows = await _gated_workflows(store, "xt", "lost-open")
    queues = [RedisWorkQueue(redis_url, name, block_ms=100) for name in ("full", "consumer")]
    full = Executor(
        store,
        PlanCache(REGISTRY),
        bus,
        NodeServices(),
        max_concurrent=1,
        queue=queues[0],
        leases=Leases(LEASE),
        exclusive=False,
    )
    consumer = Executor(
        store,
        PlanCache(REGISTRY),
        bus,
        NodeServices(),
        max_concurrent=2,
        queue=queues[1],
        leases=Leases(LEASE),
        exclusive=False,
    )
    admin = aioredis.Redis.from_url(redis_url)
    created: list[Execution] = []
    try:
        full.start_leasing()
        for tenant in "xtt":
            execution, _ = await full.create(
                tenant, workflows[tenant], inputs(), session_id="", request_id="", request_hash=None
            )
            created.append(execution)
        assert full.counters.queued == 2
        await admin.flushall()  # Redis restarted without persistence: both entries are gone
        GATES.setdefault("lost-open", asyncio.Event()).set()
        consumer.start_leasing()
        await _all_succeed_once(store, events, created)
        taken = full.counters.taken_from_queue + consumer.counters.taken_from_queue
        assert taken == 2, "queued again after a lease, then taken from the queue"
    finally:
        events.close()
        for executor in (full, consumer):
            await executor.shutdown()
        for queue in queues:
            await queue.close()
        await admin.aclose()
        await store.close()


async def test_executions_left_by_a_stopped_process_are_resumed_as_they_fit(tmp_path: Path) -> None:
    GATES.clear()
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    bus = EventBus()
    events = bus.subscribe(lambda e: e.type in ("execution.started", "node.started", "execution.completed"))
    workflows = await _gated_workflows(store, "ab", "resume-open")
    # What a process with more slots left when it crashed: six recorded, its leases still running.
    left: list[Execution] = []
    for n, tenant in enumerate("aaaaba"):
        execution = Execution(
            execution_id=f"exe_left_{n}",
            workflow_id="gated",
            workflow_version=workflows[tenant].version,
            tenant=tenant,
            state=Execution.STATE_PENDING,
        )
        execution.create_time.GetCurrentTime()
        await store.insert_execution(tenant, execution, None, owner="crashed", lease_until_us=2**62)
        left.append(execution)
    executor = Executor(
        store, PlanCache(REGISTRY), bus, NodeServices(), max_concurrent=3, leases=Leases(LEASE), tenant_share=2
    )
    peaks = track_peaks(executor)
    try:
        assert await executor.recover() == (3, 0), "as many as fit: three slots, two of them for a"
        assert (executor.tenant_running("a"), executor.tenant_running("b")) == (2, 1)
        executor.start_leasing()
        await asyncio.sleep(3 * LEASE)  # nine sweeps with no room: nothing more starts
        assert executor.running == 3 and peaks == {"*": 3, "a": 2, "b": 1}
        waiting = await store.get_execution("a", "exe_left_5")
        assert waiting is not None and waiting.state == Execution.STATE_PENDING, "left for later, not lost"
        GATES.setdefault("resume-open", asyncio.Event()).set()
        await _all_succeed_once(store, events, left)
        assert peaks == {"*": 3, "a": 2, "b": 1}
    finally:
        events.close()
        await executor.shutdown()
        await store.close()


async def test_a_tenant_at_its_share_of_the_backlog_is_refused_while_another_still_queues(
    shared_store: Any, redis_url: str
) -> None:
    GATES.clear()
    store = shared_store
    workflows = await _gated_workflows(store, "xytu", "backlog-open")
    queue = RedisWorkQueue(redis_url, "p", block_ms=100)
    # Two slots, one per tenant: a backlog of eight, four per tenant.
    executor = Executor(
        store, PlanCache(REGISTRY), EventBus(), NodeServices(), max_concurrent=2, queue=queue, tenant_share=1
    )

    async def create(tenant: str, request_id: str = "") -> Execution:
        execution, _ = await executor.create(
            tenant,
            workflows[tenant],
            inputs(),
            session_id="",
            request_id=request_id,
            request_hash=b"h" if request_id else None,
        )
        return execution

    try:
        for tenant in "xy":  # the slots are full: what follows waits in the queue
            await create(tenant)
        assert executor.running == 2
        # A burst: calls admitted but not yet written count too, so no more than four get in.
        burst = await asyncio.gather(*(create("t", f"r{n}") for n in range(6)), return_exceptions=True)
        queued = [e for e in burst if isinstance(e, Execution)]
        refusals = [e for e in burst if not isinstance(e, Execution)]
        assert 1 <= len(queued) <= 4, refusals
        while len(queued) < 4:  # one refused while another's row was being written may get in now
            queued.append(await create("t"))
        assert {e.state for e in queued} == {Execution.STATE_PENDING} and await queue.backlog() == 4
        with pytest.raises(ResourceExhausted) as refused:
            await create("t")
        for error in [*refusals, refused.value]:
            assert isinstance(error, ResourceExhausted) and error.reason == "TENANT_QUEUE_SHARE", error
            assert error.retry_delay is not None and error.retry_delay > 0
            assert error.metadata == {"tenant_max_queued_executions": "4", "max_queued_executions": "8"}
        again, replayed = await executor.create(
            "t", workflows["t"], inputs(), session_id="", request_id=queued[0].request_id, request_hash=b"h"
        )
        assert replayed and again.execution_id == queued[0].execution_id, "a retry is still answered"
        other = await create("u")
        assert other.state == Execution.STATE_PENDING and await queue.backlog() == 5, "u still queues"
    finally:
        GATES.setdefault("backlog-open", asyncio.Event()).set()
        await executor.shutdown()
        await queue.close()


# -- a real server: one tenant floods it, another runs `result = 42` ---------------------


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    # Two sandbox workers (one per tenant at the default share) and four execution slots (two per tenant).
    server = await start(make_settings(tmp_path / "data", max_concurrent_executions=4))
    try:
        yield server
    finally:
        await stop(server, 1.0)


@pytest.fixture
async def tenants(running: Running) -> AsyncIterator[tuple[AsyncClient, AsyncClient]]:
    """Clients of tenants alpha and beta, each with a user key of its own and the workflows nap and answer."""
    target = f"127.0.0.1:{running.port}"
    async with contextlib.AsyncExitStack() as stack:
        admin = await stack.enter_async_context(AsyncClient(target, api_key=ADMIN_KEY))
        clients = []
        for tenant in ("alpha", "beta"):
            created = await admin.keys.CreateApiKey(
                apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant=tenant, roles=["user"]))
            )
            client = await stack.enter_async_context(AsyncClient(target, api_key=created.key))
            for name, code in (("nap", LONG), ("answer", "result = 42")):
                workflow = json_format.ParseDict(
                    {"name": name, "nodes": [{"type": "PythonCodeNode", "name": "py", "config": {"code": code}}]},
                    workflow_pb2.Workflow(),
                )
                await client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
            clients.append(client)
        yield clients[0], clients[1]


async def _states(client: AsyncClient, executions: list[Execution]) -> list[int]:
    return [
        (await client.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=e.execution_id))).state
        for e in executions
    ]


async def _cancel(client: AsyncClient, executions: list[Execution]) -> None:
    for execution in executions:
        await client.executions.CancelExecution(
            execution_pb2.CancelExecutionRequest(execution_id=execution.execution_id)
        )


async def _answer(client: AsyncClient) -> Execution:
    return await client.executions.CreateExecution(
        execution_pb2.CreateExecutionRequest(
            workflow_id="answer", wait=True, wait_timeout=duration_pb2.Duration(seconds=60)
        ),
        timeout=90,
    )


async def test_a_tenant_flooding_the_sandbox_does_not_stall_another(
    running: Running, tenants: tuple[AsyncClient, AsyncClient]
) -> None:
    alpha, beta = tenants
    naps = [
        await alpha.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="nap"))
        for _ in range(2)  # its share of the four execution slots; more sleeps than its share of workers
    ]
    pool = running.services.sandbox
    assert pool is not None

    async def alpha_holds_a_worker() -> bool:
        return pool.held("alpha") == 1 and pool.waiting == 1

    await eventually(alpha_holds_a_worker, "alpha's first sleep to run and its second to wait")
    try:
        answered = await _answer(beta)
        assert answered.state == Execution.STATE_SUCCEEDED, answered.error.message
        assert json_format.MessageToDict(answered.outputs) == {"py": {"result": 42.0}}
        # Ordering, not timing: beta's run went through while both of alpha's were still going.
        assert await _states(alpha, naps) == [Execution.STATE_RUNNING] * 2
        assert pool.held("alpha") == 1
    finally:
        await _cancel(alpha, naps)
    assert set(await _states(alpha, naps)) == {Execution.STATE_CANCELLED}


async def test_a_tenant_at_its_execution_share_leaves_slots_for_another(
    running: Running, tenants: tuple[AsyncClient, AsyncClient]
) -> None:
    alpha, beta = tenants
    naps: list[Execution] = []
    try:
        refused: ApiError | None = None
        for _ in range(4):  # as many as the server has slots
            try:
                naps.append(
                    await alpha.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="nap"))
                )
            except grpc.aio.AioRpcError as error:
                refused = ApiError.from_rpc_error(error)
                break
        assert len(naps) == 2 and running.executor.tenant_running("alpha") == 2
        assert refused is not None, "alpha was not stopped at its share"
        assert (refused.code(), refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_EXECUTION_SHARE")
        assert refused.retry_delay is not None and refused.retry_delay > 0
        assert refused.metadata["tenant_max_concurrent_executions"] == "2"
        answered = await _answer(beta)
        assert answered.state == Execution.STATE_SUCCEEDED, answered.error.message
        assert await _states(alpha, naps) == [Execution.STATE_RUNNING] * 2
    finally:
        await _cancel(alpha, naps)
    # Its slots are back: alpha may start again.
    again = await alpha.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="answer"))
    await _cancel(alpha, [again])
