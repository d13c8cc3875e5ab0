"""Caps on how fast failures can add rows to the audit log.

An attacker who sends bad credentials in a loop must not be able to fill
the disk through the audit log, yet the log must still say that it
happened. So, per window (a minute):

- each client (key) gets its first `per_key` entries recorded one by one;
- the clients of one tenant together (the unauthenticated ones count as one
  tenant) get at most a TENANT_PARTS-th of `total`, so one tenant failing in
  a loop leaves the rest of the log's room to the others;
- all clients together get at most `total` such entries;
- the rest are counted: one aggregate entry per client (with `count` and
  `first_time`) for those over their own cap, one per tenant and action for
  a tenant over its part, and one per action for everything over the total.

That bounds the rows a window can add to `total + total // per_key` plus
one per action for each of the at most TENANT_PARTS tenants that fill
their part, and one per action, however many clients take part. Aggregates are written
when their window has passed and the throttle is next used or flushed
(`ListAuditEvents` and shutdown flush it), so they lag by up to a window.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from flowport.server.clock import timestamp
from flowport.server.storage.tables import micros
from flowport.v1 import audit_pb2

TRACKED_KEYS = 10_000
# Each tenant's clients together get at most this fraction of the total.
TENANT_PARTS = 4


@dataclass
class _Window:
    """One key's (or the overflow's) share of the current window."""

    start: float
    recorded: int = 0
    suppressed: int = 0
    first: audit_pb2.AuditEvent | None = None
    last_us: int = 0
    actions: dict[str, _Window] = field(default_factory=dict)

    def count(self, event: audit_pb2.AuditEvent) -> None:
        if self.first is None:
            self.first = event
        self.suppressed += 1
        self.last_us = micros(event.time)

    def aggregate(self, note: str) -> audit_pb2.AuditEvent | None:
        """The entry that stands for the suppressed occurrences, if any."""
        if self.first is None:
            return None
        entry = audit_pb2.AuditEvent()
        entry.CopyFrom(self.first)
        entry.count = self.suppressed
        entry.first_time.CopyFrom(self.first.time)
        entry.time.CopyFrom(timestamp(self.last_us))
        entry.reason = f"{entry.reason}; {note}" if entry.reason else note
        return entry


class Throttle:
    """Admits entries per key up to the caps; `emit` receives the aggregates."""

    def __init__(
        self, *, per_key: int, total: int, window: float, emit: Callable[[audit_pb2.AuditEvent], None]
    ) -> None:
        self._per_key = per_key
        self._total = total
        # Rounded up: at most TENANT_PARTS tenants can fill their parts before the total is reached.
        self._tenant_part = max(per_key, -(-total // TENANT_PARTS))
        self._window = window
        self._emit = emit
        # In order of window start, so expired windows are at the front.
        self._keys: OrderedDict[str, _Window] = OrderedDict()
        self._overall = _Window(start=float("-inf"))
        # Each tenant's part of the overall window (the same window: cleared with it).
        self._tenants: dict[str, _Window] = {}

    def admit(self, key: str, event: audit_pb2.AuditEvent, now: float) -> bool:
        """True when `event` should be written now; otherwise it was counted."""
        self.flush(now)
        if now - self._overall.start >= self._window:
            self._overall = _Window(start=now)
        window = self._keys.get(key)
        if window is None:
            window = self._keys[key] = _Window(start=now)
            while len(self._keys) > TRACKED_KEYS:
                self._close(*self._keys.popitem(last=False))
        if window.recorded >= self._per_key:
            window.count(event)
            return False
        part = self._tenants.get(event.tenant)
        if part is None:
            part = self._tenants[event.tenant] = _Window(start=now)
        if part.recorded >= self._tenant_part:
            # Over the tenant's part: one aggregate per action of this tenant.
            part.actions.setdefault(event.action, _Window(start=now)).count(event)
            return False
        if self._overall.recorded >= self._total:
            # Over the total cap: one aggregate per action, whoever the clients are.
            self._overall.actions.setdefault(event.action, _Window(start=now)).count(event)
            return False
        window.recorded += 1
        part.recorded += 1
        self._overall.recorded += 1
        return True

    def flush(self, now: float, *, everything: bool = False) -> None:
        """Write the aggregates of windows that have passed (all, with `everything`)."""
        while self._keys:
            key, window = next(iter(self._keys.items()))
            if not everything and now - window.start < self._window:
                break
            del self._keys[key]
            self._close(key, window)
        if everything or now - self._overall.start >= self._window:
            for part in self._tenants.values():
                for overflow in part.actions.values():
                    entry = overflow.aggregate(
                        f"{overflow.suppressed} occurrences from this tenant's clients over its part of "
                        f"{self._tenant_part} entries per {self._window:g}s, counted rather than recorded"
                    )
                    if entry is not None:
                        entry.client_address = entry.proxy_address = ""
                        entry.subject = entry.credential_id = entry.resource = ""
                        self._emit(entry)
            self._tenants.clear()
            for overflow in self._overall.actions.values():
                entry = overflow.aggregate(
                    f"{overflow.suppressed} occurrences from any client over the audit log's limit of "
                    f"{self._total} entries per {self._window:g}s, counted rather than recorded"
                )
                if entry is not None:
                    entry.client_address = entry.proxy_address = ""
                    entry.tenant = entry.subject = entry.credential_id = entry.resource = ""
                    self._emit(entry)
            self._overall.actions.clear()

    def _close(self, key: str, window: _Window) -> None:
        entry = window.aggregate(
            f"{window.suppressed} repeats from this client over the limit of {self._per_key} entries "
            f"per {self._window:g}s, counted rather than recorded"
        )
        if entry is not None:
            self._emit(entry)
