"""CPU per execution of the trivial workflow, end to end in the server.

Starts `flowport serve` on free loopback ports, creates the trivial workflow
(one PythonCodeNode returning {'n': n + 1}), runs --count executions with
`wait` over direct gRPC at --concurrency, and reports the CPU time the
server process and its sandbox workers spent per execution (from
/proc/<pid>/stat, so Linux only), plus throughput for context.

    python -m benchmarks.cpu_per_execution --count 2000 --concurrency 16

With --postgres-redis the server keeps its state in a PostgreSQL database
and its events in a Redis stream (both started here, as the test suite
starts them: tests/backends.py), and their CPU per execution is reported
too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from flowport.server.settings import Settings
from flowport.server.supervisor import child_environment
from flowport.v1 import (
    execution_pb2,
    execution_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)
from tests.backends import PostgresServer, RedisServer

TICKS = os.sysconf("SC_CLK_TCK")
TRIVIAL = {
    "name": "trivial",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'n': n + 1}"}}],
}


def _cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    spent = int(fields[11]) + int(fields[12])  # utime + stime
    if with_children:
        spent += int(fields[13]) + int(fields[14])  # cutime + cstime: children that exited
    return spent / TICKS


def _backends_cpu() -> tuple[float, float]:
    """CPU seconds of every postgres and redis-server process on the machine (those started here
    while measuring; their exited backends' time is in their parent's)."""
    spent = {"postgres": 0.0, "redis-server": 0.0}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name = (entry / "comm").read_text().strip()
                if name in spent:
                    spent[name] += _cpu_seconds(int(entry.name), with_children=True)
            except OSError:
                continue
    return spent["postgres"], spent["redis-server"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


ADMIN_KEY = "fpk_bench." + secrets.token_urlsafe(32)


class _ApiKey(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, key: str) -> None:
        self._metadata = (("x-api-key", key),)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=tuple(details.metadata or ()) + self._metadata)
        return await continuation(details, request)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _drive(target: str, count: int, concurrency: int, baseline: bool) -> float:
    # A user key, as a production caller would send (authenticated on every call).
    interceptor = _ApiKey(ADMIN_KEY)
    async with grpc.aio.insecure_channel(target, interceptors=[interceptor]) as channel:
        for _ in range(100):
            try:
                await gateway_pb2_grpc.GatewayServiceStub(channel).GetInfo(gateway_pb2.GetInfoRequest(), timeout=1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
        if baseline:
            gateway = gateway_pb2_grpc.GatewayServiceStub(channel)

            async def info() -> None:
                for _ in numbers:
                    await gateway.GetInfo(gateway_pb2.GetInfoRequest())

            numbers = iter(range(count + 50))
            started = time.perf_counter()
            await asyncio.gather(*(info() for _ in range(concurrency)))
            return time.perf_counter() - started
        workflows = workflow_pb2_grpc.WorkflowServiceStub(channel)
        await workflows.CreateWorkflow(
            workflow_pb2.CreateWorkflowRequest(workflow=json_format.ParseDict(TRIVIAL, workflow_pb2.Workflow()))
        )
        executions = execution_pb2_grpc.ExecutionServiceStub(channel)
        numbers = iter(range(count))

        async def worker() -> None:
            for n in numbers:
                request = execution_pb2.CreateExecutionRequest(workflow_id="trivial", wait=True)
                request.inputs.update({"n": n})
                done = await executions.CreateExecution(request)
                assert done.state == execution_pb2.Execution.STATE_SUCCEEDED, done.error.message
                assert done.outputs["calc"]["result"]["n"] == n + 1

        warm = iter(range(50))
        numbers, warm = warm, numbers  # warm-up round first
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        numbers = warm
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--baseline", action="store_true", help="measure a trivial unary RPC (GetInfo) instead: the gRPC floor"
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="run the server with --insecure-no-auth: the cost of authentication"
    )
    parser.add_argument(
        "--postgres-redis", action="store_true", help="state in PostgreSQL and events in Redis (started here)"
    )
    args = parser.parse_args()
    extra: dict[str, object] = {"insecure_no_auth": True} if args.no_auth else {}
    with contextlib.ExitStack() as backends:
        if args.postgres_redis:
            postgres = backends.enter_context(PostgresServer())
            redis = backends.enter_context(RedisServer())
            extra |= {"database_url": postgres.new_database(), "redis_url": redis.url}
        return _measure(args, extra)


def server_settings(data: str, extra: dict[str, object] | None = None) -> Settings:
    """The measured server's: free loopback ports, one sandbox worker, the benchmark's admin key."""
    return Settings.load(
        {
            "data_dir": data,
            "grpc_port": _free_port(),
            "metrics_port": _free_port(),
            "websocket_port": _free_port(),
            "sandbox_workers": 1,
            "admin_api_key": ADMIN_KEY,
            **(extra or {}),
        },
        environ={},
    )


@contextlib.contextmanager
def running_server(settings: Settings, log_level: str = "warning") -> Iterator[subprocess.Popen[bytes]]:
    """`flowport serve` on `settings` for the block (terminated after it)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "flowport.clients.cli", "serve", "--log-level", log_level],
        env=child_environment(settings),
    )
    try:
        yield server
    finally:
        server.terminate()
        server.wait(30)


def _measure(args: argparse.Namespace, extra: dict[str, object]) -> int:
    with tempfile.TemporaryDirectory() as data:
        settings = server_settings(data, extra)
        with running_server(settings) as server:
            time.sleep(1.0)
            workers = _children(server.pid)
            # PostgreSQL's backends come and go: its whole tree, counted by name.
            before = _cpu_seconds(server.pid), sum(_cpu_seconds(w) for w in workers), _backends_cpu()
            # The warm-up round is inside _drive; measure around the whole run and subtract it below.
            elapsed = asyncio.run(_drive(settings.grpc_target, args.count, args.concurrency, args.baseline))
            after = _cpu_seconds(server.pid), sum(_cpu_seconds(w) for w in _children(server.pid)), _backends_cpu()
    total = args.count + 50
    server_ms = 1000 * (after[0] - before[0]) / total
    worker_ms = 1000 * (after[1] - before[1]) / total
    if args.postgres_redis:
        print(
            f"PostgreSQL CPU per execution: {1000 * (after[2][0] - before[2][0]) / total:.3f} ms, "
            f"Redis: {1000 * (after[2][1] - before[2][1]) / total:.3f} ms"
        )
    print(f"cores: {os.cpu_count()}  executions: {args.count} (+50 warm-up)  concurrency: {args.concurrency}")
    what = "GetInfo call" if args.baseline else "execution"
    print(f"server CPU per {what}:  {server_ms:.3f} ms")
    print(f"sandbox CPU per execution: {worker_ms:.3f} ms")
    print(f"throughput (client, server and workers share the machine): {args.count / elapsed:.0f} executions/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
