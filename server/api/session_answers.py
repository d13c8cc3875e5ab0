"""Session answers with the gateway's `api_version`, where Kailash's session routes add it."""

from __future__ import annotations

from flowport.server.api.sessions import SessionService
from flowport.server.events.bus import EventBus
from flowport.server.settings import Settings
from flowport.server.storage.sessions import SessionTables
from flowport.server.types import Context
from flowport.v1 import session_pb2


class VersionedSessionService(SessionService):
    """SessionService whose answers carry `api_version` on each session: the version `GET /` shows
    (--display-version, else the release). A fact of the gateway, not of the session, so it is
    added to the answer here and never stored."""

    def __init__(self, store: SessionTables, settings: Settings, bus: EventBus) -> None:
        super().__init__(store, settings, bus)
        self._api_version = settings.shown_version

    async def CreateSession(self, request: session_pb2.CreateSessionRequest, context: Context) -> session_pb2.Session:
        session = await super().CreateSession(request, context)
        session.api_version = self._api_version
        return session

    async def GetSession(self, request: session_pb2.GetSessionRequest, context: Context) -> session_pb2.Session:
        session = await super().GetSession(request, context)
        session.api_version = self._api_version
        return session

    async def ListSessions(
        self, request: session_pb2.ListSessionsRequest, context: Context
    ) -> session_pb2.ListSessionsResponse:
        listed = await super().ListSessions(request, context)
        for session in listed.sessions:
            session.api_version = self._api_version
        return listed
