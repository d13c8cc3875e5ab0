"""Checking and compiling large workflows off the event loop.

Validating a workflow costs about 0.3 s of CPU per MiB of node configs
(compiling `PythonCodeNode` code is most of it), and a workflow may carry
4 MiB of them: on the event loop, one such call held every tenant's calls
for over a second, long enough for the health check to fail and Envoy to
take the server out. A tenant could do that with `POST
/api/workflows:validate` alone, which stores nothing. Workflows past
LARGE_BYTES are therefore checked, and compiled into plans, on one thread of
their own: the event loop runs between the GIL's switches (every 5 ms), a
tenant has one such check at a time, and the tenants' checks take the thread
in the order they came. Smaller workflows, nearly all of them, are checked
where they are, since the hand-off would cost more than the check.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from flowport.server.tenant_shares import TenantShares
from flowport.v1 import workflow_pb2

T = TypeVar("T")

# A workflow this large (serialized) is checked on the thread; smaller ones take well under 20 ms.
LARGE_BYTES = 64 * 2**10


def large(workflow: workflow_pb2.Workflow) -> bool:
    """Whether checking `workflow` goes to the thread."""
    return workflow.ByteSize() > LARGE_BYTES


class WorkflowChecks:
    """The thread that checks large workflows, and each tenant's turn on it."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowport-checks")
        self._turns = TenantShares(1)

    async def run(self, tenant: str, workflow: workflow_pb2.Workflow, check: Callable[[], T]) -> T:
        """`check()` (of `workflow`, for `tenant`): here when the workflow is small, else on the thread."""
        if not large(workflow):
            return check()
        async with self._turns.slot(tenant):
            return await asyncio.get_running_loop().run_in_executor(self._thread, check)

    def close(self) -> None:
        """Stop the thread once the check it is running ends (callers waiting are cancelled)."""
        self._thread.shutdown(wait=False, cancel_futures=True)
