"""This process's execution slots: which runs hold them, and how many each tenant holds.

At most `max_concurrent` executions run at once in a process, and one tenant
at most `tenant_share` of them. A slot is held by a run in progress, or for
an execution being admitted or claimed (so nothing else takes it meanwhile);
`freed` is set whenever one is given back, for whoever waits for room.
"""

from __future__ import annotations

import asyncio

from flowport.server.engine.run import Run


class Slots:
    """The slots of one executor: counts only, starting and walking runs is done elsewhere."""

    def __init__(self, max_concurrent: int, tenant_share: int | None) -> None:
        """`tenant_share`: executions one tenant may run at once here (None: up to `max_concurrent`)."""
        if tenant_share is not None and tenant_share < 1:
            raise ValueError("a tenant's share of the execution slots must be at least one")
        self.max = max_concurrent
        # None when one tenant may fill every slot anyway.
        self.tenant_max = tenant_share if tenant_share is not None and tenant_share < max_concurrent else None
        self.runs: dict[str, Run] = {}
        self.admitting = 0
        self.freed = asyncio.Event()
        # Per tenant: its runs in `runs` plus its executions being admitted (as len(runs) + admitting).
        self._tenant_slots: dict[str, int] = {}

    def held(self, tenant: str) -> int:
        """`tenant`'s executions in progress (or being admitted) in this process."""
        return self._tenant_slots.get(tenant, 0)

    def tenant_full(self, tenant: str) -> bool:
        return self.tenant_max is not None and self._tenant_slots.get(tenant, 0) >= self.tenant_max

    def hold(self, tenant: str, change: int) -> None:
        """Count (or, negative, uncount) slots `tenant` holds."""
        left = self._tenant_slots.get(tenant, 0) + change
        if left > 0:
            self._tenant_slots[tenant] = left
        else:
            self._tenant_slots.pop(tenant, None)

    def room(self) -> int:
        """Slots free in this process (runs and admissions hold one each)."""
        return self.max - len(self.runs) - self.admitting

    def reserve(self, tenant: str, change: int) -> None:
        """Hold (or, negative, free) slots for executions being claimed, so nothing else takes them meanwhile."""
        self.admitting += change
        self.hold(tenant, change)
        if change < 0:
            self.freed.set()

    def add(self, run: Run) -> None:
        """`run` is in progress here: it holds a slot, and one of its tenant's."""
        self.runs[run.execution.execution_id] = run
        self.hold(run.tenant, 1)

    def drop(self, run: Run) -> None:
        """No longer in progress here: its slot, and its tenant's, are free."""
        if self.runs.pop(run.execution.execution_id, None) is not None:
            self.hold(run.tenant, -1)
