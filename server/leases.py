"""A process's claims on shared work: unfinished executions and webhook deliveries.

Each piece of work is leased to the process doing it (`owner`) until a time
it renews every third of the lease; another process sharing the database
takes over work whose lease ran out (its owner died). One owner id per
process, for executions and deliveries alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from flowport.server.clock import now_us
from flowport.server.periodic import Failures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leases:
    """This process's identity as a lease holder, and how long a lease lasts unrenewed."""

    seconds: float = 30.0
    owner: str = field(default_factory=lambda: os.urandom(8).hex())

    def until(self) -> int:
        """When a lease taken or renewed now ends, in microseconds since the epoch."""
        return now_us() + int(self.seconds * 1_000_000)

    async def keep(self, renew_and_claim: Callable[[], Awaitable[int]], what: str) -> None:
        """Forever, every third of a lease: renew this process's leases and take over expired ones.

        `renew_and_claim` returns how many pieces of `what` it took over.
        """
        failures = Failures(log, f"renewing the leases of {what}")  # an outage: said once, then a minute apart
        try:
            while True:
                await asyncio.sleep(self.seconds / 3)
                try:
                    taken = await renew_and_claim()
                except Exception as exc:  # noqa: BLE001 - said by `failures`; renewing goes on
                    failures.failed(exc)
                    continue
                failures.worked()
                if taken:
                    log.info("took over %d %s of a stopped process", taken, what)
        finally:
            failures.close()
