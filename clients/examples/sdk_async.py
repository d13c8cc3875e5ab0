"""The asyncio SDK: several executions at once, then watch one node by node.

FLOWPORT_API_KEY=$(cat .flowport/admin-api-key) python -m flowport.clients.examples.sdk_async
"""

from __future__ import annotations

import asyncio
import os
import sys

from google.protobuf import json_format

from flowport.clients import AsyncClient
from flowport.v1 import execution_pb2

SQUARE = {
    "name": "square",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = n * n"}}],
}


async def main() -> int:
    target = os.environ.get("FLOWPORT_TARGET", "127.0.0.1:8080")
    async with AsyncClient(target, api_key=os.environ.get("FLOWPORT_API_KEY"), timeout=30) as fp:
        first = await fp.run_workflow(SQUARE, {"n": 2})
        runs = await asyncio.gather(*(fp.run_workflow(first.workflow_id, {"n": n}) for n in range(3, 8)))
        print([json_format.MessageToDict(run.outputs)["calc"]["result"] for run in [first, *runs]])

        started = await fp.run_workflow(first.workflow_id, {"n": 9}, wait=False)
        async for update in fp.watch(started.execution_id):  # the state first, then events, until it ends
            if update.HasField("execution"):
                print("state:", execution_pb2.Execution.State.Name(update.execution.state))
            else:
                print("event:", update.event.type)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
