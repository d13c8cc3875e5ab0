"""Engine hot paths in-process: compiling a plan, and one execution of the
trivial workflow (one PythonCodeNode returning a small dict from `n`) with
the real sandbox pool and SQLite store."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from google.protobuf import json_format, struct_pb2
from pytest_benchmark.fixture import BenchmarkFixture

from flowport.server.engine.executor import Executor
from flowport.server.engine.plan import PlanCache, compile_plan
from flowport.server.engine.registry import NodeRegistry
from flowport.server.events.bus import EventBus
from flowport.server.nodes.base import NodeServices
from flowport.server.sandbox import SandboxPool
from flowport.server.storage import SqliteStore
from flowport.v1 import execution_pb2, workflow_pb2

TRIVIAL = {
    "name": "trivial",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'n': n + 1}"}}],
}
PIPELINE = {
    "name": "pipeline",
    "nodes": [
        {"type": "HTTPRequestNode", "name": "fetch", "config": {"url": "https://api.example.com/data"}},
        *(
            {"type": "PythonCodeNode", "name": f"step{i}", "config": {"code": f"result = {{'i': {i}}}"}}
            for i in range(8)
        ),
        {"type": "MergeNode", "name": "merge"},
    ],
    "connections": [
        *(
            {"from_node": "fetch", "from_output": "response", "to_node": f"step{i}", "to_input": "data"}
            for i in range(8)
        ),
        *(
            {"from_node": f"step{i}", "from_output": "result", "to_node": "merge", "to_input": f"data{i + 1}"}
            for i in range(5)
        ),
    ],
}


def _workflow(data: dict[str, object]) -> workflow_pb2.Workflow:
    message = json_format.ParseDict(data, workflow_pb2.Workflow())
    message.workflow_id = message.name
    message.version = 1
    return message


def test_compile_plan_ten_nodes(benchmark: BenchmarkFixture) -> None:
    registry = NodeRegistry.default()
    workflow = _workflow(PIPELINE)
    plan = benchmark(compile_plan, workflow, registry)
    assert len(plan.order) == 10


def test_execute_trivial_workflow(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    async def setup() -> tuple[Executor, SqliteStore, SandboxPool]:
        store = await SqliteStore.open(tmp_path / "db.sqlite")
        pool = SandboxPool(size=1)
        await pool.start()
        executor = Executor(
            store, PlanCache(NodeRegistry.default()), EventBus(), NodeServices(sandbox=pool), max_concurrent=64
        )
        return executor, store, pool

    executor, store, pool = loop.run_until_complete(setup())
    workflow = _workflow(TRIVIAL)
    counter = itertools.count()

    async def one() -> execution_pb2.Execution:
        inputs = struct_pb2.Struct()
        inputs.update({"n": next(counter)})
        execution, _ = await executor.create("t", workflow, inputs, session_id="", request_id="", request_hash=None)
        done = await executor.wait("t", execution.execution_id, 30)
        assert done is not None
        return done

    done = benchmark(lambda: loop.run_until_complete(one()))
    assert done.state == execution_pb2.Execution.STATE_SUCCEEDED

    async def teardown() -> None:
        await pool.close()
        await store.close()

    loop.run_until_complete(teardown())
