"""Webhook deliveries while PostgreSQL cannot be reached (stopped under a running server): events
published meanwhile are delivered once it is back, deliveries being retried go on, a webhook
change announced meanwhile is still picked up, and the outage is logged once (then once a minute),
not as a traceback per event, per batch or per delivery."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from flowport.clients import AsyncClient
from flowport.server import periodic
from flowport.server.app import start, stop
from flowport.server.clock import now_us, timestamp
from flowport.v1 import webhook_pb2
from tests.backends import PostgresServer

from ..conftest import ADMIN_KEY, make_settings
from .test_store_reconnect import _cut  # the way a database goes away under a running server
from .test_webhooks import OK, Receiver, Reply, Seen, eventually

DISPATCHER_LOGGER = "flowport.server.webhooks"


@pytest.mark.timeout(120)
async def test_deliveries_queued_while_the_store_is_away_are_made_when_it_returns(
    tmp_path: Path, postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    answering = threading.Event()

    def unavailable_until_answering(n: int, seen: Seen) -> Reply:
        return (200, {}) if answering.is_set() else (503, {})

    seen, flaky, late = Receiver(OK), Receiver(unavailable_until_answering), Receiver(OK)
    settings = make_settings(
        tmp_path / "data", database_url=postgres_url, webhook_max_backoff=0.5, webhook_max_attempts=50
    )
    running = await start(settings)
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as client:
            for receiver in (seen, flaky):
                webhook = webhook_pb2.Webhook(url=receiver.url(), event_types=["execution.*"])
                await client.webhooks.CreateWebhook(webhook_pb2.CreateWebhookRequest(webhook=webhook))
        # One written as another process would, announced (webhook.created) only once the store is away.
        await running.store.create_webhook(
            "default",
            webhook_pb2.Webhook(
                webhook_id="late",
                tenant="default",
                url=late.url(),
                event_types=["execution.*"],
                create_time=timestamp(now_us()),
            ),
            b"",
            None,
        )

        def publish(n: int) -> str:
            return running.bus.publish("execution.progress", tenant="default", execution_id="exe_1", data={"n": n}).id

        before = [publish(n) for n in range(5)]

        async def retrying() -> bool:
            # Every one of them delivered to the first, and being retried for the second.
            return len(seen.events()) == 5 and {e["id"] for e in flaky.events()} == set(before)

        await eventually(retrying, "the first events delivered, and retried to the flaky receiver")

        with caplog.at_level(logging.INFO, logger=DISPATCHER_LOGGER):
            _cut(postgres_server, database, allow=False)
            try:
                running.bus.publish("webhook.created", tenant="default", data={"webhook_id": "late"})
                during = []
                # One event at a time, for a few seconds: as many batches to queue as events.
                for n in range(5, 25):
                    during.append(publish(n))
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)
            finally:
                _cut(postgres_server, database, allow=True)
            answering.set()

            published = set(before + during)

            async def all_delivered() -> bool:
                return {e["id"] for e in seen.events()} == published and {e["id"] for e in flaky.events()} == published

            try:
                await eventually(all_delivered, "every event's deliveries, made once the store is back", timeout=20)
            except AssertionError as exc:
                got = [len(published & {e["id"] for e in r.events()}) for r in (seen, flaky)]
                raise AssertionError(f"{exc}: of {len(published)} events, {got} reached the receivers") from None
            await asyncio.sleep(periodic.SETTLES + 1.0)  # the end of the outage said too

        said = [r for r in caplog.records if r.name.startswith(DISPATCHER_LOGGER)]
        lines = [r.getMessage() for r in said]
        # The outage with its traceback, the deliveries kept written, the outage over: nothing per event.
        assert len([r for r in said if r.exc_info]) == 1, lines
        assert len(said) <= 3, lines
        assert lines[0].endswith("failed; will retry") and "works again" in lines[-1], lines
        assert running.dispatcher.lost == 0 and running.dispatcher.dropped == 0

        # The change announced while the store was away is loaded once it is back.
        for n in range(100, 140):
            publish(n)
            await asyncio.sleep(0.25)
            if late.events():
                break
        else:
            raise AssertionError("the webhook announced while the store was away never got a delivery")
    finally:
        await stop(running, 2.0)
        for receiver in (seen, flaky, late):
            receiver.close()
