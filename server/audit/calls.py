"""Which calls the audit log records, decided once per call as it ends.

The interceptor calls `CallAuditor.finish` after every authenticated call.
For most calls (a user reading or writing its own tenant's resources) that
is a few attribute reads and no write. A call is recorded when:

- its handler called `note(action, ...)` (key and secret changes), with
  the call's final status code;
- an admin made an admin-only call that changes something (the RPC is
  declared ADMIN and not NO_SIDE_EFFECTS), or an operator's admin (tenant
  `default`) names another tenant or acts for one (reads included):
  `admin.call`. An admin's ordinary work in its own tenant (running
  executions, say) is not an admin action, and with authentication off
  (`--insecure-no-auth`) there is no one to record;
- anyone but the operator's admins named another tenant in a `tenant`
  field of the request (or of the resource in it): `access.cross_tenant`.
  Services act in the caller's own tenant whatever a request says, so this
  is an attempt the server refused; it is throttled like failures.

Every entry of the operator's admins is kept; a tenant admin's calls that
fail are throttled like a user's (a customer's loop of refused calls must
not fill the log, nor another tenant's view of it).

Reading the audit log itself is not recorded, even filtered by a tenant.

Authentication failures and PERMISSION_DENIED from the permission check
are recorded by the authenticator, which sees them first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message

from flowport.server.audit import actions
from flowport.server.audit.recorder import AuditRecorder, entry
from flowport.server.auth.context import CURRENT
from flowport.server.auth.origin import Origin
from flowport.server.auth.permissions import Access, access_for
from flowport.server.auth.principal import Principal
from flowport.server.errors import FlowportError
from flowport.server.types import Context

log = logging.getLogger(__name__)


@dataclass
class Note:
    """What a handler said about the call it is handling."""

    action: str
    resource: str = ""
    resource_tenant: str = ""


# Reading the audit log by tenant is not acting on that tenant: recording
# it would only fill the log with entries about reading the log.
_TENANT_AS_FILTER_ONLY = frozenset({"/flowport.v1.AuditService/ListAuditEvents"})

# Each RPC runs in its own task, so a note never leaks into another call.
_NOTE: ContextVar[Note | None] = ContextVar("flowport_audit_note", default=None)


def note(action: str, *, resource: str = "", resource_tenant: str = "") -> None:
    """Record the call being handled as `action` in the audit log.

    The entry is written when the call ends, with its status code and the
    caller's identity and address. Call it early (so a call that fails
    later is still recorded) and again once the resource's id is known;
    later calls replace the action and any non-empty field. Never pass
    secret values or credentials: `resource` is a name such as
    "secrets/db" or "api_keys/fpk_...". Outside an RPC it has no effect.
    """
    current = _NOTE.get()
    if current is None:
        _NOTE.set(Note(action, resource, resource_tenant))
        return
    current.action = action
    current.resource = resource or current.resource
    current.resource_tenant = resource_tenant or current.resource_tenant


_REFUSED_INPUT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})


@dataclass(frozen=True)
class _Rules:
    """What the auditor needs to know about one RPC."""

    mutating: bool
    admin_only: bool
    # Paths of the request's `tenant` fields: ("tenant",) or ("api_key", "tenant").
    tenant_paths: tuple[tuple[str, ...], ...]


def _tenant_paths(message: Any) -> tuple[tuple[str, ...], ...]:
    """Where in a request of type `message` (a Descriptor) tenants are named."""
    paths: list[tuple[str, ...]] = []
    for field in message.fields:
        if field.name == "tenant" and field.type == field.TYPE_STRING:
            paths.append(("tenant",))
        elif field.message_type is not None and not field.is_repeated:
            paths.extend((field.name, "tenant") for f in field.message_type.fields if f.name == "tenant")
    return tuple(paths)


def _admin_only(method: str) -> bool:
    return access_for(method) in (Access.ADMIN, Access.OPERATOR)


def _mutating(method: str) -> bool:
    try:
        found = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
    except KeyError:
        return True  # unknown: assume the worst
    level = found.GetOptions().idempotency_level
    return bool(level != descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS)


def _resource(*messages: object) -> str:
    """The resource, e.g. "sessions/ses_...": the first `*_id` field set in the request, else the response."""
    for message in messages:
        if not isinstance(message, Message):
            continue
        for field in message.DESCRIPTOR.fields:
            name = field.name
            if name.endswith("_id") and name != "request_id" and field.type == field.TYPE_STRING:
                value = getattr(message, name)
                if value:
                    return f"{name[:-3]}s/{value}"
    return ""


class CallAuditor:
    """Decides, at the end of each call, whether and what to record."""

    def __init__(self, recorder: AuditRecorder, origin: Callable[[Sequence[tuple[str, Any]], str], Origin]) -> None:
        self._recorder = recorder
        self._origin = origin
        self._rules: dict[str, _Rules] = {}

    def finish(
        self,
        method: str,
        context: Context,
        *,
        request: object,
        response: object,
        code: grpc.StatusCode,
        error: FlowportError | None,
    ) -> None:
        """Record the call if it is one the audit log keeps; never raises."""
        principal = CURRENT.get()
        if principal is None:
            return  # public, or refused before a principal existed (recorded then)
        try:
            self._finish(principal, method, context, request=request, response=response, code=code, error=error)
        except Exception:
            log.exception("audit: could not record a call to %s", method)

    def _finish(
        self,
        principal: Principal,
        method: str,
        context: Context,
        *,
        request: object,
        response: object,
        code: grpc.StatusCode,
        error: FlowportError | None,
    ) -> None:
        rules = self._rules_for(method, request)
        named = ""
        if rules.tenant_paths and isinstance(request, Message):
            named = _named_tenant(request, rules.tenant_paths, principal.tenant)
        noted = _NOTE.get()
        admin_action = (
            principal.is_admin
            and principal.method != "insecure"
            and bool(
                (named and principal.is_operator) or principal.acting_from or (rules.admin_only and rules.mutating)
            )
        )
        if noted is None and not named and not admin_action:
            return
        operator = principal.is_operator
        # Each entry of the operator's admins is kept. A tenant's admin is a customer: its refused
        # calls are capped per caller like a user's, or a loop of refusals naming another tenant
        # would fill that tenant's view of the log (and the log) at the request rate.
        capped = not principal.is_admin or (not operator and code is not grpc.StatusCode.OK)
        caller = f"{principal.tenant}/{principal.subject}"
        metadata: Any = context.invocation_metadata() or ()
        origin = self._origin(metadata, context.peer())
        reason = error.reason if error is not None else ""

        def make(action: str, resource: str, resource_tenant: str, why: str = reason) -> Any:
            return entry(
                action,
                code=code.name,
                reason=why,
                method=method,
                resource=resource,
                resource_tenant=resource_tenant,
                principal=principal,
                origin=origin,
            )

        if noted is not None:
            entry_ = make(noted.action, noted.resource, noted.resource_tenant or named)
            if code in _REFUSED_INPUT or capped:
                # A change refused for bad input changed nothing, and a caller can repeat it at
                # will; a user's own secret changes (a put in a loop) would add a row each to a
                # log no one may shorten: capped per caller like failures, the rest counted in
                # one aggregate entry a minute. An admin's changes are each recorded.
                self._recorder.append_limited(caller, entry_)
            else:
                self._recorder.append(entry_)
        elif admin_action:
            admin_entry = make(actions.ADMIN_CALL, _resource(request, response), named or principal.tenant)
            if capped:
                self._recorder.append_limited(caller, admin_entry)
            else:
                self._recorder.append(admin_entry)
        if named and not operator:
            why = f"the request named tenant {named!r}; the call acted in the caller's own tenant or failed"
            self._recorder.append_limited(caller, make(actions.ACCESS_CROSS_TENANT, "", named, why))

    def _rules_for(self, method: str, request: object) -> _Rules:
        rules = self._rules.get(method)
        if rules is None:
            if not isinstance(request, Message):
                return _Rules(_mutating(method), _admin_only(method), ())  # undecodable: decide again next time
            paths = () if method in _TENANT_AS_FILTER_ONLY else _tenant_paths(request.DESCRIPTOR)
            rules = self._rules[method] = _Rules(_mutating(method), _admin_only(method), paths)
        return rules


def _named_tenant(request: Message, paths: tuple[tuple[str, ...], ...], own: str) -> str:
    """The first tenant the request names other than `own`, or ""."""
    for path in paths:
        value: Any = request
        for part in path:
            value = getattr(value, part)
        if value and value != own:
            return str(value)
    return ""
