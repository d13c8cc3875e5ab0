"""API keys: made random, shown once, kept as hashes, checked in O(1).

A key looks like `fpk_<26 chars>.<43 chars>`: the part before the dot is
its public id (safe to log and to revoke by), the rest 256 random bits.
The store keeps SHA-256 of the whole key: the keys are random, so a fast
hash is enough (no password to stretch), and a lookup is one indexed read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass

from flowport.server.auth.lifetime import CredentialWatch
from flowport.server.auth.principal import AuthenticationFailed, Principal
from flowport.server.events.bus import EventBus
from flowport.server.ids import new_id
from flowport.server.storage.api_keys import ApiKeyTables
from flowport.v1 import apikey_pb2

PREFIX = "fpk"
MAX_KEY_CHARS = 256
MIN_CONFIGURED_KEY_CHARS = 32
# A cached verdict is reused this long; revocation through this server
# evicts it at once.
CACHE_SECONDS = 30.0
# Verdicts kept at most: past it the oldest goes (a tenant's admin may make many keys, and
# each process would otherwise keep one entry per key ever used).
MAX_CACHED = 65_536
# Published on revocation, so every process sharing the bus forgets the key.
REVOKED_EVENT = "api_key.revoked"
# Keys with open streams are checked against the store this often, so a
# revocation whose bus event was lost (Redis down) still ends their streams.
RECHECK_SECONDS = CACHE_SECONDS

log = logging.getLogger(__name__)


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key)."""
    key_id = new_id(PREFIX)
    return key_id, f"{key_id}.{secrets.token_urlsafe(32)}"


def key_hash(key: str) -> bytes:
    """What the store keeps of a key."""
    return hashlib.sha256(key.encode()).digest()


@dataclass
class _Cached:
    principal: Principal
    expire_us: int | None
    checked: float


class KeyAuthenticator:
    """Verifies `x-api-key` values against the store, with a small cache."""

    def __init__(self, store: ApiKeyTables) -> None:
        self._store = store
        self._cache: dict[bytes, _Cached] = {}  # oldest first: dicts keep their insertion order
        self._digest_of: dict[str, bytes] = {}  # by key id, so forget() looks at one entry
        # Bumped by forget(): a lookup that started before a revocation must
        # not put what it read (the key still valid) into the cache after it.
        self._generation = 0
        self._following: asyncio.Task[None] | None = None
        self._rechecking: asyncio.Task[None] | None = None
        # The streams open in this process per key: a revocation ends them.
        self.streams = CredentialWatch()

    async def verify(self, key: str) -> Principal:
        """The key's principal; AuthenticationFailed when unknown, expired or revoked."""
        # Keys are ASCII; grpc hands over a value that was not UTF-8 read as Latin-1.
        if not key or len(key) > MAX_KEY_CHARS or not key.isascii():
            raise AuthenticationFailed("malformed api key")
        digest = key_hash(key)
        now = time.time()
        cached = self._cache.get(digest)
        if cached is None or now - cached.checked > CACHE_SECONDS:
            generation = self._generation
            found = await self._store.api_key_by_hash(digest)
            if found is None:
                # Not even the presented key's head: for a configured key
                # (FLOWPORT_ADMIN_API_KEY) that is part of the secret.
                raise AuthenticationFailed("unknown api key")
            description, expire_us, revoke_us = found
            if revoke_us is not None:
                raise AuthenticationFailed("revoked api key", credential_id=description.key_id)
            principal = Principal(
                tenant=description.tenant,
                subject=description.key_id,
                roles=frozenset(description.roles),
                method="api_key",
                credential_id=description.key_id,
                expires_at=None if expire_us is None else expire_us / 1e6,
            )
            cached = _Cached(principal, expire_us, now)
            if generation == self._generation:
                self._remember(digest, cached)
        if cached.expire_us is not None and now * 1e6 >= cached.expire_us:
            self._drop(digest)
            raise AuthenticationFailed("expired api key", credential_id=cached.principal.credential_id)
        return cached.principal

    def _remember(self, digest: bytes, cached: _Cached) -> None:
        self._drop(digest)  # moved to the newest end
        while len(self._cache) >= MAX_CACHED:
            self._drop(next(iter(self._cache)))
        self._cache[digest] = cached
        self._digest_of[cached.principal.credential_id] = digest

    def _drop(self, digest: bytes) -> None:
        cached = self._cache.pop(digest, None)
        if cached is not None and self._digest_of.get(cached.principal.credential_id) == digest:
            del self._digest_of[cached.principal.credential_id]

    def forget(self, key_id: str) -> None:
        """Evict a key (after revocation) so the next call is refused, and end the streams it opened here."""
        self._generation += 1
        digest = self._digest_of.get(key_id)
        if digest is not None:
            self._drop(digest)
        ended = self.streams.revoked(key_id)
        if ended:
            log.info("ended %d stream(s) opened with the revoked api key %s", ended, key_id)

    async def recheck(self) -> None:
        """Forget every key with open streams here that the store says is revoked or gone."""
        for key_id in self.streams.key_ids():
            description = await self._store.get_api_key(key_id, None)
            if description is None or description.HasField("revoke_time"):
                self.forget(key_id)

    def follow(self, bus: EventBus) -> None:
        """Forget keys revoked by any process: `api_key.revoked` events (through Redis, from every process)."""
        revoked = bus.subscribe(lambda e: e.type == REVOKED_EVENT)

        async def forget_forever() -> None:
            try:
                async for event in revoked:
                    self.forget(str((event.data or {}).get("key_id", "")))
            finally:
                revoked.close()

        self._following = asyncio.create_task(forget_forever(), name="api key revocations")

        async def recheck_forever() -> None:
            while True:
                await asyncio.sleep(RECHECK_SECONDS)
                try:
                    await self.recheck()
                except Exception:  # the store may be briefly away; the next round retries
                    log.warning("could not recheck the api keys of open streams", exc_info=True)

        self._rechecking = asyncio.create_task(recheck_forever(), name="api key recheck")

    async def close(self) -> None:
        tasks = [t for t in (self._following, self._rechecking) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def describe(key_id: str, tenant: str, roles: list[str], description: str, created_by: str) -> apikey_pb2.ApiKey:
    """A new key's stored description."""
    key = apikey_pb2.ApiKey(key_id=key_id, tenant=tenant, roles=roles, description=description, created_by=created_by)
    key.create_time.GetCurrentTime()
    return key
