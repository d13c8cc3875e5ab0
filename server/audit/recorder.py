"""Writes audit entries without slowing or failing the calls they describe.

Entries ride on the store's group commit (queued, committed with the next
batch of writes, never awaited by the call); a failed write is logged, not
raised. Failures an outsider can cause at will (bad credentials, refused
calls) go through a Throttle, so they cannot fill the disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flowport.server.audit.throttle import Throttle
from flowport.server.auth.origin import Origin
from flowport.server.auth.principal import Principal
from flowport.server.clock import now_us, timestamp
from flowport.server.ids import new_id
from flowport.server.storage.audit import AuditTables
from flowport.v1 import audit_pb2

log = logging.getLogger(__name__)

Kind = audit_pb2.AuditEvent.CredentialKind
# Each client may add this many entries of one action per window; all
# clients together TOTAL; the rest are counted into aggregate entries.
PER_CLIENT = 10
TOTAL = 100
WINDOW = 60.0
_KINDS = {"api_key": Kind.CREDENTIAL_KIND_API_KEY, "jwt": Kind.CREDENTIAL_KIND_JWT}


def entry(
    action: str,
    *,
    code: str = "OK",
    reason: str = "",
    method: str = "",
    resource: str = "",
    resource_tenant: str = "",
    principal: Principal | None = None,
    origin: Origin | None = None,
) -> audit_pb2.AuditEvent:
    """A new entry for `action`, stamped now, with the caller's identity and address."""
    event = audit_pb2.AuditEvent(
        action=action,
        code=code,
        reason=reason,
        method=method,
        resource=resource,
        resource_tenant=resource_tenant,
        count=1,
    )
    event.time.CopyFrom(timestamp(now_us()))
    if principal is not None:
        event.tenant = principal.home_tenant
        event.subject = principal.subject
        event.credential_id = principal.credential_id
        event.credential_kind = _KINDS.get(principal.method, Kind.CREDENTIAL_KIND_INSECURE)
    if origin is not None:
        event.client_address = origin.client
        event.proxy_address = origin.proxy
    return event


class AuditRecorder:
    """The one way entries reach the audit log."""

    def __init__(
        self,
        store: AuditTables,
        *,
        per_client: int = PER_CLIENT,
        total: int = TOTAL,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._clock = clock
        self._throttle = Throttle(per_key=per_client, total=total, window=window, emit=self.append)

    def append(self, event: audit_pb2.AuditEvent) -> None:
        """Queue `event` for the log; never raises, never waits."""
        try:
            event.audit_event_id = new_id("aud")
            self._store.append_audit_soon(event)
        except Exception:
            # The call goes on; losing an entry is logged loudly instead.
            log.exception("audit: could not queue a %s entry", event.action)

    def append_limited(self, client: str, event: audit_pb2.AuditEvent) -> None:
        """Queue `event` unless `client` (or everyone) is over the cap this
        minute, in which case it is counted into an aggregate entry."""
        try:
            admitted = self._throttle.admit(f"{event.action}|{client}", event, self._clock())
        except Exception:
            log.exception("audit: could not throttle a %s entry", event.action)
            return
        if admitted:
            self.append(event)

    def record(self, action: str, *, code: str = "OK", reason: str = "", resource: str = "", tenant: str = "") -> None:
        """Record something the server did on its own, outside any call
        (start-up, maintenance such as `flowport secrets rotate-key`)."""
        event = entry(action, code=code, reason=reason, resource=resource, resource_tenant=tenant)
        event.credential_kind = Kind.CREDENTIAL_KIND_SYSTEM
        self.append(event)

    def flush(self) -> None:
        """Write the aggregates of windows that have passed."""
        self._throttle.flush(self._clock())

    def close(self) -> None:
        """Write every pending aggregate (at shutdown, before the store closes)."""
        self._throttle.flush(self._clock(), everything=True)
