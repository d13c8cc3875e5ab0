"""Matching event types: exact names, and families such as "execution.*".

One rule for event streams and webhooks alike, so a type list means the
same thing wherever a user writes one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flowport.server.errors import InvalidArgument
from flowport.v1 import event_pb2

FAMILY_SUFFIX = ".*"
MAX_TYPES = 50  # types one stream or listing may name


@dataclass(frozen=True, slots=True)
class TypeFilter:
    """Which event types a stream or webhook asked for; empty accepts every type."""

    exact: frozenset[str]
    families: tuple[str, ...]  # "execution." for "execution.*"

    @classmethod
    def of(cls, types: Iterable[str]) -> TypeFilter:
        names = list(types)
        return cls(
            exact=frozenset(t for t in names if not t.endswith(FAMILY_SUFFIX)),
            families=tuple(t[:-1] for t in names if t.endswith(FAMILY_SUFFIX)),
        )

    @property
    def everything(self) -> bool:
        return not self.exact and not self.families

    def accepts(self, event_type: str) -> bool:
        return self.everything or event_type in self.exact or event_type.startswith(self.families)


def requested_types(request: event_pb2.StreamEventsRequest | event_pb2.ListRecentEventsRequest) -> list[str]:
    """`types` and its Kailash alias `event_types` (whose entries may be comma-separated), merged."""
    # Kailash clients send event_types=a,b; an event type never contains a comma.
    alias = [name.strip() for entry in request.event_types for name in entry.split(",")]
    merged = list(request.types) + [name for name in alias if name]
    if len(merged) > MAX_TYPES:
        field = "event_types" if request.event_types else "types"
        raise InvalidArgument(f"at most {MAX_TYPES} types", violations=[(field, f"at most {MAX_TYPES}")])
    return merged
