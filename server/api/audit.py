"""AuditService: admins read the audit log (the permission table makes it admin-only)."""

from __future__ import annotations

from dataclasses import replace

import grpc

from flowport.server import pagination
from flowport.server.api.api_keys import TENANT
from flowport.server.api.common import other_tenant_refused
from flowport.server.audit import AuditRecorder, actions, note
from flowport.server.errors import InvalidArgument
from flowport.server.storage.audit import AuditQuery, AuditTables
from flowport.server.storage.tables import micros
from flowport.server.tenancy import administered_tenant
from flowport.server.types import Context
from flowport.v1 import audit_pb2, audit_pb2_grpc

CODES = frozenset(code.name for code in grpc.StatusCode)
MAX_SUBJECT = 256


def _query(request: audit_pb2.ListAuditEventsRequest) -> AuditQuery:
    """The request's filters, checked; INVALID_ARGUMENT names every bad field."""
    violations: list[tuple[str, str]] = []
    if request.tenant and not TENANT.match(request.tenant):
        violations.append(("tenant", "1 to 63 characters: a-z, 0-9, '_' and '-', starting with a letter or digit"))
    if request.action and not actions.is_known(request.action):
        families = ", ".join(f"{f}.*" for f in sorted(actions.FAMILIES))
        violations.append(("action", f"unknown action; known: {', '.join(sorted(actions.ALL))}, or {families}"))
    if len(request.subject) > MAX_SUBJECT:
        violations.append(("subject", f"at most {MAX_SUBJECT} characters"))
    if request.code and request.code not in CODES:
        violations.append(("code", "a gRPC status code name such as OK or PERMISSION_DENIED"))
    start = micros(request.start_time) if request.HasField("start_time") else None
    end = micros(request.end_time) if request.HasField("end_time") else None
    if start is not None and end is not None and end <= start:
        violations.append(("end_time", "must be after start_time"))
    if violations:
        raise InvalidArgument(
            "audit filter is not valid: " + "; ".join(f"{f} {d}" for f, d in violations), violations=violations
        )
    # A family "api_key.*" is stored as its prefix "api_key.".
    action = request.action[:-1] if request.action.endswith(".*") else request.action
    return AuditQuery(request.tenant, action, request.subject, request.code, start, end)


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    """The audit log, read-only: nothing here (or anywhere) changes an entry."""

    def __init__(self, store: AuditTables, recorder: AuditRecorder) -> None:
        self._store = store
        self._recorder = recorder

    async def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest, context: Context
    ) -> audit_pb2.ListAuditEventsResponse:
        size = pagination.page_size(request.page_size)
        query = _query(request)
        own = administered_tenant()
        if own is not None:
            # An admin of a tenant reads the entries of its tenant: its callers', and those
            # about its resources (cross-tenant attempts on them included).
            if query.tenant not in ("", own):
                note(actions.ACCESS_DENIED, resource_tenant=query.tenant)
                raise other_tenant_refused("reads the audit log", query.tenant)
            query = replace(query, tenant=own, subject_tenant=own)
        filters = {
            "tenant": query.tenant,
            "action": query.action,
            "subject": query.subject,
            "code": query.code,
            "start": query.start_us,
            "end": query.end_us,
        }
        after = pagination.cursor_time_id(pagination.decode_token(request.page_token, filters))
        # Aggregates of finished throttle windows become visible now, not
        # only when the next failure arrives.
        self._recorder.flush()
        rows = await self._store.list_audit_events(query, after=after, limit=size + 1)
        events, token = pagination.page(rows, size, filters, lambda e: [micros(e.time), e.audit_event_id])
        if own is not None:
            for event in events:
                if event.tenant != own:
                    # Another tenant's caller, on this tenant's resources: what it did is this
                    # tenant's to know, who it is (its tenant, key, address) is not.
                    for name in ("tenant", "subject", "credential_id", "client_address", "proxy_address"):
                        setattr(event, name, "")
                    event.credential_kind = audit_pb2.AuditEvent.CREDENTIAL_KIND_UNSPECIFIED
        return audit_pb2.ListAuditEventsResponse(audit_events=events, next_page_token=token)
