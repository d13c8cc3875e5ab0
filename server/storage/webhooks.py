"""Webhook and webhook delivery rows.

A delivery row is the durable queue entry: it is written before the first
attempt, every attempt updates it, and PENDING/RETRYING rows are what a
restarted dispatcher resumes. Secrets live in their own column and never in
the serialized Webhook that reads return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2

from flowport.server.clock import timestamp
from flowport.server.storage import idempotency, quotas
from flowport.server.storage.base import Deletion, IdempotentResult
from flowport.server.storage.tables import Connection, Tables, micros
from flowport.v1 import webhook_pb2

_CREATE = "flowport.v1.WebhookService/CreateWebhook"
_DELETE = "flowport.v1.WebhookService/DeleteWebhook"
_REDELIVER = "flowport.v1.WebhookService/RedeliverWebhookDelivery"

PENDING = webhook_pb2.WebhookDelivery.STATE_PENDING
RETRYING = webhook_pb2.WebhookDelivery.STATE_RETRYING
SUCCEEDED = webhook_pb2.WebhookDelivery.STATE_SUCCEEDED
DEAD_LETTERED = webhook_pb2.WebhookDelivery.STATE_DEAD_LETTERED
UNFINISHED = (PENDING, RETRYING)

_DELIVERY_COLUMNS = (
    "delivery_id, webhook_id, event_id, event_type, state, attempts, last_status_code, last_error,"
    " last_duration_us, next_attempt_us, create_us, update_us"
)


class WebhookExists(Exception):
    """The tenant already has a webhook with this id."""


class NotDeadLettered(Exception):
    """Only a dead-lettered delivery can be redelivered."""

    def __init__(self, state: int) -> None:
        super().__init__(state)
        self.state = state


@dataclass(frozen=True, slots=True)
class StoredWebhook:
    """A webhook with its secret (empty when unsigned): what the dispatcher caches."""

    webhook: webhook_pb2.Webhook
    secret: bytes
    # Whose sessions' events it receives: None for every session of the tenant (an admin's).
    session_scope: str | None = None


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery row to insert, PENDING and due at `create_us`."""

    delivery_id: str
    tenant: str
    webhook_id: str
    event_id: str
    event_type: str
    payload: bytes
    create_us: int


@dataclass(frozen=True, slots=True)
class DueDelivery:
    """An unfinished delivery, as the dispatcher schedules it."""

    delivery_id: str
    tenant: str
    webhook_id: str
    next_attempt_us: int


@dataclass(frozen=True, slots=True)
class AttemptInput:
    """What one attempt needs from a delivery row."""

    state: int
    attempts: int
    event_id: str
    event_type: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """The outcome of one attempt, written to its row."""

    delivery_id: str
    state: int
    attempts: int
    last_status_code: int
    last_error: str
    last_duration_us: int
    next_attempt_us: int | None
    update_us: int


def _delivery(row: Sequence[Any]) -> webhook_pb2.WebhookDelivery:
    """A WebhookDelivery from a row selected with _DELIVERY_COLUMNS."""
    duration_us: int = row[8]
    delivery = webhook_pb2.WebhookDelivery(
        delivery_id=row[0],
        webhook_id=row[1],
        event_id=row[2],
        event_type=row[3],
        state=row[4],
        attempts=row[5],
        last_status_code=row[6],
        last_error=row[7],
        last_duration=duration_pb2.Duration(seconds=duration_us // 1_000_000, nanos=(duration_us % 1_000_000) * 1000),
        create_time=timestamp(row[10]),
        update_time=timestamp(row[11]),
    )
    if row[9] is not None:  # only while PENDING or RETRYING
        delivery.next_attempt_time.CopyFrom(timestamp(row[9]))
    return delivery


class WebhookTables(Tables):
    """Webhooks scoped by tenant, and the durable delivery queue."""

    # -- webhooks -----------------------------------------------------------

    async def create_webhook(
        self,
        tenant: str,
        webhook: webhook_pb2.Webhook,
        secret: bytes,
        idempotency_key: tuple[str, bytes] | None,
        *,
        session_scope: str | None = None,
    ) -> IdempotentResult:
        """Insert `webhook` (already without its secret; its `creator` set), receiving the events of
        `session_scope`'s sessions only, or of every session (None); raises WebhookExists for a taken id."""
        body = webhook.SerializeToString()
        now_us = micros(webhook.create_time)

        # A taken id is an answer, not a failed write (which the store logs as an error).
        def op(conn: Connection) -> IdempotentResult | None:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _CREATE, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
            inserted = conn.execute(
                "INSERT INTO webhooks (tenant, webhook_id, create_us, secret, body, creator, session_scope)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, webhook_id) DO NOTHING",
                (tenant, webhook.webhook_id, now_us, secret or None, body, webhook.creator, session_scope),
            ).rowcount
            if not inserted:
                return None
            quotas.check(conn, self.quotas, tenant, quotas.WEBHOOKS)
            if idempotency_key is not None:
                idempotency.remember(conn, tenant, _CREATE, idempotency_key, body, now_us=now_us)
            return IdempotentResult(body, replayed=False)

        result = await self._write(op)
        if result is None:
            raise WebhookExists(webhook.webhook_id)
        return result

    async def get_webhook(self, tenant: str, webhook_id: str, creator: str | None = None) -> webhook_pb2.Webhook | None:
        """The webhook, or None when absent, another tenant's, or (with `creator`) another credential's."""
        sql = "SELECT body FROM webhooks WHERE tenant=? AND webhook_id=?"
        args: tuple[object, ...] = (tenant, webhook_id)
        if creator is not None:
            sql, args = sql + " AND creator=?", (*args, creator)
        row = await self._lookup(sql, args)
        return None if row is None else webhook_pb2.Webhook.FromString(row[0])

    async def list_webhooks(
        self, tenant: str, *, after: str | None, limit: int, creator: str | None = None
    ) -> list[webhook_pb2.Webhook]:
        """The tenant's webhooks (only `creator`'s, if given) by id, after `after`."""
        sql = "SELECT body FROM webhooks WHERE tenant=?"
        args: list[object] = [tenant]
        if creator is not None:
            sql += " AND creator=?"
            args.append(creator)
        if after is not None:
            sql += " AND webhook_id > ?"
            args.append(after)
        sql += " ORDER BY webhook_id LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [webhook_pb2.Webhook.FromString(row[0]) for row in rows]

    async def delete_webhook(
        self, tenant: str, webhook_id: str, now_us: int, request_id: str = "", creator: str | None = None
    ) -> Deletion:
        """Delete the webhook and every delivery to it; MISSING when there was none (of `creator`'s, if given).

        With `request_id`, a repeat of a delete that succeeded is REPLAYED (for
        `creator` only if it was its webhook); raises IdempotencyConflict when
        the key deleted another webhook.
        """
        key = webhook_id.encode()
        sql = "DELETE FROM webhooks WHERE tenant=? AND webhook_id=?"
        args: tuple[object, ...] = (tenant, webhook_id)
        if creator is not None:
            sql, args = sql + " AND creator=?", (*args, creator)

        def op(conn: Connection) -> Deletion:
            if request_id:
                first = idempotency.replayed(conn, tenant, _DELETE, request_id, key)
                if first is not None:
                    # The owner check comes first: another credential repeating the owner's
                    # request_id is told the webhook is missing, not that it deleted it.
                    if creator is None or first.decode() == creator:
                        return Deletion.REPLAYED
                    return Deletion.MISSING
            row = conn.execute(sql + " RETURNING creator", args).fetchone()
            if row is None:
                return Deletion.MISSING
            conn.execute("DELETE FROM webhook_deliveries WHERE tenant=? AND webhook_id=?", (tenant, webhook_id))
            if request_id:
                # The owner, for the check above once the row is gone.
                idempotency.remember(conn, tenant, _DELETE, (request_id, key), str(row[0]).encode(), now_us=now_us)
            return Deletion.DELETED

        return await self._write(op)

    async def all_webhooks(self, tenant: str | None = None) -> list[StoredWebhook]:
        """Every webhook with its secret and scope (of one tenant, when given): the dispatcher's cache."""
        sql = "SELECT body, secret, session_scope FROM webhooks"
        args: tuple[object, ...] = ()
        if tenant is not None:
            sql += " WHERE tenant=?"
            args = (tenant,)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [
            StoredWebhook(webhook_pb2.Webhook.FromString(body), bytes(secret or b""), scope)
            for body, secret, scope in rows
        ]

    async def session_owner(self, tenant: str, session_id: str) -> str | None:
        """The credential that created the session, None when unknown; cached (SessionTables, which
        the store mixes in, has it: the dispatcher asks it which sessions' events a webhook may get)."""
        raise NotImplementedError

    # -- deliveries -----------------------------------------------------------

    async def insert_deliveries(self, rows: Sequence[NewDelivery], *, owner: str = "", lease_until_us: int = 0) -> int:
        """Queue deliveries as PENDING, leased to `owner`, in one write; returns how many were inserted.

        A row whose webhook was deleted meanwhile is skipped: it could never
        be attempted and would only linger.
        """

        def op(conn: Connection) -> int:
            inserted = conn.executemany(
                "INSERT INTO webhook_deliveries (delivery_id, tenant, webhook_id, event_id, event_type, state,"
                " next_attempt_us, create_us, update_us, payload, owner, lease_until_us)"
                " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
                " WHERE EXISTS (SELECT 1 FROM webhooks WHERE tenant=? AND webhook_id=?)",
                [
                    (
                        r.delivery_id,
                        r.tenant,
                        r.webhook_id,
                        r.event_id,
                        r.event_type,
                        PENDING,
                        r.create_us,
                        r.create_us,
                        r.create_us,
                        r.payload,
                        owner,
                        lease_until_us,
                        r.tenant,
                        r.webhook_id,
                    )
                    for r in rows
                ],
            ).rowcount
            return inserted

        return await self._write(op)

    async def claim_deliveries(
        self, owner: str, *, now_us: int, lease_until_us: int, expired_only: bool = True
    ) -> list[DueDelivery]:
        """Take over PENDING and RETRYING deliveries whose lease expired (or all), soonest due first."""

        def op(conn: Connection) -> list[DueDelivery]:
            sql = "UPDATE webhook_deliveries SET owner=?, lease_until_us=? WHERE state IN (1, 2)"
            args: list[object] = [owner, lease_until_us]
            if expired_only:
                sql += " AND lease_until_us<?"
                args.append(now_us)
            sql += " RETURNING delivery_id, tenant, webhook_id, next_attempt_us"
            rows = conn.execute(sql, args).fetchall()
            return sorted((DueDelivery(*row) for row in rows), key=lambda d: d.next_attempt_us or 0)

        return await self._write(op)

    async def renew_delivery_leases(self, owner: str, lease_until_us: int) -> None:
        """Extend the leases of `owner`'s unfinished deliveries."""
        sql = "UPDATE webhook_deliveries SET lease_until_us=? WHERE owner=? AND state IN (1, 2)"
        await self._write(lambda conn: conn.execute(sql, (lease_until_us, owner)))

    async def release_delivery_leases(self, owner: str) -> None:
        """Let other processes take `owner`'s unfinished deliveries at once."""
        sql = "UPDATE webhook_deliveries SET lease_until_us=0 WHERE owner=? AND state IN (1, 2)"
        await self._write(lambda conn: conn.execute(sql, (owner,)))

    async def unfinished_deliveries(self) -> list[DueDelivery]:
        """PENDING and RETRYING deliveries of every tenant, soonest due first (dispatchers claim theirs)."""
        # Literal states, matching the partial index's condition, so SQLite uses it.
        sql = (
            "SELECT delivery_id, tenant, webhook_id, next_attempt_us FROM webhook_deliveries"
            " WHERE state IN (1, 2) ORDER BY next_attempt_us"
        )
        rows = await self._read(lambda conn: conn.execute(sql).fetchall())
        return [DueDelivery(*row) for row in rows]

    async def delivery_for_attempt(self, delivery_id: str) -> AttemptInput | None:
        """State, attempts so far and body of a delivery; None once it is gone."""
        row = await self._lookup(
            "SELECT state, attempts, event_id, event_type, payload FROM webhook_deliveries WHERE delivery_id=?",
            (delivery_id,),
        )
        return None if row is None else AttemptInput(row[0], row[1], row[2], row[3], bytes(row[4]))

    async def record_attempt(self, record: AttemptRecord) -> bool:
        """Write an attempt's outcome; False when the delivery is gone or already finished."""

        def op(conn: Connection) -> bool:
            updated = conn.execute(
                "UPDATE webhook_deliveries SET state=?, attempts=?, last_status_code=?, last_error=?,"
                " last_duration_us=?, next_attempt_us=?, update_us=? WHERE delivery_id=? AND state IN (?, ?)",
                (
                    record.state,
                    record.attempts,
                    record.last_status_code,
                    record.last_error,
                    record.last_duration_us,
                    record.next_attempt_us,
                    record.update_us,
                    record.delivery_id,
                    *UNFINISHED,
                ),
            ).rowcount
            return updated > 0

        return await self._write(op)

    async def purge_finished_deliveries(self, before_us: int) -> int:
        """Delete SUCCEEDED and DEAD_LETTERED deliveries last changed before `before_us`; rows removed."""
        # Literal states, matching the partial index's condition, so SQLite uses it.
        sql = "DELETE FROM webhook_deliveries WHERE state IN (3, 4) AND update_us < ?"
        return await self._write(lambda conn: conn.execute(sql, (before_us,)).rowcount)

    async def purge_deliveries_beyond(
        self,
        keep: int,
        *,
        finished_since_us: int = 0,
        batch: int = 10_000,
        batches: int = 1,
        capped: list[tuple[str, str]] | None = None,
    ) -> int:
        """Delete the finished deliveries of each webhook past its newest `keep` (finished or not), at
        most `batches` writes of `batch` per webhook and call, oldest first; rows removed. A larger
        backlog goes over several calls, so that other writes share the writer between them: the
        (tenant, webhook_id) of each webhook that may have more left is added to `capped`.

        With `finished_since_us`, only webhooks with a delivery finished since then are looked at, so
        a purge round need not walk every webhook's deliveries, only the busy ones'. A webhook's
        deliveries pass `keep` as new ones are made, and those finish (delivered, or dead-lettered
        after their retries): its excess is then seen at the round after. One whose new deliveries
        stay unfinished waits for a round that looks at every webhook."""

        def beyond(conn: Connection) -> list[tuple[str, str, int, str]]:
            if finished_since_us:
                # Literal states, matching the partial index's condition, so SQLite uses it.
                hooks = conn.execute(
                    "SELECT DISTINCT tenant, webhook_id FROM webhook_deliveries"
                    " WHERE state IN (3, 4) AND update_us >= ?",
                    (finished_since_us,),
                ).fetchall()
            else:
                hooks = conn.execute("SELECT tenant, webhook_id FROM webhooks").fetchall()
            # One walk of at most `keep` index entries per webhook, through (tenant, webhook_id, create_us).
            found = []
            for tenant, webhook_id in hooks:
                row = conn.execute(
                    "SELECT create_us, delivery_id FROM webhook_deliveries WHERE tenant=? AND webhook_id=?"
                    " ORDER BY create_us DESC, delivery_id DESC LIMIT 1 OFFSET ?",
                    (tenant, webhook_id, keep),
                ).fetchone()
                if row is not None:
                    found.append((str(tenant), str(webhook_id), int(row[0]), str(row[1])))
            return found

        removed = 0
        for tenant, webhook_id, create_us, delivery_id in await self._read(beyond):
            args = (tenant, webhook_id, create_us, create_us, delivery_id, batch)
            sql = (
                "DELETE FROM webhook_deliveries WHERE delivery_id IN (SELECT delivery_id FROM webhook_deliveries"
                " WHERE tenant=? AND webhook_id=? AND state IN (3, 4)"
                " AND (create_us<? OR (create_us=? AND delivery_id<=?)) ORDER BY create_us LIMIT ?)"
            )
            for _ in range(batches):
                gone = await self._write(lambda conn, args=args, sql=sql: conn.execute(sql, args).rowcount)  # type: ignore[misc]
                removed += gone
                if gone < batch:
                    break
            else:
                if capped is not None:
                    capped.append((tenant, webhook_id))
        return removed

    async def list_deliveries(
        self, tenant: str, webhook_id: str, *, state: int, after: tuple[int, str] | None, limit: int
    ) -> list[webhook_pb2.WebhookDelivery]:
        """A webhook's deliveries, newest first, in `state` when non-zero, after the (create_us, id) cursor."""
        sql = f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant=? AND webhook_id=?"  # noqa: S608 - constant columns
        args: list[object] = [tenant, webhook_id]
        if state:
            sql += " AND state=?"
            args.append(state)
        if after is not None:
            sql += " AND (create_us, delivery_id) < (?, ?)"
            args.extend(after)
        sql += " ORDER BY create_us DESC, delivery_id DESC LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [_delivery(row) for row in rows]

    async def redeliver(
        self,
        tenant: str,
        webhook_id: str,
        delivery_id: str,
        now_us: int,
        idempotency_key: tuple[str, bytes] | None,
    ) -> IdempotentResult | None:
        """Queue a dead-lettered delivery again with a fresh attempt budget.

        `response` is the updated WebhookDelivery; None when there is no such
        delivery; raises NotDeadLettered for one in another state.
        """

        # Returns the blocking state (an int) rather than raising inside the write,
        # which the store would log as a failed write.
        def op(conn: Connection) -> IdempotentResult | int | None:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _REDELIVER, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
            key = (tenant, webhook_id, delivery_id)
            row = conn.execute(
                "SELECT state FROM webhook_deliveries WHERE tenant=? AND webhook_id=? AND delivery_id=?", key
            ).fetchone()
            if row is None:
                return None
            if row[0] != DEAD_LETTERED:
                return int(row[0])
            # attempts restarts at 0: the budget (and the attempt header) count afresh.
            conn.execute(
                "UPDATE webhook_deliveries SET state=?, attempts=0, next_attempt_us=?, update_us=? WHERE delivery_id=?",
                (PENDING, now_us, now_us, delivery_id),
            )
            selected = conn.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE delivery_id=?",  # noqa: S608 - constant columns
                (delivery_id,),
            ).fetchone()
            body = _delivery(selected).SerializeToString()
            if idempotency_key is not None:
                idempotency.remember(conn, tenant, _REDELIVER, idempotency_key, body, now_us=now_us)
            return IdempotentResult(body, replayed=False)

        result = await self._write(op)
        if isinstance(result, int):
            raise NotDeadLettered(result)
        return result
