"""Matching event types: exact names, and families such as "execution.*".

One rule for event streams and webhooks alike, so a type list means the
same thing wherever a user writes one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FAMILY_SUFFIX = ".*"


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
