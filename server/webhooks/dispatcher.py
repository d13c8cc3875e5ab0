"""The webhook dispatcher: from published events to durable, retried deliveries.

Flow:

- `on_event` runs inside `EventBus.publish`, so it only matches the event
  against the cached webhooks of its tenant and appends to an inbox; it
  never awaits, writes or serializes.
- One flusher task (started on demand) turns the inbox into delivery rows,
  written in one awaited store write per batch (group-committed with
  everything else). Only then is a delivery scheduled: no attempt is made
  for a row that is not durable.
- A webhook registered without the admin role gets only what its
  credential could stream: events outside sessions and those of its own
  sessions (the flusher asks the store's session-owner cache, once per
  session in a batch), and `webhook.failed` of its credential's webhooks.
  An admin's webhook gets every event of its tenant.
- Each webhook has a lane: ready deliveries and at most
  `webhook_concurrency_per_target` worker tasks, so a slow receiver holds up
  only its own lane. Retries wait on loop timers (exponential backoff with
  full jitter, or Retry-After), never in a worker.
- The delivery row is the truth: each attempt reads its state and attempt
  count first and writes its outcome after. A delivery whose row is gone
  (webhook deleted) or finished is simply forgotten.
- At start, PENDING and RETRYING rows are scheduled at their due time, so a
  delivery survives a restart. An attempt cut off by a shutdown is made
  again: delivery is at least once, and receivers dedupe on
  `X-Flowport-Delivery-Id`.
- While the store is unavailable (its database restarting), nothing is lost
  and nothing floods the log: the flusher keeps what it could not write (the
  rows, with their ids, or the events whose sessions it could not look up)
  and tries again every RETRY_UNAVAILABLE seconds, behind which new events
  wait in the inbox; an attempt that cannot read or record its row is made
  again a second later; a webhook change that cannot be reloaded is reloaded
  again. All of it is said once, then once a minute (`Failures`), then when
  the store works again. Only a stop during the outage loses what is held
  (counted in `lost`, shown as GetStats' `webhooks.lost` and the Prometheus
  outcome `lost`, and said once), or a write of kept rows that fails for
  another reason without having committed (their attempts find no row:
  each counted lost and logged).

In memory the dispatcher holds a small record per unfinished delivery (ids
and a timer), never its body (but for rows waiting for the store to come
back). A tenant holds at most `--tenant-max-pending-deliveries` of them in a
process, those in the inbox and those waiting for the store included: past
it, its new deliveries are dropped and counted instead of queued, so
receivers that never answer (each delivery lives through every retry), or a
database away for long, cannot grow this process's memory and the store
without bound. The events stay in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from flowport.server.clock import now_us
from flowport.server.errors import Unavailable
from flowport.server.events.bus import BusEvent, EventBus, Subscription
from flowport.server.events.kailash import Selection
from flowport.server.ids import new_id
from flowport.server.leases import Leases
from flowport.server.observability import tracing
from flowport.server.periodic import Failures
from flowport.server.resolver import RESOLVING_FOR
from flowport.server.settings import Settings
from flowport.server.storage.webhooks import (
    DEAD_LETTERED,
    RETRYING,
    SUCCEEDED,
    UNFINISHED,
    AttemptRecord,
    NewDelivery,
    StoredWebhook,
    WebhookTables,
)
from flowport.server.tenant_shares import TenantShares
from flowport.server.webhooks.delivery import Outcome, Target, attempt, backoff, event_body
from flowport.v1 import gateway_pb2

if TYPE_CHECKING:
    from flowport.server.observability.prometheus import Prometheus

log = logging.getLogger(__name__)
# Published by WebhookService; every process reloads the tenant's webhooks.
CHANGE_EVENTS = frozenset({"webhook.created", "webhook.deleted"})

FAILED_EVENT = "webhook.failed"
Key = tuple[str, str]  # (tenant, webhook_id)
# Seconds between two warnings of a tenant's dropped deliveries.
DROP_WARNING_INTERVAL = 60.0
# Seconds between tries to write what the store could not take (its database away), and to make an
# attempt again that could not read or record its row.
RETRY_UNAVAILABLE = 1.0


@dataclass(frozen=True, slots=True)
class _Hook:
    """A cached webhook: what to match events against and where to send them."""

    key: Key
    types: Selection
    target: Target
    # The credential that registered it, and whose sessions' events it gets (None: every session's).
    creator: str
    scope: str | None

    @classmethod
    def of(cls, stored: StoredWebhook) -> _Hook:
        webhook = stored.webhook
        return cls(
            key=(webhook.tenant, webhook.webhook_id),
            types=Selection.of(webhook.event_types),
            target=Target(httpx.URL(webhook.url), dict(webhook.headers), stored.secret),
            creator=webhook.creator,
            scope=stored.session_scope,
        )

    def wants(self, event: BusEvent) -> bool:
        # A webhook never hears about its own failed deliveries: that
        # delivery would most likely fail too, and report itself again.
        if event.type == FAILED_EVENT and (event.data or {}).get("webhook_id") == self.key[1]:
            return False
        # Webhook changes are for event streams (and for the other processes'
        # dispatchers), not for the receivers themselves.
        if event.type in CHANGE_EVENTS:
            return False
        return self.types.hears(event.type)

    def view(self, event: BusEvent) -> BusEvent:
        """The event as this webhook gets it: itself, or (asked for by a Kailash name only) its
        copy under that name. One delivery per event, whatever the number of names that match."""
        return self.types.views(event)[0]


@dataclass(eq=False, slots=True)
class _Pending:
    """An unfinished delivery the dispatcher is responsible for."""

    delivery_id: str
    key: Key
    timer: asyncio.TimerHandle | None = None
    dropped: bool = False
    # Its row's write failed after an outage and may never have committed: a missing row is then
    # a lost delivery, not one deleted meanwhile.
    unconfirmed: bool = False


@dataclass(eq=False, slots=True)
class _Lane:
    """One webhook's ready deliveries and how many workers serve them."""

    ready: deque[_Pending] = field(default_factory=deque)
    active: int = 0


class WebhookDispatcher:
    """Delivers every published event to the webhooks of its tenant that want it."""

    def __init__(
        self,
        store: WebhookTables,
        bus: EventBus,
        http: httpx.AsyncClient,
        settings: Settings,
        *,
        initial_backoff: float = 1.0,
        leases: Leases | None = None,
        exclusive: bool = True,
        tenant_share: int | None = None,
    ) -> None:
        """`tenant_share`: deliveries one tenant may have in flight at once, over all its
        webhooks (None: no cap beyond each webhook's webhook_concurrency_per_target)."""
        self._store = store
        # A tenant's many webhooks to slow receivers hold at most its share of the shared client's
        # connections; its further deliveries wait for one of its own places, not another tenant's.
        self._shares = TenantShares(tenant_share) if tenant_share is not None else None
        self._bus = bus
        # Unfinished deliveries are leased to this process (server/leases.py):
        # others take over those of a process that died.
        self._leases = leases or Leases()
        self._exclusive = exclusive
        self._background: list[asyncio.Task[None]] = []
        self._http = http
        self._max_attempts = settings.webhook_max_attempts
        self._timeout = settings.webhook_timeout
        self._max_backoff = settings.webhook_max_backoff
        self._concurrency = settings.webhook_concurrency_per_target
        self._tenant_max_pending = settings.tenant_max_pending_deliveries or None
        # Per tenant: its deliveries in _pending, and those in the inbox not yet scheduled.
        self._tenant_pending: Counter[str] = Counter()
        self._tenant_inboxed: Counter[str] = Counter()
        self._drop_warned: dict[str, float] = {}
        self._allowlist = settings.webhook_target_allowlist
        self._initial_backoff = initial_backoff
        self._hooks: dict[Key, _Hook] = {}
        self._by_tenant: dict[str, list[_Hook]] = {}
        self._generations: defaultdict[str, int] = defaultdict(int)
        self._inbox: list[tuple[BusEvent, list[_Hook]]] = []
        # Rows the store could not take (unavailable): written again, with the same ids, before the inbox.
        self._unwritten: list[NewDelivery] = []
        self._flusher: asyncio.Task[None] | None = None
        # Set by close: the flusher stops waiting for the store and tries once more.
        self._closing = asyncio.Event()
        # The store unavailable, for the flusher, the attempts and the reloads alike: said once,
        # then once a minute, then once it has worked for a few seconds (its connections come
        # back one at a time); never once per event or per delivery.
        self._store_failures = Failures(log, "reading and writing webhook deliveries")
        self._pending: dict[str, _Pending] = {}
        self._lanes: dict[Key, _Lane] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._closed = False
        self._last_create_us = 0
        self.delivered = 0
        # The same outcomes by (tenant, outcome), for a tenant's GetStats.
        self.tenant_outcomes: Counter[tuple[str, str]] = Counter()
        # Set by the app when /metrics is on (server/observability/prometheus.py).
        self.prometheus: Prometheus | None = None
        self.retried = 0
        self.dead_lettered = 0
        # Deliveries that will never be made: held unwritten when the process stopped with the
        # store unavailable, or not written for another reason (a failed write, an event that
        # cannot be encoded, a session whose owner could not be looked up).
        self.lost = 0
        self.dropped = 0  # deliveries not queued: their tenant held its most unfinished

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Load the webhooks and resume the deliveries a previous process left unfinished."""
        by_tenant: defaultdict[str, list[StoredWebhook]] = defaultdict(list)
        for stored in await self._store.all_webhooks():
            by_tenant[stored.webhook.tenant].append(stored)
        for tenant, stored_hooks in by_tenant.items():
            self._install(tenant, stored_hooks)
        resumed = await self._claim(expired_only=not self._exclusive)
        log.info("webhooks: %d registered, %d unfinished deliveries resumed", len(self._hooks), resumed)
        # Another process's webhook changes reach this one as events.
        changes = self._bus.subscribe(lambda e: e.type in CHANGE_EVENTS)
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._follow_changes(changes), name="webhook changes"),
            loop.create_task(self._leases.keep(self._renew_and_claim, "webhook deliveries")),
        ]

    async def _claim(self, *, expired_only: bool) -> int:
        """Take over unfinished deliveries (whose lease expired) and schedule them; how many."""
        now = now_us()
        claimed = await self._store.claim_deliveries(
            self._leases.owner, now_us=now, lease_until_us=self._leases.until(), expired_only=expired_only
        )
        scheduled = 0
        for due in claimed:
            key = (due.tenant, due.webhook_id)
            if key in self._hooks and due.delivery_id not in self._pending:
                self._schedule(_Pending(due.delivery_id, key), (due.next_attempt_us - now) / 1e6)
                scheduled += 1
        return scheduled

    async def _renew_and_claim(self) -> int:
        await self._store.renew_delivery_leases(self._leases.owner, self._leases.until())
        return await self._claim(expired_only=True)

    async def _follow_changes(self, changes: Subscription) -> None:
        try:
            async for event in changes:
                await self._reload(event.tenant)
        finally:
            changes.close()

    async def _reload(self, tenant: str) -> None:
        """webhooks_changed, tried again while the store is unavailable: a change missed would leave
        this process delivering to a deleted webhook, or not to a new one, until it restarts."""
        while True:
            try:
                await self.webhooks_changed(tenant)
            except Unavailable as exc:
                self._store_failures.failed(exc)
                await asyncio.sleep(RETRY_UNAVAILABLE)  # cancelled by close
                continue
            except Exception:
                log.exception("could not reload the webhooks of tenant %s", tenant)  # a bug: the next change reloads
            else:
                self._store_failures.worked()
            return

    async def close(self) -> None:
        """Write the rows of events already received, then stop attempts (resumed at the next start)."""
        self._closed = True
        self._closing.set()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        for pending in self._pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
        self._pending.clear()
        self._tenant_pending.clear()
        self._lanes.clear()
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._store_failures.close()  # nothing calls it any more: no check left pending
        try:
            await self._store.release_delivery_leases(self._leases.owner)
        except Exception:  # noqa: BLE001 - the store may be failing; the leases then simply expire
            log.warning("could not release webhook delivery leases; other processes take over when they expire")

    # -- webhooks ------------------------------------------------------------

    async def webhooks_changed(self, tenant: str) -> None:
        """Reload the tenant's webhooks after a create or delete; deliveries to a deleted one stop."""
        self._generations[tenant] += 1
        generation = self._generations[tenant]
        stored = await self._store.all_webhooks(tenant)
        # Reloads may finish out of order; only the latest one started reflects the latest write.
        if self._generations[tenant] == generation:
            self._install(tenant, stored)

    def _install(self, tenant: str, stored: list[StoredWebhook]) -> None:
        hooks = [_Hook.of(s) for s in stored]
        keys = {hook.key for hook in hooks}
        for old in self._by_tenant.get(tenant, []):
            if old.key not in keys:
                self._hooks.pop(old.key, None)
                self._drop(old.key)
        for hook in hooks:
            self._hooks[hook.key] = hook
        if hooks:
            self._by_tenant[tenant] = hooks
        else:
            self._by_tenant.pop(tenant, None)

    def _drop(self, key: Key) -> None:
        """Forget every delivery to a deleted webhook (the store deleted their rows)."""
        for pending in [p for p in self._pending.values() if p.key == key]:
            pending.dropped = True
            self._forget(pending)
        self._lanes.pop(key, None)

    # -- events --------------------------------------------------------------

    def on_event(self, event: BusEvent) -> None:
        """Bus listener: queue deliveries of `event`. Never blocks, never raises."""
        if self._closed:
            return
        try:
            hooks = [
                hook for hook in self._by_tenant.get(event.tenant, ()) if hook.wants(event) and self._hears(hook, event)
            ]
            if not hooks:
                return
            if self._tenant_max_pending is not None:
                held = self._tenant_pending[event.tenant] + self._tenant_inboxed[event.tenant]
                room = max(self._tenant_max_pending - held, 0)
                if len(hooks) > room:
                    self._count_dropped(event.tenant, len(hooks) - room)
                    hooks = hooks[:room]
                    if not hooks:
                        return
                self._tenant_inboxed[event.tenant] += len(hooks)
            self._inbox.append((event, hooks))
            if self._flusher is None:
                # A context of its own: deliveries serve many tenants, not the publisher's call
                # (its log fields, its trace, which must not reach another tenant's receiver).
                self._flusher = asyncio.get_running_loop().create_task(self._flush(), context=contextvars.Context())
        except Exception:  # a raising listener would break publish for everyone
            log.exception("could not queue webhook deliveries of event %s", event.id)

    def _count_dropped(self, tenant: str, dropped: int) -> None:
        """Count (and now and then log) `dropped` deliveries of `tenant` never queued."""
        self.dropped += dropped
        self.tenant_outcomes[(tenant, "dropped")] += dropped
        if self.prometheus is not None:
            self.prometheus.webhook_deliveries.labels("dropped").inc(dropped)
        now = time.monotonic()
        if now - self._drop_warned.get(tenant, -DROP_WARNING_INTERVAL) >= DROP_WARNING_INTERVAL:
            if len(self._drop_warned) >= 65_536:
                self._drop_warned.clear()
            self._drop_warned[tenant] = now
            log.warning(
                "tenant %s holds its most of %d unfinished webhook deliveries in this process: new ones are "
                "dropped (its receivers are slow or down, or the store is unavailable; %d dropped so far)",
                tenant,
                self._tenant_max_pending,
                self.tenant_outcomes[(tenant, "dropped")],
            )

    def _hears(self, hook: _Hook, event: BusEvent) -> bool:
        """Whether `hook` may hear of another webhook's failure: an admin's of any, else only of
        its own credential's (a webhook deleted meanwhile: the admins' alone)."""
        if hook.scope is None or event.type != FAILED_EVENT:
            return True
        failed = self._hooks.get((event.tenant, str((event.data or {}).get("webhook_id", ""))))
        return failed is not None and failed.creator == hook.scope

    async def _visible(self, batch: list[tuple[BusEvent, list[_Hook]]]) -> list[tuple[BusEvent, list[_Hook]]]:
        """The batch without the events of sessions a webhook's credential may not see: as in a
        stream, a webhook registered without the admin role gets those of its own sessions only.
        Raises Unavailable when the store is (the batch is then looked at again later)."""
        owners: dict[Key, str | None] = {}
        unknown: set[Key] = set()
        kept: list[tuple[BusEvent, list[_Hook]]] = []
        # Counted once the whole batch is looked at: one raising Unavailable is looked at again.
        lost: Counter[str] = Counter()
        for event, hooks in batch:
            allowed = hooks
            if event.session_id and any(hook.scope is not None for hook in hooks):
                key = (event.tenant, event.session_id)
                if key not in owners:
                    try:
                        # The store's cache: a round trip only for a session it has not seen yet.
                        owners[key] = await self._store.session_owner(*key)
                    except Unavailable:
                        raise
                    except Exception:
                        log.exception("could not look up the owner of session %s", event.session_id)
                        owners[key] = None
                        unknown.add(key)
                owner = owners[key]
                # An unknown owner (the session's rows all removed) is the admins' alone.
                allowed = [hook for hook in hooks if hook.scope is None or hook.scope == owner]
                if key in unknown and len(allowed) < len(hooks):
                    lost[event.tenant] += len(hooks) - len(allowed)
            if allowed:
                kept.append((event, allowed))
        for tenant, count in lost.items():
            self._count_lost(tenant, count)
        return kept

    async def _flush(self) -> None:
        kept = False  # since the last round that wrote, what the store could not take has been kept
        try:
            while self._inbox or self._unwritten:
                written = await self._write_round()
                if written is not None:
                    if kept:
                        kept = False
                        log.warning("queued %d webhook deliveries kept while the store was unavailable", written)
                    continue
                # The store is unavailable: what could not be written is kept, and new events wait
                # in the inbox (the tenants' caps count both), until the next try.
                kept = True
                if self._closed:
                    self._give_up()
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_UNAVAILABLE):
                        await self._closing.wait()  # a close tries once more at once
        finally:
            self._flusher = None

    async def _write_round(self) -> int | None:
        """Write the rows kept from an earlier round, then what is in the inbox, and say how many;
        None, with what was not written kept (the kept rows, then the inbox, in order), when the
        store is unavailable."""
        written = 0
        if self._unwritten:
            held, self._unwritten = self._unwritten, []
            inserted = await self._insert(held, again=True)
            if inserted is None:
                return None
            written += inserted
        if not self._inbox:
            return written
        batch, self._inbox = self._inbox, []
        requeued = False
        try:
            try:
                visible = await self._visible(batch)
            except Unavailable as exc:
                self._store_failures.failed(exc)
                self._inbox[:0] = batch  # before what came meanwhile, and still counted in the inbox
                requeued = True
                return None
            inserted = await self._insert(self._rows(visible), again=False)
            return None if inserted is None else written + inserted
        finally:
            # Counted in the inbox until scheduled (in _tenant_pending from then on), or kept as rows.
            if not requeued:
                for event, hooks in batch:
                    self._inboxed(event.tenant, -len(hooks))

    async def _insert(self, rows: list[NewDelivery], *, again: bool) -> int | None:
        """Write `rows` and schedule them; how many, or None, with them kept (and counted in the
        inbox), when the store is unavailable. `again`: rows kept from an earlier try, counted in
        the inbox till now."""
        try:
            await self._store.insert_deliveries(rows, owner=self._leases.owner, lease_until_us=self._leases.until())
        except Unavailable as exc:
            self._store_failures.failed(exc)
            self._unwritten[:0] = rows
            if not again:
                for row in rows:
                    self._inboxed(row.tenant, 1)
            return None
        except Exception:
            if not again:
                for tenant, lost in Counter(row.tenant for row in rows).items():
                    self._count_lost(tenant, lost)
                log.exception("could not queue %d webhook deliveries", len(rows))
                return 0
            # The write of them that failed may have committed before its connection broke: then
            # they are there, and this one fails. Each attempt reads its row first, and forgets a
            # delivery whose row is not there.
            log.warning("could not queue %d webhook deliveries again: delivering those already stored", len(rows))
            unconfirmed = True
        else:
            self._store_failures.worked()
            unconfirmed = False
        if again:
            for row in rows:
                self._inboxed(row.tenant, -1)
        # Once closed, the rows wait for the next start.
        for row in rows:
            self._schedule(_Pending(row.delivery_id, (row.tenant, row.webhook_id), unconfirmed=unconfirmed), 0.0)
        return len(rows)

    def _count_lost(self, tenant: str, lost: int) -> None:
        """Count `lost` deliveries of `tenant` that will never be made (their callers log why)."""
        self.lost += lost
        self.tenant_outcomes[(tenant, "lost")] += lost
        if self.prometheus is not None:
            self.prometheus.webhook_deliveries.labels("lost").inc(lost)

    def _inboxed(self, tenant: str, delta: int) -> None:
        """Count `delta` more (or fewer) of `tenant`'s deliveries in the inbox or kept for the store."""
        if self._tenant_max_pending is not None:
            self._tenant_inboxed[tenant] += delta
            if self._tenant_inboxed[tenant] <= 0:
                del self._tenant_inboxed[tenant]

    def _give_up(self) -> None:
        """Stopping while the store is unavailable: what is kept is lost (said once)."""
        by_tenant = Counter(row.tenant for row in self._unwritten)
        for event, hooks in self._inbox:
            by_tenant[event.tenant] += len(hooks)
        for tenant, lost in by_tenant.items():
            self._count_lost(tenant, lost)
        kept = by_tenant.total()
        self._unwritten, self._inbox = [], []
        self._tenant_inboxed.clear()
        log.error("stopping with the store unavailable: %d webhook deliveries could not be queued", kept)

    def _rows(self, batch: list[tuple[BusEvent, list[_Hook]]]) -> list[NewDelivery]:
        rows: list[NewDelivery] = []
        for event, hooks in batch:
            bodies: dict[str, bytes] = {}  # by the type delivered: most hooks share the event's own
            for hook in hooks:
                view = hook.view(event)
                try:
                    body = bodies.get(view.type) or bodies.setdefault(view.type, event_body(view))
                except Exception:  # a publisher put something in data that JSON cannot hold
                    self._count_lost(event.tenant, 1)
                    log.exception("event %s (%s) cannot be encoded for webhooks", event.id, event.type)
                    continue
                tenant, webhook_id = hook.key
                rows.append(NewDelivery(new_id("dlv"), tenant, webhook_id, event.id, view.type, body, self._stamp()))
        return rows

    def _stamp(self) -> int:
        """A create time later than every earlier one, so "newest first" is queue order
        even for deliveries queued within the same microsecond."""
        self._last_create_us = max(now_us(), self._last_create_us + 1)
        return self._last_create_us

    def redelivered(self, tenant: str, webhook_id: str, delivery_id: str) -> None:
        """Schedule a delivery the store has just queued again."""
        if (tenant, webhook_id) in self._hooks:
            self._schedule(_Pending(delivery_id, (tenant, webhook_id)), 0.0)

    # -- scheduling ------------------------------------------------------------

    def _schedule(self, pending: _Pending, delay: float) -> None:
        if self._closed or pending.dropped:
            return
        current = self._pending.get(pending.delivery_id)
        if current is not None and current is not pending:
            return  # a fresh row can be seen both by the restart scan and by the flusher
        if current is None:
            self._tenant_pending[pending.key[0]] += 1
        self._pending[pending.delivery_id] = pending
        if delay <= 0:
            self._ready(pending)
        else:
            pending.timer = asyncio.get_running_loop().call_later(delay, self._ready, pending)

    def _ready(self, pending: _Pending) -> None:
        pending.timer = None
        if self._closed or pending.dropped:
            return
        lane = self._lanes.setdefault(pending.key, _Lane())
        lane.ready.append(pending)
        if lane.active < self._concurrency:
            lane.active += 1
            task = asyncio.get_running_loop().create_task(self._work(lane), context=contextvars.Context())
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    def _forget(self, pending: _Pending) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        if self._pending.get(pending.delivery_id) is pending:
            del self._pending[pending.delivery_id]
            tenant = pending.key[0]
            self._tenant_pending[tenant] -= 1
            if self._tenant_pending[tenant] <= 0:
                del self._tenant_pending[tenant]

    async def _work(self, lane: _Lane) -> None:
        try:
            while lane.ready and not self._closed:
                pending = lane.ready.popleft()
                if pending.dropped:
                    continue
                try:
                    await self._deliver(pending)
                except Unavailable as exc:
                    # Its row could not be read or its outcome recorded: made again, said once.
                    self._store_failures.failed(exc)
                    self._schedule(pending, max(self._initial_backoff, RETRY_UNAVAILABLE))
                except Exception:
                    # A bug: keep the delivery, try again later.
                    log.exception("webhook delivery %s failed unexpectedly", pending.delivery_id)
                    self._schedule(pending, max(self._initial_backoff, 1.0))
                else:
                    self._store_failures.worked()
        finally:
            lane.active -= 1

    # -- attempts ------------------------------------------------------------

    async def _deliver(self, pending: _Pending) -> None:
        tenant = pending.key[0]
        # The tenant's place first, then the row and the webhook as they are by then: a webhook
        # deleted or changed while the delivery waited is not sent the old way, and a waiting
        # delivery holds no body.
        slot = contextlib.nullcontext() if self._shares is None else self._shares.slot(tenant)
        async with slot:
            if pending.dropped or self._closed:
                return
            acting = RESOLVING_FOR.set(tenant)  # its lookups are the tenant's (resolver.py)
            try:
                await self._attempt_held(pending, tenant)
            finally:
                RESOLVING_FOR.reset(acting)

    async def _attempt_held(self, pending: _Pending, tenant: str) -> None:
        row = await self._store.delivery_for_attempt(pending.delivery_id)
        hook = self._hooks.get(pending.key)
        if row is None or row.state not in UNFINISHED or hook is None:
            if row is None and pending.unconfirmed and hook is not None:
                # Its write never committed: the delivery will not be made.
                self._count_lost(tenant, 1)
                log.error("webhook delivery %s was never stored and is lost", pending.delivery_id)
            self._forget(pending)
            return
        pending.unconfirmed = False  # its row is there: a later miss is a deletion, not a loss
        number = row.attempts + 1
        attributes = (
            {
                "flowport.tenant": tenant,
                "flowport.webhook_id": pending.key[1],
                "flowport.delivery_id": pending.delivery_id,
                "flowport.event_type": row.event_type,
                "flowport.attempt": number,
            }
            if tracing.enabled()
            else None
        )
        with tracing.span("webhook delivery", kind="client", attributes=attributes) as span:
            outcome = await attempt(
                self._http,
                hook.target,
                body=row.payload,
                event_id=row.event_id,
                delivery_id=pending.delivery_id,
                attempt_number=number,
                timeout=self._timeout,
                allowlist=self._allowlist,
            )
            if span is not None:
                span.set_attribute("http.response.status_code", outcome.status_code)
                if not outcome.ok:
                    tracing.fail(span, outcome.error or f"HTTP {outcome.status_code}")
        state, delay = self._next_step(outcome, number)
        if delay is None:
            # Before the write: a redelivery that follows it must find no stale entry.
            self._forget(pending)
        now = now_us()
        record = AttemptRecord(
            delivery_id=pending.delivery_id,
            state=state,
            attempts=number,
            last_status_code=outcome.status_code,
            last_error=outcome.error,
            last_duration_us=outcome.duration_us,
            next_attempt_us=None if delay is None else now + int(delay * 1e6),
            update_us=now,
        )
        if not await self._store.record_attempt(record):
            self._forget(pending)  # deleted meanwhile
            return
        if state == SUCCEEDED:
            self.delivered += 1
            self._count(tenant, "delivered")
        elif state == RETRYING:
            self.retried += 1
            self._count(tenant, "retried")
            assert delay is not None
            self._schedule(pending, delay)
        else:
            self.dead_lettered += 1
            self._count(tenant, "dead_lettered")
            self._report_failure(pending, row.event_id, row.event_type, record)

    def _count(self, tenant: str, outcome: str) -> None:
        self.tenant_outcomes[(tenant, outcome)] += 1
        if self.prometheus is not None:
            self.prometheus.webhook_deliveries.labels(outcome).inc()

    def _next_step(self, outcome: Outcome, number: int) -> tuple[int, float | None]:
        """The delivery's next state, and the wait before its next attempt if any."""
        if outcome.ok:
            return SUCCEEDED, None
        if not outcome.retryable or number >= self._max_attempts:
            return DEAD_LETTERED, None
        if outcome.retry_after is not None:
            return RETRYING, min(outcome.retry_after, self._max_backoff)
        return RETRYING, backoff(number, self._initial_backoff, self._max_backoff)

    def _report_failure(self, pending: _Pending, event_id: str, event_type: str, record: AttemptRecord) -> None:
        tenant, webhook_id = pending.key
        log.warning(
            "webhook %s: delivery %s of event %s dead-lettered after %d attempts: %s",
            webhook_id,
            pending.delivery_id,
            event_id,
            record.attempts,
            record.last_error,
        )
        if event_type == FAILED_EVENT:
            return  # reporting the failure of a failure report could go on forever
        self._bus.publish(
            FAILED_EVENT,
            tenant=tenant,
            data={
                "webhook_id": webhook_id,
                "delivery_id": pending.delivery_id,
                "event_id": event_id,
                "event_type": event_type,
                "attempts": record.attempts,
                "last_status_code": record.last_status_code,
                "last_error": record.last_error,
            },
        )

    # -- figures ---------------------------------------------------------------

    def stats(self, tenant: str | None = None) -> gateway_pb2.WebhookStats:
        """Counters since start (of `tenant`, or all), for GatewayService.GetStats."""
        if tenant is None:
            return gateway_pb2.WebhookStats(
                delivered=self.delivered,
                retried=self.retried,
                dead_lettered=self.dead_lettered,
                dropped=self.dropped,
                lost=self.lost,
            )
        return gateway_pb2.WebhookStats(
            delivered=self.tenant_outcomes[(tenant, "delivered")],
            retried=self.tenant_outcomes[(tenant, "retried")],
            dead_lettered=self.tenant_outcomes[(tenant, "dead_lettered")],
            dropped=self.tenant_outcomes[(tenant, "dropped")],
            lost=self.tenant_outcomes[(tenant, "lost")],
        )

    @property
    def unfinished(self) -> int:
        """Deliveries waiting for an attempt or being attempted."""
        return len(self._pending)
