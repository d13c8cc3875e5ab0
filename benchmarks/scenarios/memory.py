"""Memory: the server's resident set at idle, while 100,000 (full) unary calls go through,
and per idle event stream.

Calls are REST through Envoy over h2c (h2load), so transcoding, authentication
and the store's read path all run. RSS is sampled after each fifth of the
calls: a leak grows with the calls, a warmed cache levels off. Growth counts
from the first sample (after the first fifth), so one-time warm-up (the
authentication cache, grpc's buffers) is reported apart from it.
"""

from __future__ import annotations

import asyncio

import grpc
import uvloop

from benchmarks.harness import http_tools, procstat
from benchmarks.harness.targets import FlowportUp
from benchmarks.scenarios import Context, Result, check
from benchmarks.scenarios.setup import HEADERS, METADATA, prepare
from flowport.v1 import event_pb2, event_pb2_grpc

MIB = 2**20
SAMPLES = 5


def _rss(up: FlowportUp) -> int:
    """The server processes' own RSS (their sandbox workers are measured apart)."""
    return sum(procstat.rss_bytes(pid) for pid in up.server_pids())


async def _idle_streams(up: FlowportUp, count: int) -> tuple[int, int]:
    """RSS before and with `count` idle event streams open."""
    before = _rss(up)
    async with grpc.aio.insecure_channel(up.grpc_direct) as channel:
        stub = event_pb2_grpc.EventServiceStub(channel)
        streams = [
            stub.StreamEvents(event_pb2.StreamEventsRequest(types=["nothing.*"]), metadata=METADATA)
            for _ in range(count)
        ]
        waiting = [asyncio.ensure_future(stream.initial_metadata()) for stream in streams]
        await asyncio.wait_for(asyncio.gather(*waiting), 30)
        await asyncio.sleep(1.0)
        during = _rss(up)
        for stream in streams:
            stream.cancel()
    return before, during


def run(ctx: Context) -> Result:
    total = ctx.sizes.memory_requests
    with FlowportUp.run(ctx.folder("memory")) as up:
        session = prepare(up)
        idle = _rss(up)
        workers_idle = procstat.tree_rss_bytes(up.server_pids()) - idle
        url = f"http://{up.edge}/api/sessions/{session.session_id}"
        samples: list[int] = []
        failed = 0
        for _ in range(SAMPLES):
            result = http_tools.h2load(url, requests=total // SAMPLES, clients=4, streams=8, headers=HEADERS)
            failed += result.errors
            samples.append(_rss(up))
        before_streams, with_streams = uvloop.run(_idle_streams(up, ctx.sizes.idle_streams))
    growth = samples[-1] - samples[0]
    measured_calls = total - total // SAMPLES
    checks = [check(failed == 0, f"all {total} calls answered 200")]
    return {
        "idle_rss_mib": round(idle / MIB, 1),
        "sandbox_workers_idle_rss_mib": round(workers_idle / MIB, 1),
        "requests": total,
        "rss_samples_mib": [round(s / MIB, 2) for s in samples],
        "warm_up_mib": round((samples[0] - idle) / MIB, 2),
        "growth_mib": round(growth / MIB, 2),
        "growth_mib_per_100k_requests": round(growth / MIB * 100_000 / measured_calls, 2),
        "idle_streams": ctx.sizes.idle_streams,
        "kib_per_idle_stream": round((with_streams - before_streams) / 1024 / ctx.sizes.idle_streams, 1),
        "checks": checks,
    }
