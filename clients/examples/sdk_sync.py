"""The blocking SDK: run a workflow from its config, page through executions, follow events.

    FLOWPORT_API_KEY=$(cat .flowport/admin-api-key) python -m flowport.clients.examples.sdk_sync

FLOWPORT_TARGET picks the address (default 127.0.0.1:8080, Envoy of `flowport up`).
"""

from __future__ import annotations

import os
import sys

from flowport.clients import ApiError, Client, plain
from flowport.v1 import event_pb2, execution_pb2

# A Kailash-style config: nodes by name, inputs by node or by name.
DOUBLER = {
    "name": "doubler",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'twice': n * 2}"}}],
}


def main() -> int:
    target = os.environ.get("FLOWPORT_TARGET", "127.0.0.1:8080")
    with Client(target, api_key=os.environ.get("FLOWPORT_API_KEY"), timeout=30) as fp:
        done = fp.run_workflow(DOUBLER, {"n": 21})  # creates the workflow, runs it, waits
        outputs = plain(done.outputs)  # a Struct, as dicts with whole numbers as ints
        print(done.execution_id, execution_pb2.Execution.State.Name(done.state), outputs["calc"]["result"])

        request = execution_pb2.ListExecutionsRequest(workflow_id="doubler", page_size=10)
        print("doubler has run", sum(1 for _ in fp.paginate(fp.executions.ListExecutions, request)), "times")

        try:
            fp.run_workflow("no_such_workflow", {})
        except ApiError as error:  # the code, the reason and the message, decoded
            print("refused:", error.code().name, error.reason, error.details())

        # Events resume after a dropped connection; stop after the next completed run.
        started = fp.run_workflow("doubler", {"n": 1}, wait=False)
        for event in fp.events(event_pb2.StreamEventsRequest(execution_id=started.execution_id, after_id="0")):
            print(event.type)
            if event.type == "execution.completed":
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
