"""Authentication and the permission check, for every call, in one place.

Runs in the server interceptor before the handler, so before any
idempotency or cache lookup: an unauthenticated caller can never be
answered from another caller's records. A failure is always the same
UNAUTHENTICATED answer (but for a call with two credentials, which is told
so: that says nothing about either); why it failed goes to the log only. Repeated
failures from one client are answered more and more slowly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from flowport.server.audit import actions
from flowport.server.audit.recorder import AuditRecorder, Kind, entry
from flowport.server.auth.keys import KeyAuthenticator
from flowport.server.auth.lifetime import Ended, Watched
from flowport.server.auth.origin import Origin, TrustedProxies, origin_of
from flowport.server.auth.permissions import Access, access_for, allowed
from flowport.server.auth.principal import (
    ACT_AS_HEADER,
    ADMIN,
    NEEDS_OPERATOR,
    OPERATOR_TENANT,
    TENANT_NAME,
    USER,
    AuthenticationFailed,
    Principal,
    operator_metadata,
)
from flowport.server.errors import InvalidArgument, PermissionDenied, Unauthenticated
from flowport.v1 import audit_pb2

log = logging.getLogger(__name__)

INSECURE = Principal(OPERATOR_TENANT, "anonymous", frozenset({ADMIN, USER}), "insecure")
FAILURE_WINDOW = 60.0
MAX_DELAY = 5.0
TRACKED_CLIENTS = 10_000
UNAUTHENTICATED_MESSAGE = "authentication required: send a valid x-api-key or authorization: Bearer token"
# Two credentials say nothing about either's validity, so this answer may differ from the bare one.
MULTIPLE_CREDENTIALS = "more than one credential"
MULTIPLE_CREDENTIALS_MESSAGE = (
    "a call carries one credential, this one had more: send one x-api-key, authorization: Bearer,"
    " ?access_token= or flowport_token cookie, not two"
)

# How grpc's message starts when it reads metadata that is not UTF-8 (it then reads it as Latin-1).
_UNDECODED_METADATA = "Invalid encoding on "


class _QuietUndecodedMetadata(logging.Filter):
    """Drops grpc's ERROR, with a traceback, for each read of a metadata value that is not
    UTF-8: a client's bad header is no server error, and the record quotes the value (a
    credential's). The call goes on and is answered as usual: a bad credential is a 401 with
    the authenticator's own one line and its audit entry."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_UNDECODED_METADATA))


_QUIET = _QuietUndecodedMetadata()


def quiet_undecoded_metadata() -> None:
    """Install the filter on grpc's Cython logger (once; adding it again changes nothing)."""
    logging.getLogger("grpc._cython.cygrpc").addFilter(_QUIET)


class _Failures:
    """Recent authentication failures per client, bounded in memory."""

    def __init__(self, allowed_failures: int) -> None:
        self._allowed = allowed_failures
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def record(self, client: str) -> float:
        """Count a failure; return how long to stall the answer."""
        now = time.monotonic()
        times = [t for t in self._seen.pop(client, []) if now - t < FAILURE_WINDOW]
        times.append(now)
        self._seen[client] = times
        while len(self._seen) > TRACKED_CLIENTS:
            self._seen.popitem(last=False)
        excess = len(times) - self._allowed
        return 0.0 if excess <= 0 else min(MAX_DELAY, 0.25 * 2 ** min(excess, 8))


class Authenticator:
    """Turns a call's metadata into a Principal, or refuses the call."""

    def __init__(
        self,
        keys: KeyAuthenticator,
        jwt: Any | None,
        *,
        insecure: bool,
        max_failures: int,
        trusted_proxies: TrustedProxies,
        audit: AuditRecorder | None = None,
    ) -> None:
        self._keys = keys
        self._jwt = jwt
        self._insecure = insecure
        self._failures = _Failures(max_failures)
        self._trusted_proxies = trusted_proxies
        self._audit = audit
        self.failed = 0
        quiet_undecoded_metadata()

    @property
    def insecure(self) -> bool:
        """Whether authentication is off (every caller is the insecure admin)."""
        return self._insecure

    def watch(self, principal: Principal, ended: Ended) -> Watched | None:
        """Call `ended` when `principal`'s credential is revoked or expires (for open streams)."""
        return self._keys.streams.watch(principal, ended)

    def origin_of(self, metadata: Sequence[tuple[str, Any]], peer: str) -> Origin:
        """The caller's address (Envoy's X-Forwarded-For when the peer is a trusted proxy)."""
        return origin_of(metadata, peer, self._trusted_proxies)

    def client_of(self, metadata: Sequence[tuple[str, Any]], peer: str) -> str:
        """The caller's address alone."""
        return self.origin_of(metadata, peer).client

    async def authenticate(self, method: str, metadata: Sequence[tuple[str, Any]], peer: str) -> Principal | None:
        """The principal for this call (None for public calls); raises FlowportError."""
        access = access_for(method)
        if access is None:
            # Fail closed: an RPC nobody declared access for is nobody's to call.
            self._denied(method, metadata, peer, None, "NO_PERMISSION_DECLARED")
            raise PermissionDenied(f"{method} is not open to callers", reason="NO_PERMISSION_DECLARED")
        if access is Access.PUBLIC:
            return None
        principal = INSECURE if self._insecure else await self._verify(method, metadata, peer)
        if not allowed(principal, access):
            if access is Access.OPERATOR:
                needs, metadata_ = NEEDS_OPERATOR, operator_metadata()
            else:
                needs, metadata_ = f"the {access.value} role", {"role": access.value}
            self._denied(method, metadata, peer, principal, f"needs {needs}")
            raise PermissionDenied(f"{method} needs {needs}", reason="ROLE_REQUIRED", metadata=metadata_)
        acting_for = next((v for k, v in metadata if k == ACT_AS_HEADER and isinstance(v, str)), "")
        if acting_for and acting_for != principal.tenant:
            return self._act_as(method, metadata, peer, principal, acting_for)
        return principal

    def _act_as(
        self, method: str, metadata: Sequence[tuple[str, Any]], peer: str, principal: Principal, tenant: str
    ) -> Principal:
        """`principal`, acting for `tenant` (the operator's admins only: an admin of another
        tenant administers that tenant alone)."""
        if not principal.is_operator:
            self._denied(method, metadata, peer, principal, f"{ACT_AS_HEADER} needs {NEEDS_OPERATOR}")
            raise PermissionDenied(
                f"acting for another tenant ({ACT_AS_HEADER}) needs {NEEDS_OPERATOR}",
                reason="ROLE_REQUIRED",
                metadata=operator_metadata(),
            )
        if not TENANT_NAME.match(tenant):
            rule = "1 to 63 characters: a-z, 0-9, '_' and '-', starting with a letter or digit"
            raise InvalidArgument(f"{ACT_AS_HEADER} is not a tenant name: {rule}", violations=[(ACT_AS_HEADER, rule)])
        return replace(principal, tenant=tenant, acting_from=principal.tenant)

    async def _verify(self, method: str, metadata: Sequence[tuple[str, Any]], peer: str) -> Principal:
        api_key = bearer = ""
        credentials = 0
        for key, value in metadata:
            if key == "x-api-key" and isinstance(value, str):
                api_key = value
                credentials += 1
            elif key == "authorization" and isinstance(value, str):
                credentials += 1
                if value[:7].lower() == "bearer ":
                    bearer = value[7:].strip()
        try:
            if credentials > 1:
                # One credential per call: with two, Envoy's rate limit (which
                # reads the first) and the server (the last) could disagree.
                raise AuthenticationFailed(MULTIPLE_CREDENTIALS)
            if api_key:
                return await self._keys.verify(api_key)
            if bearer and self._jwt is not None:
                principal: Principal = self._jwt.verify(bearer)
                return principal
            raise AuthenticationFailed("no credential" if not bearer else "bearer tokens are not configured")
        except AuthenticationFailed as failure:
            self.failed += 1
            origin = self.origin_of(metadata, peer)
            known = f" ({failure.credential_id})" if failure.credential_id else ""
            log.warning("authentication failed for %s from %s: %s%s", method, origin.client, failure.reason, known)
            kind = (
                Kind.CREDENTIAL_KIND_API_KEY
                if api_key
                else Kind.CREDENTIAL_KIND_JWT
                if bearer
                else Kind.CREDENTIAL_KIND_NONE
            )
            self._record_failure(method, origin, failure, kind)
            delay = self._failures.record(origin.client)
            if delay:
                await asyncio.sleep(delay)
            if failure.reason == MULTIPLE_CREDENTIALS:
                raise Unauthenticated(MULTIPLE_CREDENTIALS_MESSAGE, reason="MULTIPLE_CREDENTIALS") from None
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE) from None

    def _record_failure(
        self,
        method: str,
        origin: Origin,
        failure: AuthenticationFailed,
        kind: audit_pb2.AuditEvent.CredentialKind.ValueType,
    ) -> None:
        if self._audit is None:
            return
        event = entry(actions.AUTH_FAILED, code="UNAUTHENTICATED", reason=failure.reason, method=method, origin=origin)
        event.credential_id = failure.credential_id
        event.credential_kind = kind
        # Throttled per client address: a loop of bad keys cannot fill the disk.
        self._audit.append_limited(origin.client, event)

    def _denied(
        self, method: str, metadata: Sequence[tuple[str, Any]], peer: str, principal: Principal | None, reason: str
    ) -> None:
        if self._audit is None:
            return
        origin = self.origin_of(metadata, peer)
        event = entry(
            actions.ACCESS_DENIED,
            code="PERMISSION_DENIED",
            reason=reason,
            method=method,
            principal=principal,
            origin=origin,
        )
        who = f"{principal.tenant}/{principal.subject}" if principal is not None else origin.client
        self._audit.append_limited(who, event)
