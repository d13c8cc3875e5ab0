"""At most so many log lines a minute per key (a tenant), the rest counted and said with the next.

Some lines are written per tenant action: a failed outbound request of an
HTTP node, a webhook attempt, a refused target. A tenant making thousands of
such requests a second must not make thousands of log lines a second for
every other tenant's operator to wade through (and for the disk to hold).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Keys (tenants) remembered at most; past it the least recently logged is forgotten (its next line
# is then simply let through).
MAX_KEYS = 4096


@dataclass(slots=True)
class _Window:
    start: float
    written: int = 0
    held: int = 0


class LogBudget:
    """`admit(key)` says whether a line of `key` may be written now, and how many were held back
    since the last one written (to say with it)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def admit(self, key: str) -> tuple[bool, int]:
        """(whether to write this line, how many lines of `key` were held back before it)."""
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= 60.0:
            held = 0 if window is None else window.held
            window = _Window(now)
            self._windows[key] = window
            while len(self._windows) > MAX_KEYS:
                self._windows.popitem(last=False)
        else:
            held = 0
        self._windows.move_to_end(key)
        if window.written >= self._per_minute:
            window.held += 1
            return False, 0
        window.written += 1
        held, window.held = held + window.held, 0
        return True, held
