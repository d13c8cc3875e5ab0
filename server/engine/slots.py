"""This process's execution slots: which runs hold them, and how many each tenant holds.

At most `max_concurrent` executions run at once in a process, and one tenant
at most `tenant_share` of them. A slot is held by a run in progress, or for
an execution being admitted or claimed (so nothing else takes it meanwhile);
`freed` is set whenever one is given back, for whoever waits for room.

The runs' node outputs stay in this process's memory until each run ends
(a later node may read them), so they are counted per tenant too: the bytes
of a tenant's runs here, as serialized (`Run.output_bytes`). Within its
`tenant_max_output_bytes`, a tenant's many runs of large outputs cannot take
the memory every tenant's executions share.
"""

from __future__ import annotations

import asyncio

from flowport.server.engine.run import Run


class Slots:
    """The slots of one executor: counts only, starting and walking runs is done elsewhere."""

    def __init__(
        self, max_concurrent: int, tenant_share: int | None, tenant_max_output_bytes: int | None = None
    ) -> None:
        """`tenant_share`: executions one tenant may run at once here (None: up to `max_concurrent`);
        `tenant_max_output_bytes`: bytes of outputs one tenant's runs may hold here (None: no cap)."""
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
        self.tenant_max_output_bytes = tenant_max_output_bytes
        # Per tenant: the output_bytes of its runs in `runs`.
        self._tenant_output_bytes: dict[str, int] = {}

    def held(self, tenant: str) -> int:
        """`tenant`'s executions in progress (or being admitted) in this process."""
        return self._tenant_slots.get(tenant, 0)

    def tenant_full(self, tenant: str) -> bool:
        return self.tenant_max is not None and self._tenant_slots.get(tenant, 0) >= self.tenant_max

    def hold(self, tenant: str, change: int) -> None:
        """Count (or, negative, uncount) slots `tenant` holds."""
        _adjust(self._tenant_slots, tenant, change)

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
        self._count_outputs(run.tenant, run.output_bytes)

    def drop(self, run: Run) -> None:
        """No longer in progress here: its slot, and its tenant's, are free."""
        if self.runs.pop(run.execution.execution_id, None) is not None:
            self.hold(run.tenant, -1)
            self._count_outputs(run.tenant, -run.output_bytes)

    def output_bytes(self, tenant: str) -> int:
        """The bytes of `tenant`'s runs here (their outputs and inputs, serialized)."""
        return self._tenant_output_bytes.get(tenant, 0)

    def outputs_fit(self, tenant: str, size: int) -> bool:
        """Whether `tenant`'s runs here may hold `size` more bytes of outputs."""
        cap = self.tenant_max_output_bytes
        return cap is None or self.output_bytes(tenant) + size <= cap

    def outputs_added(self, run: Run, size: int) -> None:
        """`run` (in progress here) now holds `size` more bytes of outputs."""
        if run.execution.execution_id in self.runs:
            self._count_outputs(run.tenant, size)

    def _count_outputs(self, tenant: str, change: int) -> None:
        _adjust(self._tenant_output_bytes, tenant, change)


def _adjust(counts: dict[str, int], tenant: str, change: int) -> None:
    """Add `change` to `tenant`'s count, which goes once it is down to nothing."""
    left = counts.get(tenant, 0) + change
    if left > 0:
        counts[tenant] = left
    else:
        counts.pop(tenant, None)
