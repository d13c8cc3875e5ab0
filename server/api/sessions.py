"""SessionService: create, get, list and close user sessions."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from flowport.server import pagination
from flowport.server.api.common import check_request_id, idempotency_key, request_id_reused, require
from flowport.server.auth.principal import Principal
from flowport.server.clock import now_us, timestamp
from flowport.server.errors import InvalidArgument, NotFound
from flowport.server.events.bus import EventBus
from flowport.server.ids import new_id
from flowport.server.settings import Settings
from flowport.server.storage import Deletion, IdempotencyConflict
from flowport.server.storage.sessions import SessionTables
from flowport.server.tenancy import principal_of, tenant_of
from flowport.server.types import Context
from flowport.v1 import session_pb2, session_pb2_grpc

MAX_USER_ID = 256
MAX_METADATA_BYTES = 64 * 1024


class SessionService(session_pb2_grpc.SessionServiceServicer):
    """Sessions on the store, expiring after their TTL."""

    def __init__(self, store: SessionTables, settings: Settings, bus: EventBus) -> None:
        self._store = store
        self._bus = bus
        self._default_ttl_us = int(settings.session_default_ttl * 1e6)
        self._max_ttl_us = int(settings.session_max_ttl * 1e6)
        # Kailash's session routes add the gateway's version to each session
        # answer: a fact of the gateway (what GET / shows), never stored.
        self._api_version = settings.shown_version

    def _expiry_us(self, given: session_pb2.Session, now_us: int) -> int:
        which = given.WhichOneof("expiration")
        if which is None:
            return now_us + self._default_ttl_us
        if which == "ttl":
            ttl_us = given.ttl.ToMicroseconds()
            if not 1_000_000 <= ttl_us <= self._max_ttl_us:
                raise InvalidArgument(
                    f"session.ttl must be between 1s and {self._max_ttl_us // 1_000_000}s",
                    violations=[("session.ttl", f"between 1s and {self._max_ttl_us // 1_000_000}s")],
                )
            return now_us + ttl_us
        expire_us = given.expire_time.ToMicroseconds()
        if not now_us < expire_us <= now_us + self._max_ttl_us:
            raise InvalidArgument(
                "session.expire_time must be in the future and within the maximum TTL "
                f"({self._max_ttl_us // 1_000_000}s)",
                violations=[("session.expire_time", "in the future, within the maximum TTL")],
            )
        return expire_us

    async def CreateSession(self, request: session_pb2.CreateSessionRequest, context: Context) -> session_pb2.Session:
        given = request.session
        check_request_id(request.request_id)
        violations = []
        if len(given.user_id) > MAX_USER_ID:
            violations.append(("session.user_id", f"at most {MAX_USER_ID} characters"))
        if given.metadata.ByteSize() > MAX_METADATA_BYTES:
            violations.append(("session.metadata", f"at most {MAX_METADATA_BYTES} bytes encoded"))
        if violations:
            raise InvalidArgument(
                "session is not valid: " + "; ".join(f"{f} {d}" for f, d in violations), violations=violations
            )
        now = now_us()
        principal = principal_of(context)
        creator = credential_of(principal) if principal is not None else ""
        session = session_pb2.Session(
            session_id=new_id("ses"),
            user_id=given.user_id or default_user_id(principal),
            metadata=given.metadata,
            tenant=tenant_of(context),
            creator=creator,
            create_time=timestamp(now),
            expire_time=timestamp(self._expiry_us(given, now)),
        )
        # The key guards the request as sent, so a retry after the TTL
        # computation moved on still matches.
        idempotency = idempotency_key(request.request_id, session_pb2.CreateSessionRequest(session=given))
        try:
            result = await self._store.create_session(session.tenant, session, idempotency)
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "with a different session") from None
        if result.replayed:
            first = session_pb2.Session.FromString(result.response)
            if first.creator != creator:
                # Another credential's key: its session is not this caller's to see.
                raise request_id_reused(request.request_id, "by another credential")
            return self._answer(first)
        self._bus.publish("session.created", tenant=session.tenant, session_id=session.session_id)
        return self._answer(session)

    async def GetSession(self, request: session_pb2.GetSessionRequest, context: Context) -> session_pb2.Session:
        require(request.session_id, "session_id")
        session = await self._store.get_session(
            tenant_of(context), request.session_id, now_us(), creator=session_scope(context)
        )
        if session is None:
            raise session_not_found()
        return self._answer(session)

    async def ListSessions(
        self, request: session_pb2.ListSessionsRequest, context: Context
    ) -> session_pb2.ListSessionsResponse:
        size = pagination.page_size(request.page_size)
        filters = {"user_id": request.user_id}
        after = pagination.cursor_time_id(pagination.decode_token(request.page_token, filters))
        tenant, now, creator = tenant_of(context), now_us(), session_scope(context)
        rows, total = await asyncio.gather(
            self._store.list_sessions(
                tenant, user_id=request.user_id, after=after, limit=size + 1, now_us=now, creator=creator
            ),
            self._store.count_listed_sessions(tenant, user_id=request.user_id, now_us=now, creator=creator),
        )
        # Marked before paging, so that the page's bytes count what it carries.
        answers = [self._answer(s) for s in rows]
        sessions, token = pagination.page(
            answers, size, filters, lambda s: [s.create_time.ToMicroseconds(), s.session_id]
        )
        return session_pb2.ListSessionsResponse(sessions=sessions, next_page_token=token, total=total)

    def _answer(self, session: session_pb2.Session) -> session_pb2.Session:
        """`session` as answers carry it: `active` (every session an answer carries is; the rest
        are NOT_FOUND) and the gateway's `api_version`."""
        session.active = True
        session.api_version = self._api_version
        return session

    async def DeleteSession(
        self, request: session_pb2.DeleteSessionRequest, context: Context
    ) -> session_pb2.DeleteSessionResponse:
        require(request.session_id, "session_id")
        check_request_id(request.request_id)
        try:
            deleted = await self._store.delete_session(
                tenant_of(context), request.session_id, now_us(), request.request_id, creator=session_scope(context)
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to delete another session") from None
        if not deleted.done:
            raise session_not_found()
        if deleted is Deletion.DELETED:  # a replay was announced the first time
            self._bus.publish("session.deleted", tenant=tenant_of(context), session_id=request.session_id)
        return session_pb2.DeleteSessionResponse(message="Session closed")


def default_user_id(principal: Principal | None) -> str:
    """A session's `user_id` when the body leaves it out, as Kailash fills it from the token: a
    bearer token's subject, an API key's id (the one name a key has that never changes). Only a
    label: who owns the session is `creator`. Empty without authentication (no credential read)
    and for a subject too long to be a `user_id`."""
    if principal is None or principal.method == "insecure":
        return ""
    return principal.subject if len(principal.subject) <= MAX_USER_ID else ""


def credential_of(principal: Principal) -> str:
    """The credential a session belongs to: an API key's id; for a bearer token
    `jwt:<iss>:<sub>` (the issuer percent-encoded, so the first ':' after it
    ends it), i.e. the identity the token speaks for, whichever token carries it."""
    if principal.method == "jwt":
        return f"jwt:{quote(principal.issuer, safe='')}:{principal.subject}"
    # An API key's subject is its id; without authentication, "anonymous" (an admin).
    return principal.subject


def session_scope(context: Context) -> str | None:
    """Whose sessions the caller may use: every one of its tenant's (None) for an admin,
    else only those its own credential created."""
    principal = principal_of(context)
    return None if principal is None or principal.is_admin else credential_of(principal)


async def check_session(store: SessionTables, context: Context, session_id: str) -> None:
    """NOT_FOUND unless `session_id` is a live session of the caller's tenant that the caller may use."""
    if not await store.session_exists(tenant_of(context), session_id, now_us(), creator=session_scope(context)):
        raise session_not_found()


async def check_owner(store: SessionTables, context: Context, session_id: str) -> None:
    """NOT_FOUND unless the caller may see what ran in `session_id` (its creator, or an admin),
    though the session has expired or was deleted since."""
    if not await may_see(store, context, session_id):
        raise session_not_found()


async def check_named_session(store: SessionTables, context: Context, session_id: str) -> None:
    """NOT_FOUND unless `session_id` is (or was: expired and deleted ones count) a session of the
    caller's tenant that the caller may see; for reads that name a session (`?session_id=`)."""
    owner = await store.session_owner(tenant_of(context), session_id)
    scope = session_scope(context)
    if owner is None or (scope is not None and owner != scope):
        raise session_not_found()


async def may_see(store: SessionTables, context: Context, session_id: str) -> bool:
    """Whether the caller may see what belongs to `session_id` (always, outside a session): for a
    caller without the admin role, only its own credential's sessions. Only a session costs a
    lookup, and the store caches owners."""
    if not session_id:
        return True
    scope = session_scope(context)
    return scope is None or await store.session_owner(tenant_of(context), session_id) == scope


class VisibleSessions:
    """Which sessions' events one stream may carry: a caller without the admin role gets only
    its own credential's. Verdicts are kept for the stream's life, so an event costs a lookup
    only for the first event of a session (a session created after the stream opened included)."""

    MAX_VERDICTS = 4096

    def __init__(self, store: SessionTables, context: Context) -> None:
        self._store = store
        self._tenant = tenant_of(context)
        self._scope = session_scope(context)
        self._verdicts: dict[str, bool] = {}

    def grant(self, session_id: str) -> None:
        """Record a session already checked to be the caller's."""
        self._verdicts[session_id] = True

    async def allows(self, session_id: str) -> bool:
        """Whether an event of `session_id` (empty: of no session) may be sent."""
        if self._scope is None or not session_id:
            return True
        verdict = self._verdicts.get(session_id)
        if verdict is None:
            # A session whose owner is unknown (its rows all removed) is the admins' alone.
            verdict = await self._store.session_owner(self._tenant, session_id) == self._scope
            if len(self._verdicts) >= self.MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[session_id] = verdict
        return verdict


def session_not_found() -> NotFound:
    """NOT_FOUND for a session that does not exist, has expired, or is another credential's.

    The same bytes for every id: the caller knows which one it named, and two answers that
    differ only by the id would still let a client compare them (Kailash's tests do)."""
    return NotFound("session does not exist or has expired", reason="SESSION_NOT_FOUND")
