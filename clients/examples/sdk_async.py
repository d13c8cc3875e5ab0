"""The asyncio SDK: several executions at once, then watch a slower one node by node.

FLOWPORT_API_KEY=$(cat .flowport/admin-api-key) python -m flowport.clients.examples.sdk_async
FLOWPORT_TARGET picks the address (default 127.0.0.1:8080, Envoy of `flowport up`).
"""

from __future__ import annotations

import asyncio
import os
import sys

from flowport.clients import AsyncClient, plain
from flowport.v1 import execution_pb2

SQUARE = {
    "name": "square",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = n * n"}}],
}
# Two steps of half a second: slow enough to watch each node start and finish.
SLOW = {
    "name": "square_slowly",
    "nodes": [
        {"type": "PythonCodeNode", "name": "wait", "config": {"code": "import time\ntime.sleep(0.5)\nresult = n"}},
        {"type": "PythonCodeNode", "name": "calc", "config": {"code": "import time\ntime.sleep(0.5)\nresult = x * x"}},
    ],
    "connections": [{"from_node": "wait", "from_output": "result", "to_node": "calc", "to_input": "x"}],
}


async def main() -> int:
    target = os.environ.get("FLOWPORT_TARGET", "127.0.0.1:8080")
    async with AsyncClient(target, api_key=os.environ.get("FLOWPORT_API_KEY"), timeout=30) as fp:
        first = await fp.run_workflow(SQUARE, {"n": 2})
        runs = await asyncio.gather(*(fp.run_workflow(first.workflow_id, {"n": n}) for n in range(3, 8)))
        print([plain(run.outputs)["calc"]["result"] for run in [first, *runs]])

        started = await fp.run_workflow(SLOW, {"n": 9}, wait=False)
        async for update in fp.watch(started.execution_id):  # the state first, then events, until it ends
            if update.HasField("execution"):
                print("state:", execution_pb2.Execution.State.Name(update.execution.state))
            else:
                print("event:", update.event.type)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
