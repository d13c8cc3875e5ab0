"""Authentication and the permission check, for every call, in one place.

Runs in the server interceptor before the handler, so before any
idempotency or cache lookup: an unauthenticated caller can never be
answered from another caller's records. A failure is always the same
UNAUTHENTICATED answer; why it failed goes to the log only. Repeated
failures from one client are answered more and more slowly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from flowport.server.auth.keys import KeyAuthenticator
from flowport.server.auth.permissions import Access, access_for, allowed
from flowport.server.auth.principal import ADMIN, USER, AuthenticationFailed, Principal
from flowport.server.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

INSECURE = Principal("default", "anonymous", frozenset({ADMIN, USER}), "insecure")
FAILURE_WINDOW = 60.0
MAX_DELAY = 5.0
TRACKED_CLIENTS = 10_000
UNAUTHENTICATED_MESSAGE = "authentication required: send a valid x-api-key or authorization: Bearer token"


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
        trusted_proxies: frozenset[str],
    ) -> None:
        self._keys = keys
        self._jwt = jwt
        self._insecure = insecure
        self._failures = _Failures(max_failures)
        self._trusted_proxies = trusted_proxies
        self.failed = 0

    def client_of(self, metadata: Sequence[tuple[str, Any]], peer: str) -> str:
        """The caller's address: Envoy's X-Forwarded-For when the peer is a trusted proxy."""
        address = _peer_host(peer)
        if address in self._trusted_proxies:
            for key, value in metadata:
                if key == "x-forwarded-for" and isinstance(value, str):
                    return value.split(",")[-1].strip() or address
        return address

    async def authenticate(self, method: str, metadata: Sequence[tuple[str, Any]], peer: str) -> Principal | None:
        """The principal for this call (None for public calls); raises FlowportError."""
        access = access_for(method)
        if access is None:
            # Fail closed: an RPC nobody declared access for is nobody's to call.
            raise PermissionDenied(f"{method} is not open to callers", reason="NO_PERMISSION_DECLARED")
        if access is Access.PUBLIC:
            return None
        principal = INSECURE if self._insecure else await self._verify(method, metadata, peer)
        if not allowed(principal, access):
            raise PermissionDenied(
                f"{method} needs the {access.value} role", reason="ROLE_REQUIRED", metadata={"role": access.value}
            )
        return principal

    async def _verify(self, method: str, metadata: Sequence[tuple[str, Any]], peer: str) -> Principal:
        api_key = bearer = ""
        for key, value in metadata:
            if key == "x-api-key" and isinstance(value, str):
                api_key = value
            elif key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                bearer = value[7:].strip()
        try:
            if api_key:
                return await self._keys.verify(api_key)
            if bearer and self._jwt is not None:
                principal: Principal = self._jwt.verify(bearer)
                return principal
            raise AuthenticationFailed("no credential" if not bearer else "bearer tokens are not configured")
        except AuthenticationFailed as failure:
            self.failed += 1
            client = self.client_of(metadata, peer)
            log.warning("authentication failed for %s from %s: %s", method, client, failure.reason)
            delay = self._failures.record(client)
            if delay:
                await asyncio.sleep(delay)
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE) from None


def _peer_host(peer: str) -> str:
    # grpc peers look like "ipv4:127.0.0.1:5000" or "ipv6:[::1]:5000".
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit("]", 1)[0].lstrip("[")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer
