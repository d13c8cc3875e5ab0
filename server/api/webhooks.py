"""WebhookService: register webhooks, inspect and redeliver their deliveries.

Delivery itself is the dispatcher's (`server/webhooks/dispatcher.py`); this
service keeps its webhook cache current and hands it redeliveries. Secrets
are write-only: stored apart from the webhook and never returned.

A webhook belongs to the credential that registered it, as a session does:
another credential of the tenant without the admin role finds it missing,
and one registered without the admin role receives only what that
credential could stream (events outside sessions, and of its own sessions).
"""

from __future__ import annotations

from flowport.server import pagination
from flowport.server.api.common import check_request_id, idempotency_key, request_id_reused, require
from flowport.server.api.sessions import credential_of, session_scope
from flowport.server.clock import now_us, timestamp
from flowport.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from flowport.server.errors import shown as show_value
from flowport.server.events.bus import EventBus
from flowport.server.ids import new_id
from flowport.server.settings import Settings
from flowport.server.storage import Deletion, IdempotencyConflict
from flowport.server.storage.webhooks import NotDeadLettered, WebhookExists, WebhookTables
from flowport.server.tenancy import principal_of, tenant_of
from flowport.server.types import Context
from flowport.server.webhooks.dispatcher import WebhookDispatcher
from flowport.server.webhooks.validation import kept_headers, webhook_problems
from flowport.v1 import webhook_pb2, webhook_pb2_grpc

W = webhook_pb2
_STATES = W.WebhookDelivery.State


HIDDEN = "***"


def shown(webhook: W.Webhook) -> W.Webhook:
    """The webhook as callers see it: header values are write-only, like the secret.

    They typically carry a receiver's credentials (an Authorization header),
    which must not be readable by everyone who may list the tenant's webhooks.
    """
    for name in webhook.headers:
        webhook.headers[name] = HIDDEN
    return webhook


class WebhookService(webhook_pb2_grpc.WebhookServiceServicer):
    """Webhooks on the store, scoped by tenant."""

    def __init__(self, store: WebhookTables, dispatcher: WebhookDispatcher, bus: EventBus, settings: Settings) -> None:
        self._store = store
        self._dispatcher = dispatcher
        # webhook.created / webhook.deleted: every process (through Redis)
        # reloads the tenant's webhooks; webhook.failed comes from the dispatcher.
        self._bus = bus
        self._allowlist = settings.webhook_target_allowlist

    async def CreateWebhook(self, request: W.CreateWebhookRequest, context: Context) -> W.Webhook:
        given = request.webhook
        check_request_id(request.request_id)
        problems = webhook_problems(given, self._allowlist)
        if problems:
            raise InvalidArgument(
                "webhook is not valid: " + "; ".join(f"{f} {d}" for f, d in problems), violations=problems
            )
        tenant = tenant_of(context)
        principal = principal_of(context)
        creator = credential_of(principal) if principal is not None else ""
        webhook = W.Webhook(
            webhook_id=given.webhook_id or new_id("whk"),
            url=given.url,
            # Order kept, repeats dropped: the set is what matters.
            event_types=list(dict.fromkeys(given.event_types)),
            headers=kept_headers(dict(given.headers)),
            has_secret=bool(given.secret),
            description=given.description,
            tenant=tenant,
            create_time=timestamp(now_us()),
            creator=creator,
        )
        key = idempotency_key(request.request_id, W.CreateWebhookRequest(webhook=given))
        try:
            # An admin's webhook gets every session's events; anyone else's, what it may stream.
            result = await self._store.create_webhook(
                tenant, webhook, given.secret.encode(), key, session_scope=session_scope(context)
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "with a different webhook") from None
        except WebhookExists:
            raise AlreadyExists(
                f"webhook {show_value(webhook.webhook_id)} already exists",
                reason="WEBHOOK_ALREADY_EXISTS",
                metadata={"webhook_id": webhook.webhook_id},
            ) from None
        created = W.Webhook.FromString(result.response)
        if result.replayed and created.creator != creator:
            # Another credential's key: its webhook is not this caller's to see.
            raise request_id_reused(request.request_id, "by another credential")
        if not result.replayed:
            await self._dispatcher.webhooks_changed(tenant)
            self._bus.publish("webhook.created", tenant=tenant, data={"webhook_id": created.webhook_id})
        return shown(created)

    async def GetWebhook(self, request: W.GetWebhookRequest, context: Context) -> W.Webhook:
        require(request.webhook_id, "webhook_id")
        webhook = await self._store.get_webhook(tenant_of(context), request.webhook_id, session_scope(context))
        if webhook is None:
            raise webhook_not_found(request.webhook_id)
        return shown(webhook)

    async def ListWebhooks(self, request: W.ListWebhooksRequest, context: Context) -> W.ListWebhooksResponse:
        size = pagination.page_size(request.page_size)
        filters: dict[str, object] = {}
        after = pagination.cursor_str(pagination.decode_token(request.page_token, filters))
        # Every webhook of the tenant for an admin; anyone else lists what it registered.
        rows = await self._store.list_webhooks(
            tenant_of(context), after=after, limit=size + 1, creator=session_scope(context)
        )
        webhooks, token = pagination.page(rows, size, filters, lambda w: [w.webhook_id])
        return W.ListWebhooksResponse(webhooks=[shown(w) for w in webhooks], next_page_token=token)

    async def DeleteWebhook(self, request: W.DeleteWebhookRequest, context: Context) -> W.DeleteWebhookResponse:
        require(request.webhook_id, "webhook_id")
        check_request_id(request.request_id)
        tenant = tenant_of(context)
        try:
            deleted = await self._store.delete_webhook(
                tenant, request.webhook_id, now_us(), request.request_id, creator=session_scope(context)
            )
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to delete another webhook") from None
        if not deleted.done:
            raise webhook_not_found(request.webhook_id)
        await self._dispatcher.webhooks_changed(tenant)
        if deleted is Deletion.DELETED:
            self._bus.publish("webhook.deleted", tenant=tenant, data={"webhook_id": request.webhook_id})
        return W.DeleteWebhookResponse(message="Webhook unregistered")

    async def ListWebhookDeliveries(
        self, request: W.ListWebhookDeliveriesRequest, context: Context
    ) -> W.ListWebhookDeliveriesResponse:
        require(request.webhook_id, "webhook_id")
        if request.state not in _STATES.values():
            raise InvalidArgument(
                f"state {request.state} is not a delivery state", violations=[("state", "not a delivery state")]
            )
        size = pagination.page_size(request.page_size)
        filters = {"webhook_id": request.webhook_id, "state": request.state}
        after = pagination.cursor_time_id(pagination.decode_token(request.page_token, filters))
        tenant = tenant_of(context)
        if await self._store.get_webhook(tenant, request.webhook_id, session_scope(context)) is None:
            raise webhook_not_found(request.webhook_id)
        rows = await self._store.list_deliveries(
            tenant, request.webhook_id, state=request.state, after=after, limit=size + 1
        )
        deliveries, token = pagination.page(
            rows, size, filters, lambda d: [d.create_time.ToMicroseconds(), d.delivery_id]
        )
        return W.ListWebhookDeliveriesResponse(deliveries=deliveries, next_page_token=token)

    async def RedeliverWebhookDelivery(
        self, request: W.RedeliverWebhookDeliveryRequest, context: Context
    ) -> W.WebhookDelivery:
        require(request.webhook_id, "webhook_id")
        require(request.delivery_id, "delivery_id")
        tenant = tenant_of(context)
        key = idempotency_key(
            request.request_id,
            W.RedeliverWebhookDeliveryRequest(webhook_id=request.webhook_id, delivery_id=request.delivery_id),
        )
        if await self._store.get_webhook(tenant, request.webhook_id, session_scope(context)) is None:
            raise webhook_not_found(request.webhook_id)
        try:
            result = await self._store.redeliver(tenant, request.webhook_id, request.delivery_id, now_us(), key)
        except IdempotencyConflict:
            raise request_id_reused(request.request_id, "to redeliver another delivery") from None
        except NotDeadLettered as exc:
            state = _STATES.Name(_STATES.ValueType(exc.state))
            raise FailedPrecondition(
                f"delivery {show_value(request.delivery_id)} is {state}; "
                "only a dead-lettered delivery can be redelivered",
                reason="DELIVERY_NOT_DEAD_LETTERED",
                metadata={"delivery_id": request.delivery_id, "state": state},
            ) from None
        if result is None:
            raise NotFound(
                f"webhook {show_value(request.webhook_id)} has no delivery {show_value(request.delivery_id)}",
                reason="DELIVERY_NOT_FOUND",
                metadata={"webhook_id": request.webhook_id, "delivery_id": request.delivery_id},
            )
        if not result.replayed:
            self._dispatcher.redelivered(tenant, request.webhook_id, request.delivery_id)
        return W.WebhookDelivery.FromString(result.response)


def webhook_not_found(webhook_id: str) -> NotFound:
    """NOT_FOUND for a webhook that does not exist, or is another tenant's or (admins excepted) another credential's."""
    return NotFound(
        f"webhook {show_value(webhook_id)} does not exist",
        reason="WEBHOOK_NOT_FOUND",
        metadata={"webhook_id": webhook_id},
    )
