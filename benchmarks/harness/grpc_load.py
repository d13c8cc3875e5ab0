"""A gRPC load generator: grpc.aio clients on uvloop in several processes.

Closed loop: `concurrency` calls in flight, each starting when the last one
ended. Open loop (`rate`): calls start on a fixed schedule whatever the
answers do, and latency counts from the scheduled start, so a stalled
server shows as latency instead of as fewer requests (no coordinated
omission). Each client process measures its own calls; the parent merges
the raw latencies, so percentiles are exact.

Every answer is checked (the right session, the right result for this
call's input): a fast wrong answer counts as `incorrect`, not as speed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop

from benchmarks.harness.latency import LoadResult
from flowport.v1 import execution_pb2, execution_pb2_grpc, session_pb2, session_pb2_grpc

OPEN_LOOP_MAX_IN_FLIGHT = 10_000


@dataclass(frozen=True)
class Workload:
    """What each call does (picklable: it crosses to the client processes)."""

    kind: str  # "get_session" or "execute"
    target: str
    metadata: tuple[tuple[str, str], ...] = ()
    params: dict[str, str] = field(default_factory=dict)


Call = Callable[[int], Awaitable[bool]]


def _call(workload: Workload, channel: grpc.aio.Channel) -> Call:
    """An async function making call number n and saying whether its answer is right."""
    if workload.kind == "get_session":
        stub = session_pb2_grpc.SessionServiceStub(channel)
        session_id = workload.params["session_id"]
        request = session_pb2.GetSessionRequest(session_id=session_id)

        async def get_session(n: int) -> bool:
            reply = await stub.GetSession(request, metadata=workload.metadata)
            return reply.session_id == session_id

        return get_session
    if workload.kind == "execute":
        executions = execution_pb2_grpc.ExecutionServiceStub(channel)
        workflow_id = workload.params["workflow_id"]

        async def execute(n: int) -> bool:
            # A unique input per call: nothing may answer it from a cache.
            request = execution_pb2.CreateExecutionRequest(workflow_id=workflow_id, wait=True)
            request.inputs.update({"n": n})
            done = await executions.CreateExecution(request, metadata=workload.metadata)
            result = done.outputs.fields["calc"].struct_value.fields["result"].struct_value.fields["n"]
            return done.state == execution_pb2.Execution.STATE_SUCCEEDED and result.number_value == n + 1

        return execute
    raise ValueError(f"unknown workload kind {workload.kind!r}")


@dataclass
class _Share:
    """One client process's part of the run and what it measured."""

    index: int
    concurrency: int
    duration: float | None
    requests: int | None
    rate: float | None
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    incorrect: int = 0
    seconds: float = 0.0


async def _closed(call: Call, share: _Share) -> None:
    base = share.index * 1_000_000_000
    counter = 0
    stop_at = time.monotonic() + share.duration if share.duration else None

    async def worker() -> None:
        nonlocal counter
        while True:
            if stop_at is not None and time.monotonic() >= stop_at:
                return
            if share.requests is not None and counter >= share.requests:
                return
            counter += 1
            n = base + counter
            started = time.perf_counter()
            try:
                right = await call(n)
            except grpc.aio.AioRpcError:
                share.errors += 1
                continue
            share.latencies.append((time.perf_counter() - started) * 1000)
            share.incorrect += not right

    await asyncio.gather(*(worker() for _ in range(share.concurrency)))


async def _open(call: Call, share: _Share) -> None:
    assert share.rate is not None
    interval = 1.0 / share.rate
    total = share.requests if share.requests is not None else int((share.duration or 0) * share.rate)
    base = share.index * 1_000_000_000
    in_flight: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(n: int, scheduled: float) -> None:
        try:
            right = await call(n)
        except grpc.aio.AioRpcError:
            share.errors += 1
            return
        share.latencies.append((time.perf_counter() - scheduled) * 1000)
        share.incorrect += not right

    for k in range(total):
        scheduled = start + k * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= OPEN_LOOP_MAX_IN_FLIGHT:
            share.errors += 1  # the server fell this far behind: counted as a failed call
            continue
        task = asyncio.create_task(one(base + k, scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


def _client(workload: Workload, share: _Share) -> _Share:
    async def go() -> None:
        async with grpc.aio.insecure_channel(workload.target) as channel:
            call = _call(workload, channel)
            started = time.perf_counter()
            await (_open(call, share) if share.rate else _closed(call, share))
            share.seconds = time.perf_counter() - started

    uvloop.run(go())
    return share


def _split(total: float | int | None, parts: int, index: int) -> Any:
    if total is None:
        return None
    if isinstance(total, int):
        return total // parts + (index < total % parts)
    return total / parts


def run(
    workload: Workload,
    *,
    concurrency: int,
    processes: int = 1,
    duration: float | None = None,
    requests: int | None = None,
    rate: float | None = None,
) -> LoadResult:
    """Run the load; exactly one of `duration` (seconds) and `requests` bounds it."""
    if (duration is None) == (requests is None):
        raise ValueError("give exactly one of duration and requests")
    processes = max(1, min(processes, concurrency))
    shares = [
        _Share(
            index=i,
            concurrency=_split(concurrency, processes, i),
            duration=duration,
            requests=_split(requests, processes, i),
            rate=_split(rate, processes, i),
        )
        for i in range(processes)
    ]
    if processes == 1:
        done = [_client(workload, shares[0])]
    else:
        # spawn: a forked child would inherit the parent's gRPC state.
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            done = pool.starmap(_client, [(workload, share) for share in shares])
    latencies = [ms for share in done for ms in share.latencies]
    return LoadResult.from_latencies(
        f"grpc.aio x{processes} ({'open loop' if rate else 'closed loop'})",
        latencies,
        max(share.seconds for share in done),
        errors=sum(share.errors for share in done),
        incorrect=sum(share.incorrect for share in done),
        concurrency=concurrency,
    )
