"""The API-key cache never outlives a revocation, even one that lands while a lookup is in flight."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flowport.server.auth import keys as keys_module
from flowport.server.auth.keys import KeyAuthenticator, describe, key_hash, new_key
from flowport.server.auth.principal import AuthenticationFailed
from flowport.server.storage import SqliteStore


async def test_a_lookup_in_flight_during_a_revocation_does_not_cache_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    try:
        key_id, key = new_key()
        await store.create_api_key(describe(key_id, "acme", ["user"], "", "test"), key_hash(key), None, "acme")
        keys = KeyAuthenticator(store)
        real = store.api_key_by_hash
        read, release = asyncio.Event(), asyncio.Event()

        async def slow(digest: bytes) -> Any:
            found = await real(digest)  # read while the key is still valid...
            read.set()
            await release.wait()  # ...and answered only after the revocation
            return found

        monkeypatch.setattr(store, "api_key_by_hash", slow)
        lookup = asyncio.create_task(keys.verify(key))
        await read.wait()
        await store.revoke_api_key(key_id, None, 1)
        keys.forget(key_id)
        release.set()
        assert (await lookup).tenant == "acme"  # that call started before the revocation
        monkeypatch.setattr(store, "api_key_by_hash", real)
        with pytest.raises(AuthenticationFailed, match="revoked"):
            await keys.verify(key)  # looked up again, not served from a stale cache
    finally:
        await store.close()


async def test_the_cache_keeps_at_most_its_cap_and_a_revocation_still_evicts_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant's admin may make many keys: each process keeps a bounded number of verdicts, the
    oldest going first, and forgetting a key finds its entry by id."""
    monkeypatch.setattr(keys_module, "MAX_CACHED", 3)
    store = await SqliteStore.open(tmp_path / "db.sqlite")
    try:
        made = [new_key() for _ in range(5)]
        for key_id, key in made:
            await store.create_api_key(describe(key_id, "acme", ["user"], "", "test"), key_hash(key), None, "acme")
        keys = KeyAuthenticator(store)
        for _, key in made:
            await keys.verify(key)
        assert set(keys._cache) == {key_hash(key) for _, key in made[2:]}, "the two oldest went"
        assert set(keys._digest_of) == {key_id for key_id, _ in made[2:]}
        lookups = 0
        real = store.api_key_by_hash

        async def counted(digest: bytes) -> Any:
            nonlocal lookups
            lookups += 1
            return await real(digest)

        monkeypatch.setattr(store, "api_key_by_hash", counted)
        await keys.verify(made[4][1])
        assert lookups == 0, "a cached key is not looked up"
        revoked_id, revoked = made[4]
        await store.revoke_api_key(revoked_id, None, 1)
        keys.forget(revoked_id)
        assert revoked_id not in keys._digest_of and len(keys._cache) == 2
        with pytest.raises(AuthenticationFailed, match="revoked"):
            await keys.verify(revoked)
    finally:
        await store.close()
