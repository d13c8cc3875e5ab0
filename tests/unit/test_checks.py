"""Large workflows are checked and compiled off the event loop, and the plan cache is bounded in bytes."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from flowport.clients import AsyncClient
from flowport.server.app import start, stop
from flowport.server.engine import checks
from flowport.server.engine.plan import PlanCache
from flowport.server.engine.registry import NodeRegistry
from flowport.v1 import gateway_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings


def _workflow(workflow_id: str, nodes: int, code_lines: int) -> workflow_pb2.Workflow:
    workflow = workflow_pb2.Workflow(workflow_id=workflow_id, name=workflow_id, version=1)
    code = "y = x\n" * code_lines
    json_format.ParseDict(
        {"nodes": [{"name": f"n{i}", "type": "PythonCodeNode", "config": {"code": code}} for i in range(nodes)]},
        workflow,
    )
    return workflow


async def test_a_large_validation_leaves_the_event_loop_to_other_calls(tmp_path: Path) -> None:
    """Checking 4 MiB of code takes about a second of CPU: other calls are answered meanwhile."""
    heavy = _workflow("heavy", 500, 1300)
    assert heavy.ByteSize() > 3 * 2**20 and checks.large(heavy)
    running = await start(make_settings(tmp_path))
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as client:
            validating = asyncio.ensure_future(
                client.workflows.ValidateWorkflow(workflow_pb2.ValidateWorkflowRequest(workflow=heavy))
            )
            # Once the check holds the thread, small calls still go through, one after the other.
            for _ in range(200):
                if any(t.name.startswith("flowport-checks") for t in threading.enumerate()):
                    break
                await asyncio.sleep(0.005)
            answered = 0
            while not validating.done() and answered < 5:
                await client.gateway.GetInfo(gateway_pb2.GetInfoRequest())
                answered += 1
            assert answered == 5 and not validating.done(), "the loop waited for the check"
            assert (await validating).valid
    finally:
        await stop(running, 1.0)


async def test_large_plans_are_compiled_on_the_thread_and_small_ones_here() -> None:
    seen: list[str] = []
    cache = PlanCache(NodeRegistry.default())
    real = cache.checks.run

    async def watched(tenant: str, workflow: workflow_pb2.Workflow, check: Any) -> Any:
        def noted() -> Any:
            seen.append(threading.current_thread().name)
            return check()

        return await real(tenant, workflow, noted)

    cache.checks.run = watched  # type: ignore[method-assign]
    try:
        await cache.get("t", _workflow("small", 1, 1))
        await cache.get("t", _workflow("large", 20, 1000))
    finally:
        cache.checks.close()
    assert seen[0] == threading.current_thread().name
    assert seen[1].startswith("flowport-checks")


async def test_the_plan_cache_keeps_at_most_its_bytes_of_workflows() -> None:
    one = _workflow("w0", 4, 500)
    cache = PlanCache(NodeRegistry.default(), max_bytes=3 * one.ByteSize())
    try:
        for n in range(6):
            await cache.get("t", _workflow(f"w{n}", 4, 500))
        kept = cache._plans
        assert [key[1] for key in kept] == ["w3", "w4", "w5"], "the least recently used went first"
        assert cache._bytes == sum(size for _, size in kept.values()) <= 3 * one.ByteSize()
        # One workflow larger than the whole budget is still kept, alone.
        await cache.get("t", _workflow("huge", 20, 500))
        assert [key[1] for key in cache._plans] == ["huge"]
    finally:
        cache.checks.close()


async def test_a_plan_asked_for_while_it_compiles_is_compiled_once() -> None:
    cache = PlanCache(NodeRegistry.default())
    compiled: list[str] = []
    real = cache.checks.run

    async def counted(tenant: str, workflow: workflow_pb2.Workflow, check: Any) -> Any:
        compiled.append(workflow.workflow_id)
        return await real(tenant, workflow, check)

    cache.checks.run = counted  # type: ignore[method-assign]
    try:
        large = _workflow("large", 20, 1000)
        plans = await asyncio.gather(*(cache.get("t", large) for _ in range(5)))
    finally:
        cache.checks.close()
    assert compiled == ["large"] and all(plan is plans[0] for plan in plans)
