"""Kailash's event names as aliases of flowport's.

Kailash clients subscribe to (and read) `workflow.completed`,
`workflow_progress`, `system_error`...; flowport's events are named for
what they concern (`execution.completed`, `execution.progress`). A client
that names a Kailash type gets each matching event once more under that
name: a copy with the same id (so resuming by id skips both), the Kailash
name as its `type`, and the fields Kailash clients read at the top level
(`progress` in percent, `error`). Families (`workflow.*`) never match a
copy: only a Kailash name spelled out does, so flowport's own filters mean
what they did. A browser EventSource with no types at all gets the
underscore names too (`KAILASH_DEFAULT`), as the Kailash examples expect.

| flowport | Kailash names |
|---|---|
| execution.started | workflow.started, workflow_started |
| execution.progress | workflow.progress, workflow_progress |
| execution.completed | workflow.completed, workflow_completed |
| execution.failed | workflow.failed, workflow_failed |
| execution.cancelled | workflow.cancelled, workflow_cancelled |
| session.created | session_created |
| workflow.created | workflow_created |
| node.started / completed / failed | node_started / node_completed / node_failed |
| system.error | system_error |
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from flowport.server.events.bus import BusEvent
from flowport.server.events.types import TypeFilter

# Every type flowport publishes (and streams may ask for), families included.
NATIVE_TYPES: Final = frozenset(
    {
        "session.created",
        "session.deleted",
        "workflow.created",
        "workflow.deleted",
        "execution.started",
        "execution.progress",
        "execution.completed",
        "execution.failed",
        "execution.cancelled",
        "node.started",
        "node.completed",
        "node.failed",
        "webhook.created",
        "webhook.deleted",
        "webhook.failed",
        "system.error",
        "heartbeat",
    }
)
NATIVE_FAMILIES: Final = frozenset(t.split(".", 1)[0] for t in NATIVE_TYPES if "." in t)

# Kailash name -> the flowport type it aliases.
ALIASES: Final[dict[str, str]] = {
    "workflow.started": "execution.started",
    "workflow_started": "execution.started",
    "workflow.progress": "execution.progress",
    "workflow_progress": "execution.progress",
    "workflow.completed": "execution.completed",
    "workflow_completed": "execution.completed",
    "workflow.failed": "execution.failed",
    "workflow_failed": "execution.failed",
    "workflow.cancelled": "execution.cancelled",
    "workflow_cancelled": "execution.cancelled",
    "session_created": "session.created",
    "workflow_created": "workflow.created",
    "node_started": "node.started",
    "node_completed": "node.completed",
    "node_failed": "node.failed",
    "system_error": "system.error",
}
# What an EventSource with no types gets besides every flowport event.
KAILASH_DEFAULT: Final = tuple(name for name in ALIASES if "." not in name)


def is_known(name: str) -> bool:
    """Whether a type a webhook or stream names can ever match an event."""
    if name.endswith(".*"):
        return name[:-2] in NATIVE_FAMILIES
    return name in NATIVE_TYPES or name in ALIASES


@dataclass(frozen=True, slots=True)
class Selection:
    """What a stream or webhook asked for: flowport types, and Kailash names to copy events under."""

    native: TypeFilter
    none_native: bool  # only Kailash names were given: no flowport event as such
    copies: dict[str, tuple[str, ...]]  # flowport type -> Kailash names asked for

    @classmethod
    def of(cls, types: Iterable[str], *, default_copies: bool = False) -> Selection:
        names = list(dict.fromkeys(types))
        native = [n for n in names if n not in ALIASES]
        aliases = [n for n in names if n in ALIASES] or (list(KAILASH_DEFAULT) if default_copies and not names else [])
        copies: dict[str, tuple[str, ...]] = {}
        for name in aliases:
            copies[ALIASES[name]] = (*copies.get(ALIASES[name], ()), name)
        return cls(TypeFilter.of(native), bool(names) and not native, copies)

    def wants_native(self, event_type: str) -> bool:
        return not self.none_native and self.native.accepts(event_type)

    def hears(self, event_type: str) -> bool:
        """Whether the event is sent at all, as itself or as a copy."""
        return self.wants_native(event_type) or event_type in self.copies

    def views(self, event: BusEvent) -> list[BusEvent]:
        """The event as this subscriber gets it: itself, its Kailash copies, or both (in that order)."""
        shown = [event] if self.wants_native(event.type) else []
        return shown + [_copy_of(event, name) for name in self.copies.get(event.type, ())]


def _copy_of(event: BusEvent, name: str) -> BusEvent:
    """`kailash_copy(event, name)`, made once for all the event's subscribers (and its wire form with it)."""
    key = "kailash:" + name
    made = event.made.get(key)
    if made is None:
        made = event.made[key] = kailash_copy(event, name)
    return made


def kailash_copy(event: BusEvent, name: str) -> BusEvent:
    """The event under a Kailash name, with `progress` (percent) and `error` where Kailash clients read them."""
    data = event.data or {}
    fraction = data.get("progress")
    progress = round(float(fraction) * 100.0, 2) if isinstance(fraction, int | float) else None
    error = data.get("error")
    return BusEvent(
        id=event.id,
        type=name,
        time_ns=event.time_ns,
        tenant=event.tenant,
        session_id=event.session_id,
        workflow_id=event.workflow_id,
        execution_id=event.execution_id,
        data=data,
        progress=progress,
        error=error if isinstance(error, str) else None,
    )
