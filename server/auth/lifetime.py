"""Open streams end when the credential they were opened with stops being valid.

A stream is authenticated once, when it opens, but its credential can end
while it runs: an API key is revoked (through this process or, over the
event bus, through another) or reaches its `expire_time`; a JWT passes
`exp` plus the configured leeway. The interceptor registers every
authenticated stream here with a callback, which is called once: at the
revocation, or at the expiry known from the start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from flowport.server.auth.principal import Principal

REVOKED = "revoked"
EXPIRED = "expired"
# How long a revocation is remembered for streams that register after it: a
# key lookup in flight during the revocation may still have let one open.
REMEMBER_SECONDS = 120.0

Ended = Callable[[str], None]
"""Called with why the credential ended: REVOKED or EXPIRED."""


class Watched:
    """One stream's registration; `close()` when the stream ends."""

    __slots__ = ("_ended", "_key_id", "_timer", "_watch")

    def __init__(self, watch: CredentialWatch, key_id: str, ended: Ended) -> None:
        self._watch = watch
        self._key_id = key_id
        self._ended: Ended | None = ended
        self._timer: asyncio.TimerHandle | None = None

    def fire(self, reason: str) -> None:
        """Tell the stream its credential ended (once), and stop watching."""
        ended = self._ended
        self.close()
        if ended is not None:
            ended(reason)

    def close(self) -> None:
        if self._ended is None:
            return
        self._ended = None
        if self._timer is not None:
            self._timer.cancel()
        self._watch._drop(self)

    @property
    def key_id(self) -> str:
        return self._key_id


class CredentialWatch:
    """The open streams of this process by the API key that opened them, with their expiry timers."""

    def __init__(self, remember: float = REMEMBER_SECONDS) -> None:
        self._by_key: dict[str, set[Watched]] = {}
        self._expiring: set[Watched] = set()
        self._revoked: dict[str, float] = {}
        self._remember = remember

    def watch(self, principal: Principal, ended: Ended) -> Watched | None:
        """Call `ended` when `principal`'s credential is revoked or expires; None when it never ends."""
        key_id = principal.credential_id if principal.method == "api_key" else ""
        if not key_id and principal.expires_at is None:
            return None
        watched = Watched(self, key_id, ended)
        loop = asyncio.get_running_loop()
        if key_id:
            self._by_key.setdefault(key_id, set()).add(watched)
            if key_id in self._recently_revoked():
                # Opened with a verdict read before the revocation: end it as soon as it runs.
                loop.call_soon(watched.fire, REVOKED)
                return watched
        if principal.expires_at is not None:
            self._expiring.add(watched)
            # Wall-clock expiry as a delay on the loop's own clock.
            delay = max(0.0, principal.expires_at - time.time())
            watched._timer = loop.call_later(delay, watched.fire, EXPIRED)
        return watched

    def revoked(self, key_id: str) -> int:
        """End every stream opened with `key_id`; returns how many."""
        self._recently_revoked()[key_id] = time.monotonic()
        watched = self._by_key.pop(key_id, set())
        for stream in watched:
            stream.fire(REVOKED)
        return len(watched)

    def key_ids(self) -> list[str]:
        """The API keys that have open streams here."""
        return list(self._by_key)

    @property
    def open_streams(self) -> int:
        """Streams registered and not yet ended or closed."""
        return len({w for streams in self._by_key.values() for w in streams} | self._expiring)

    def _recently_revoked(self) -> dict[str, float]:
        horizon = time.monotonic() - self._remember
        for key_id in [k for k, at in self._revoked.items() if at < horizon]:
            del self._revoked[key_id]
        return self._revoked

    def _drop(self, watched: Watched) -> None:
        self._expiring.discard(watched)
        streams = self._by_key.get(watched.key_id)
        if streams is not None:
            streams.discard(watched)
            if not streams:
                del self._by_key[watched.key_id]
