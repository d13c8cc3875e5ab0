"""Event and webhook hot paths: encoding one event for a stream (protobuf) and for
Redis, the webhook body, and signing it."""

from __future__ import annotations

import time

from pytest_benchmark.fixture import BenchmarkFixture

from flowport.server.events.bus import BusEvent
from flowport.server.events.redis_bus import _decode, _encode
from flowport.server.webhooks.delivery import event_body
from flowport.server.webhooks.signing import sign

EVENT = BusEvent(
    id="173261234567800007",
    type="execution.completed",
    time_ns=time.time_ns(),
    tenant="acme",
    session_id="ses_06H1E4FV525RCSM5NQWFD0BGC0",
    workflow_id="trivial",
    execution_id="exe_06H1E4FV525RCSM5NQWFD0BGC1",
    data={"state": "STATE_SUCCEEDED", "duration_ms": 1.25, "outputs": {"calc": {"result": {"n": 8}}}},
)
SECRET = b"whsec_" + b"k" * 32


def test_event_to_stream_message(benchmark: BenchmarkFixture) -> None:
    # Building it, as is done once per event: to_proto() keeps the message for the event's other
    # subscribers (since 2026-12-08; runs before measured each subscriber's own build).
    wire = benchmark(lambda: EVENT._proto().SerializeToString())
    assert len(wire) > 100 and wire == EVENT.to_proto().SerializeToString()


def test_event_through_redis_encoding(benchmark: BenchmarkFixture) -> None:
    decoded = benchmark(lambda: _decode(b"1732612345678-7", {b"e": _encode(EVENT), b"o": b"origin"}))
    assert decoded.data == EVENT.data and decoded.type == EVENT.type


def test_webhook_body(benchmark: BenchmarkFixture) -> None:
    body = benchmark(event_body, EVENT)
    assert body.startswith(b'{"id":"173261234567800007"')


def test_webhook_signing(benchmark: BenchmarkFixture) -> None:
    body = event_body(EVENT)
    header = benchmark(sign, SECRET, body, 1_732_612_345)
    assert header.startswith("t=1732612345,v1=") and len(header) == len("t=1732612345,v1=") + 64
