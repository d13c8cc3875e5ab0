"""Scale-out: unary RPS and executions/s through Envoy with `--workers 1` and `2`,
on SQLite and on PostgreSQL + Redis, in one run on this machine.

    python -m benchmarks.scale_out [--duration 10] [--concurrency 32]

Starts its own PostgreSQL and Redis (as the test suite does: tests/backends.py,
Debian's postgresql and redis-server), then for each configuration runs
`flowport up` and a closed-loop grpc.aio load through Envoy (native gRPC on
the HTTP port): `GetSession` (unary read) and `CreateExecution` with `wait`
of the one-node PythonCodeNode workflow. The load generator, Envoy, the
servers, their sandbox workers, PostgreSQL and Redis share the machine's
cores, so the figures say how the pieces compete on it, not how a worker
count scales on dedicated hardware.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from benchmarks.harness.latency import percentile
from flowport.server.settings import Settings
from flowport.server.supervisor import child_environment
from flowport.v1 import (
    execution_pb2,
    execution_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)
from tests.backends import PostgresServer, RedisServer, free_port, free_ports

ADMIN_KEY = "fpk_bench." + secrets.token_urlsafe(32)
TRIVIAL = {
    "name": "trivial",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'n': n + 1}"}}],
}


def _up(settings: Settings) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "flowport.clients.cli", "up"],
        env=child_environment(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        output.append(line)
        if "is up" in line:
            return process
        if not line and process.poll() is not None:
            break
    process.kill()
    raise SystemExit("flowport up did not start:\n" + "".join(output[-20:]))


async def _load(target: str, scenario: str, duration: float, concurrency: int) -> tuple[int, list[float], int]:
    """(calls done, latencies in ms, errors) of a closed loop over `duration` seconds."""
    metadata = (("x-api-key", ADMIN_KEY),)
    async with grpc.aio.insecure_channel(target) as channel:
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        executions = execution_pb2_grpc.ExecutionServiceStub(channel)
        session = await sessions.CreateSession(
            session_pb2.CreateSessionRequest(session=session_pb2.Session()), metadata=metadata
        )
        if scenario == "executions":
            workflow = json_format.ParseDict(TRIVIAL, workflow_pb2.Workflow())
            await workflow_pb2_grpc.WorkflowServiceStub(channel).CreateWorkflow(
                workflow_pb2.CreateWorkflowRequest(workflow=workflow), metadata=metadata
            )
        latencies: list[float] = []
        errors = 0
        stop_at = time.monotonic() + duration

        async def one(n: int) -> None:
            if scenario == "unary":
                await sessions.GetSession(
                    session_pb2.GetSessionRequest(session_id=session.session_id), metadata=metadata
                )
            else:
                request = execution_pb2.CreateExecutionRequest(workflow_id="trivial", wait=True)
                request.inputs.update({"n": n})
                done = await executions.CreateExecution(request, metadata=metadata)
                assert done.state == execution_pb2.Execution.STATE_SUCCEEDED

        async def worker(offset: int) -> None:
            nonlocal errors
            n = offset
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    await one(n)
                except (grpc.aio.AioRpcError, AssertionError):
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                n += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return len(latencies), latencies, errors


def run_one(config: dict[str, Any], scenario: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    settings = Settings.load(
        {
            "data_dir": data / f"{config['name']}-{scenario}",
            "http_port": free_port(),
            "grpc_port": free_port(),
            "admin_port": free_port(),
            "metrics_port": free_port(),
            # No /ws (not measured here), so no fixed port a previous run may still hold.
            "websocket_port": 0,
            # A loaded machine (the test suite runs this too) may take a while to start both workers.
            "startup_timeout": 60,
            "admin_api_key": ADMIN_KEY,
            "log_level": "warning",
            "access_log": "off",
            # The benchmark measures the servers, not Envoy's local limits.
            "rate_limit_max_requests": 0,
            # One tenant drives the load: the caps that keep tenants apart would only idle capacity.
            "tenant_execution_share": 1.0,
            "tenant_sandbox_share": 1.0,
            **config["settings"],
        },
        environ={},
    )
    if settings.workers > 1:  # consecutive ports from grpc_port
        settings = settings.model_copy(update={"grpc_port": free_ports(settings.workers)})
    up = _up(settings)
    try:
        target = f"127.0.0.1:{settings.http_port}"
        asyncio.run(_load(target, scenario, getattr(args, "warmup", 2.0), args.concurrency))  # warm-up
        calls, latencies, errors = asyncio.run(_load(target, scenario, args.duration, args.concurrency))
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    ordered = sorted(latencies)
    return {
        "config": config["name"],
        "scenario": scenario,
        "per_second": calls / args.duration,
        "p50": percentile(ordered, 0.5),
        "p99": percentile(ordered, 0.99),
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    print(f"cores: {os.cpu_count()}  cpu: {cpu}  python: {platform.python_version()}")
    print(f"load: closed loop, {args.concurrency} in flight, {args.duration:g} s per measurement, through Envoy\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, PostgresServer() as postgres, RedisServer() as redis:
        data = Path(tmp)
        shared = {"redis_url": redis.url}
        configs = [
            {"name": "sqlite, 1 worker", "settings": {}},
            {"name": "pg+redis, 1 worker", "settings": {"database_url": postgres.new_database(), **shared}},
            {
                "name": "pg+redis, 2 workers",
                "settings": {"database_url": postgres.new_database(), **shared, "workers": 2},
            },
        ]
        for config in configs:
            for scenario in ("unary", "executions"):
                rows.append(run_one(config, scenario, args, data))
                row = rows[-1]
                print(
                    f"{row['config']:<22} {row['scenario']:<11} {row['per_second']:8.0f}/s "
                    f"p50 {row['p50']:6.1f} ms  p99 {row['p99']:6.1f} ms  errors {row['errors']}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
