"""Key rotation: reseal every value under a new key while servers keep running.

With a key file (`flowport secrets rotate-key`):

1. a new random key is put in front of the file (the old keys stay, so
   every value can still be opened);
2. the rotation waits while servers notice the file changed (they check at
   most every RELOAD_INTERVAL seconds and whenever they meet a key id they
   do not hold), so new values are sealed with the new key from then on;
3. every row still sealed with another key is opened and resealed under the
   new one, in batches of BATCH rows per transaction; a row changed by a
   PutSecret meanwhile is left to that put;
4. keys no row uses any more are dropped from the file.

With keys from the `secrets_key` setting the process cannot edit them: put
the new key first there on every server (a rolling restart), then run
rotate-key to reseal, and remove the keys it reports unused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from flowport.server.secrets.cipher import open_sealed, seal
from flowport.server.secrets.keyring import Keyring, generate_key, read_key_file, write_key_file
from flowport.server.secrets.source import RELOAD_INTERVAL, KeySource
from flowport.server.storage.secrets import Reseal, SecretTables

BATCH = 100
# How long servers get to load a new primary key before resealing starts.
DEFAULT_WAIT = 3 * RELOAD_INTERVAL


@dataclass(frozen=True)
class Rotation:
    """What a rotation did."""

    primary: str
    """Id of the key every value is sealed with now."""
    resealed: int
    """Values resealed."""
    dropped: tuple[str, ...]
    """Ids of keys removed from the key file."""
    unused: tuple[str, ...]
    """Ids of keys no value uses any more (with the setting: remove them there)."""
    remaining: int
    """Values still under an older key: written by a server that had not loaded the new key yet."""


async def reseal_all(store: SecretTables, ring: Keyring, batch: int = BATCH) -> int:
    """Reseal every value not sealed with `ring`'s primary key; the number resealed.

    Raises SecretDecryptError when a value cannot be opened with `ring`
    (its key is missing): nothing is dropped then.
    """
    total = 0
    while rows := await store.secrets_sealed_without(ring.primary_id, batch):
        changes = []
        for row in rows:
            tenant, name = row.secret.tenant, row.secret.name
            plain = open_sealed(ring, tenant, name, row.sealed)
            changes.append(Reseal(tenant, name, row.sealed.blob, seal(ring, tenant, name, plain)))
        total += await store.reseal_secrets(changes)
    return total


async def rotate(
    store: SecretTables,
    keys: KeySource,
    *,
    wait: float = DEFAULT_WAIT,
    out: Callable[[str], None] = print,
) -> Rotation:
    """Rotate as the module docstring says; `keys` is the key file's source or the setting's."""
    path = keys.path
    ring = keys.current()
    if path is not None:
        ring = read_key_file(path).with_primary(generate_key())
        write_key_file(path, ring)
        out(f"new primary key {ring.primary_id} written to {path} (old keys kept until nothing uses them)")
        if wait > 0:
            out(f"waiting {wait:g}s for running servers to load it")
            await asyncio.sleep(wait)
    resealed = await reseal_all(store, ring)
    out(f"resealed {resealed} values under key {ring.primary_id}")
    used = await store.count_secrets_by_key()
    unused = tuple(i for i in ring.ids[1:] if not used.get(i))
    remaining = sum(n for i, n in used.items() if i != ring.primary_id)
    if remaining:
        out(f"{remaining} values were written with an older key during the rotation: run rotate-key again")
    dropped: tuple[str, ...] = ()
    if path is not None and unused:
        # Re-read: keep any key someone added meanwhile, drop only what is unused.
        current = read_key_file(path)
        kept = current.only({i for i in current.ids if i not in unused})
        write_key_file(path, kept)
        dropped = tuple(i for i in current.ids if i not in kept.ids)
        out(f"dropped keys no value uses any more: {', '.join(dropped)}")
    elif unused:
        out(f"no value uses keys {', '.join(unused)} any more: remove them from FLOWPORT_SECRETS_KEY")
    return Rotation(ring.primary_id, resealed, dropped, unused, remaining)
