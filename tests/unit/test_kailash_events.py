"""Kailash event names as aliases: which events a selection hears, the copies it gets (same id,
Kailash name, progress in percent, error at the top), and webhooks refusing types nothing publishes."""

from __future__ import annotations

import pytest

from flowport.server.events.bus import BusEvent
from flowport.server.events.kailash import ALIASES, KAILASH_DEFAULT, NATIVE_TYPES, Selection, is_known
from flowport.server.webhooks.validation import webhook_problems
from flowport.v1 import webhook_pb2


def _event(type_: str, **data: object) -> BusEvent:
    return BusEvent(id="41", type=type_, time_ns=1, tenant="t", workflow_id="wf", execution_id="ex", data=data)


def test_no_types_is_every_flowport_event_and_no_copies() -> None:
    selection = Selection.of([])
    progress = _event("execution.progress", progress=0.5)
    assert [e.type for e in selection.views(progress)] == ["execution.progress"]


def test_an_event_source_with_no_types_also_gets_the_underscore_copies() -> None:
    selection = Selection.of([], default_copies=True)
    views = selection.views(_event("execution.progress", completed=1, total=4, progress=0.25))
    assert [v.type for v in views] == ["execution.progress", "workflow_progress"]
    copy = views[1]
    assert (copy.id, copy.workflow_id, copy.progress) == ("41", "wf", 25.0)
    assert copy.to_proto().progress == 25.0
    assert not views[0].to_proto().HasField("progress")


def test_types_given_turn_the_default_copies_off() -> None:
    selection = Selection.of(["execution.*"], default_copies=True)
    assert [v.type for v in selection.views(_event("execution.completed"))] == ["execution.completed"]


def test_kailash_names_alone_give_copies_and_not_the_flowport_events() -> None:
    selection = Selection.of(["workflow.completed", "workflow_failed"])
    assert selection.hears("execution.completed") and selection.hears("execution.failed")
    assert not selection.hears("execution.started") and not selection.hears("session.created")
    failed = selection.views(_event("execution.failed", error="boom"))
    assert [(v.type, v.error) for v in failed] == [("workflow_failed", "boom")]
    assert failed[0].to_proto().error == "boom"


def test_both_kinds_of_names_give_the_event_then_its_copies() -> None:
    selection = Selection.of(["execution.completed", "workflow.completed", "workflow_completed"])
    assert [v.type for v in selection.views(_event("execution.completed"))] == [
        "execution.completed",
        "workflow.completed",
        "workflow_completed",
    ]


def test_a_family_never_matches_a_copy() -> None:
    selection = Selection.of(["workflow.*"])
    assert [v.type for v in selection.views(_event("workflow.created"))] == ["workflow.created"]
    assert not selection.hears("execution.completed")


def test_every_alias_names_a_flowport_type_and_the_default_is_underscored() -> None:
    assert set(ALIASES.values()) <= NATIVE_TYPES
    assert KAILASH_DEFAULT and all("." not in name for name in KAILASH_DEFAULT)


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("execution.completed", True),
        ("execution.*", True),
        ("workflow.*", True),
        ("workflow_progress", True),
        ("system.error", True),
        ("workflow.finished", False),
        ("billing.*", False),
        ("execution.completd", False),
    ],
)
def test_known_types(name: str, known: bool) -> None:
    assert is_known(name) is known


def test_a_webhook_for_a_type_nothing_publishes_is_refused_naming_it() -> None:
    webhook = webhook_pb2.Webhook(
        url="https://receiver.example/hook", event_types=["workflow.completed", "execution.completd"]
    )
    problems = webhook_problems(webhook, frozenset())
    assert [(field, problem) for field, problem in problems if field == "webhook.event_types"] == [
        (
            "webhook.event_types",
            "[1] 'execution.completd' is no event type the gateway publishes, nor a Kailash name of one",
        )
    ]


def test_an_events_wire_form_and_kailash_copies_are_made_once_for_all_subscribers() -> None:
    """One tenant's hundreds of streams each built the event's protobuf (and its Kailash copies)."""
    event = BusEvent("7", "execution.completed", 1, "t", execution_id="e", data={"progress": 1.0})
    assert event.to_proto() is event.to_proto()
    assert event.to_proto().execution_id == "e" and event.to_proto().data["progress"] == 1.0
    native, kailash = Selection.of(["execution.completed"]), Selection.of(["workflow_completed"])
    both = Selection.of(["execution.completed", "workflow_completed"])
    assert native.views(event) == [event]
    copies = [kailash.views(event)[0] for _ in range(3)] + [both.views(event)[1]]
    assert all(copy is copies[0] for copy in copies) and copies[0].type == "workflow_completed"
    assert copies[0].progress == 100.0 and copies[0].to_proto() is copies[0].to_proto()
    assert event == BusEvent("7", "execution.completed", 1, "t", execution_id="e", data={"progress": 1.0})
