"""Idempotency records: one table, shared by every mutating call.

A record maps (tenant, method, request_id) to a hash of the request and the
serialized response of the first call. Functions here run inside a write
transaction on the writer thread.
"""

from __future__ import annotations

from collections.abc import Callable

from flowport.server.storage.base import IdempotencyConflict, IdempotencyRace
from flowport.server.storage.tables import Connection


def replayed(conn: Connection, tenant: str, method: str, request_id: str, request_hash: bytes) -> bytes | None:
    """The first call's response, None for a new key; IdempotencyConflict for another request."""
    row = conn.execute(
        "SELECT request_hash, response FROM idempotency WHERE tenant=? AND method=? AND request_id=?",
        (tenant, method, request_id),
    ).fetchone()
    if row is None:
        return None
    if row[0] != request_hash:
        raise IdempotencyConflict(request_id)
    return bytes(row[1])


def remember(
    conn: Connection, tenant: str, method: str, key: tuple[str, bytes], response: bytes, *, now_us: int
) -> None:
    """Record the response of the first call with this (request_id, request_hash) key.

    IdempotencyRace when another process recorded the same key meanwhile
    (it committed between our lookup and this insert): the write is then run
    again, and its lookup finds that record.
    """
    inserted = conn.execute(
        "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (tenant, method, *key, response, now_us),
    ).rowcount
    if inserted == 0:
        raise IdempotencyRace(key[0])


def delete_once(
    conn: Connection,
    tenant: str,
    method: str,
    request_id: str,
    *,
    key: bytes,
    delete: Callable[[], bool],
    now_us: int,
) -> bool:
    """Run `delete` (True when it removed something) unless `request_id` already did: a retry of a
    delete that succeeded is True again, not False because the row is gone."""
    if request_id and replayed(conn, tenant, method, request_id, key) is not None:
        return True
    if not delete():
        return False
    if request_id:
        remember(conn, tenant, method, (request_id, key), b"", now_us=now_us)
    return True
