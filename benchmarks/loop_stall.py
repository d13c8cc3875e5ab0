"""How long one tenant's large values hold up the server's other calls.

Starts `flowport serve` on free loopback ports (as cpu_per_execution does),
then probes it with a small call (GetInfo) every 10 ms from a second
connection while it runs a few executions of large values over direct
gRPC, and reports the probe's worst latency while idle and while those run.
The server runs calls on one event loop, so the worst probe is about the
longest time the loop spent on the large values without running anything
else.

    python -m benchmarks.loop_stall --case inputs    # 4 MiB of `[[],[],…]` as inputs
    python -m benchmarks.loop_stall --case outputs   # a node returning 1.38 M empty lists

Each execution's answer is checked: an input of a million lists is
refused by the trivial workflow's node (a list plus one) and the output
one succeeds, with its lists counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time

import grpc
from google.protobuf import json_format, struct_pb2

from benchmarks.cpu_per_execution import ADMIN_KEY, TRIVIAL, running_server, server_settings
from flowport.v1 import (
    execution_pb2,
    execution_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

_MEBI = 2**20
_METADATA = (("x-api-key", ADMIN_KEY),)
# A node returning `n` empty lists (about 5.5 MB as a Struct for 1.38 M: within a node's 8 MiB).
_LISTS = {
    "name": "lists",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'x': [[] for _ in range(n)]}"}}],
}


class _Probe:
    """GetInfo every 10 ms; `worst` is the slowest since the last `reset`."""

    def __init__(self, gateway: gateway_pb2_grpc.GatewayServiceStub) -> None:
        self._gateway = gateway
        self.worst = 0.0
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            start = time.perf_counter()
            await self._gateway.GetInfo(gateway_pb2.GetInfoRequest(), metadata=_METADATA)
            self.worst = max(self.worst, time.perf_counter() - start)
            await asyncio.sleep(0.01)

    def reset(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _until_ready(gateway: gateway_pb2_grpc.GatewayServiceStub) -> None:
    for _ in range(100):  # up to 10 s to start
        try:
            await gateway.GetInfo(gateway_pb2.GetInfoRequest(), metadata=_METADATA, timeout=1)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    raise RuntimeError("the server did not start")


def _check(case: str, done: execution_pb2.Execution, size: int) -> None:
    if case == "inputs":
        assert done.state == execution_pb2.Execution.STATE_FAILED, done.state
        return
    assert done.state == execution_pb2.Execution.STATE_SUCCEEDED, done.error.message
    lists = done.outputs.fields["calc"].struct_value.fields["result"].struct_value.fields["x"].list_value.values
    assert len(lists) == size, len(lists)


async def _measure(target: str, case: str, count: int, size: int) -> tuple[float, float, float, int]:
    """(worst probe idle, worst probe during, seconds the executions took, request bytes)."""
    options = [("grpc.max_send_message_length", 64 * _MEBI), ("grpc.max_receive_message_length", 64 * _MEBI)]
    async with (
        grpc.aio.insecure_channel(target, options=options) as channel,
        grpc.aio.insecure_channel(target) as probe_channel,
    ):
        gateway = gateway_pb2_grpc.GatewayServiceStub(probe_channel)
        await _until_ready(gateway)
        workflow = json_format.ParseDict(TRIVIAL if case == "inputs" else _LISTS, workflow_pb2.Workflow())
        created = await workflow_pb2_grpc.WorkflowServiceStub(channel).CreateWorkflow(
            workflow_pb2.CreateWorkflowRequest(workflow=workflow), metadata=_METADATA
        )
        inputs = struct_pb2.Struct()
        inputs.update({"n": [[] for _ in range(size)] if case == "inputs" else size})
        request = execution_pb2.CreateExecutionRequest(workflow_id=created.workflow_id, inputs=inputs, wait=True)
        executions = execution_pb2_grpc.ExecutionServiceStub(channel)
        probe = _Probe(gateway)
        try:
            await asyncio.sleep(1.0)
            idle = probe.reset()
            started = time.perf_counter()
            for _ in range(count):
                _check(case, await executions.CreateExecution(request, metadata=_METADATA, timeout=120), size)
            spent = time.perf_counter() - started
            await asyncio.sleep(0.5)
            return idle, probe.reset(), spent, inputs.ByteSize()
        finally:
            await probe.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["inputs", "outputs"], default="inputs")
    parser.add_argument("--count", type=int, default=3, help="executions of large values, one after another")
    parser.add_argument(
        "--size", type=int, default=None, help="lists in the inputs (default 1,000,000) or outputs (1,380,000)"
    )
    args = parser.parse_args()
    size = args.size or (1_000_000 if args.case == "inputs" else 1_380_000)
    with tempfile.TemporaryDirectory() as data:
        settings = server_settings(data)
        with running_server(settings, "error"):
            idle, during, spent, sent = asyncio.run(_measure(settings.grpc_target, args.case, args.count, size))
    print(f"case: {args.case}  lists: {size}  request bytes: {sent}  executions: {args.count} in {spent:.2f} s")
    print(f"worst probe idle:   {idle * 1000:.1f} ms")
    print(f"worst probe during: {during * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
