"""Events and webhooks: how fast published events reach many live streams, and how fast
they leave as signed webhook deliveries.

Fan-out: `subscribers` gRPC `StreamEvents` streams (types `session.*`) are
open when `events` sessions are created; the clock runs from the first
create to the moment the last stream has seen every event. Webhooks: one
webhook (with a secret) for `session.created` points at a local receiver;
the clock runs from the first create to the last delivery. The receiver
checks every signature and every event id, once each.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import orjson
import uvloop

from benchmarks.harness.targets import FlowportUp
from benchmarks.scenarios import Context, Result, check
from benchmarks.scenarios.setup import METADATA
from flowport.clients.webhooks import verify_signature
from flowport.v1 import event_pb2, event_pb2_grpc, session_pb2, session_pb2_grpc, webhook_pb2, webhook_pb2_grpc

SECRET = secrets.token_hex(16)  # the webhook signing secret the receiver checks with
PUBLISHERS = 16  # CreateSession calls in flight


async def _publish(target: str, count: int) -> tuple[list[str], float]:
    """Create `count` sessions; returns their ids and the time the first create started."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        ids: list[str] = []
        todo = iter(range(count))
        started = time.perf_counter()

        async def worker() -> None:
            for _ in todo:
                made = await stub.CreateSession(
                    session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="fan")), metadata=METADATA
                )
                ids.append(made.session_id)

        await asyncio.gather(*(worker() for _ in range(PUBLISHERS)))
        return ids, started


async def _fan_out(target: str, subscribers: int, events: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = event_pb2_grpc.EventServiceStub(channel)
        seen: list[set[str]] = [set() for _ in range(subscribers)]
        last = [0.0] * subscribers
        streams = [
            stub.StreamEvents(event_pb2.StreamEventsRequest(types=["session.created"]), metadata=METADATA)
            for _ in range(subscribers)
        ]

        async def read(index: int) -> None:
            async for event in streams[index]:
                if event.type == "session.created":
                    seen[index].add(event.session_id)
                    last[index] = time.perf_counter()
                    if len(seen[index]) == events:
                        return

        readers = [asyncio.create_task(read(i)) for i in range(subscribers)]
        await asyncio.sleep(0.5)  # every stream is subscribed
        ids, started = await _publish(target, events)
        published = time.perf_counter() - started
        await asyncio.wait_for(asyncio.gather(*readers), timeout=60 + events / 50)
        for stream in streams:
            stream.cancel()
    elapsed = max(last) - started
    return {
        "subscribers": subscribers,
        "events": events,
        "publish_seconds": round(published, 3),
        "seconds": round(elapsed, 3),
        "deliveries_per_second": round(subscribers * events / elapsed, 1),
        "every_stream_saw_every_event": all(s == set(ids) for s in seen),
    }


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.sessions: list[str] = []
        self.bad_signatures = 0
        self.last = 0.0


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        good = verify_signature(SECRET, self.headers.get("X-Flowport-Signature"), body)
        session_id = str(orjson.loads(body).get("session_id", ""))
        with self.server.lock:
            self.server.bad_signatures += not good
            self.server.sessions.append(session_id)
            self.server.last = time.perf_counter()
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()


def _webhooks(up: FlowportUp, events: int) -> dict[str, Any]:
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with grpc.insecure_channel(up.grpc_direct) as channel:
            webhook_pb2_grpc.WebhookServiceStub(channel).CreateWebhook(
                webhook_pb2.CreateWebhookRequest(
                    webhook=webhook_pb2.Webhook(
                        url=f"http://127.0.0.1:{receiver.server_port}/hook",
                        event_types=["session.created"],
                        secret=SECRET,
                    )
                ),
                metadata=METADATA,
            )
        ids, started = uvloop.run(_publish(up.grpc_direct, events))
        deadline = time.monotonic() + 60 + events / 20
        while len(receiver.sessions) < events and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # anything sent twice would arrive now
    finally:
        receiver.shutdown()
        receiver.server_close()
    elapsed = receiver.last - started
    return {
        "events": events,
        "delivered": len(receiver.sessions),
        "seconds": round(elapsed, 3),
        "deliveries_per_second": round(len(receiver.sessions) / elapsed, 1) if elapsed > 0 else 0.0,
        "bad_signatures": receiver.bad_signatures,
        "every_event_once": sorted(receiver.sessions) == sorted(ids),
    }


def run(ctx: Context) -> Result:
    with FlowportUp.run(ctx.folder("realtime")) as up:
        fan_out = uvloop.run(_fan_out(up.grpc_direct, ctx.sizes.subscribers, ctx.sizes.events))
        hooks = _webhooks(up, ctx.sizes.events)
    checks = [
        check(fan_out["every_stream_saw_every_event"], "every stream saw every event"),
        check(hooks["every_event_once"], "every event was delivered to the webhook once"),
        check(hooks["bad_signatures"] == 0, "every delivery's signature verified"),
    ]
    return {"fan_out": fan_out, "webhooks": hooks, "checks": checks}
