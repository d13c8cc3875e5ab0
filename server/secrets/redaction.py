"""Keeping secret values out of outputs, error messages and logs.

`Redactor` replaces every occurrence of some values with `***`, in the
forms a value takes on its way back: as written, lower-cased (URL hosts),
percent-encoded (wholly, as a path, as a form, and as httpx leaves a query
value), JSON-escaped (a body) and repr-escaped (an error message, a logged
bytes object). Each form is a plain substring search (`str.replace`), so
masking costs a few passes over the text whatever the values are: user
data cannot make it slow. A value transformed otherwise (base64 inside a
Basic auth header, a hash, one character at a time) is not recognised:
masking prevents accidents; it cannot stop a workflow author who wants a
secret out (see the README).

`scrubbing_logs(values)` covers logs: while any node holds revealed
values, every log record this process makes, from any library (httpx logs
request URLs, SQLAlchemy bound parameters at INFO), is redacted when it is
created, tracebacks included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, quote_plus

import httpx

MASK = "***"
# Characters percent-encoding leaves alone in a URL path (RFC 3986 pchar).
_PATH_SAFE = "/:@!$&'()*+,;="


def forms(value: str) -> set[str]:
    """The spellings of `value` that masking looks for."""
    found = {
        value,
        value.lower(),
        quote(value, safe=""),
        quote(value, safe=_PATH_SAFE),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
        repr(value.encode("utf-8", "surrogatepass"))[2:-1],
    }
    with contextlib.suppress(httpx.InvalidURL, IndexError):  # as httpx itself encodes a query value
        found.add(str(httpx.URL("http://h/?k=" + value)).split("k=", 1)[1])
    found.update([f.lower() for f in found])
    return {f for f in found if f}


class Redactor:
    """Masks a fixed set of values wherever they appear in strings."""

    def __init__(self, values: Iterable[str]) -> None:
        spellings = {form for value in values if value for form in forms(value)}
        # Longest first, so a value containing another is masked whole.
        self._forms = sorted(spellings, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def text(self, text: str) -> str:
        """`text` with every value masked."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def value(self, value: Any) -> Any:
        """`value` (JSON-like: dicts, lists, strings) with every value masked, keys included."""
        if not self._forms:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value


# -- logs -------------------------------------------------------------------

_lock = threading.Lock()
_held: Counter[str] = Counter()
# Rebuilt under the lock, read without it (one attribute read is atomic).
_active = Redactor(())
_previous_factory: Any = None


def _scrubbed_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record: logging.LogRecord = _previous_factory(*args, **kwargs)
    redactor = _active
    if redactor:
        _scrub(record, redactor)
    return record


def _scrub(record: logging.LogRecord, redactor: Redactor) -> None:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is logging's to report, not ours
        return
    cleaned = redactor.text(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and record.exc_info[1] is not None:
        # Formatters print exc_text when set; the exception itself is dropped
        # so no handler formats its unredacted message again.
        record.exc_text = redactor.text(logging.Formatter().formatException(record.exc_info))
        record.exc_info = None


def _rebuild() -> None:
    global _active  # noqa: PLW0603 - one process-wide set of held values
    _active = Redactor(list(_held))


@contextmanager
def scrubbing_logs(values: Collection[str]) -> Iterator[None]:
    """Redact `values` from every log record made until the block ends."""
    global _previous_factory  # noqa: PLW0603 - installed once per process
    if not values:
        yield
        return
    with _lock:
        if _previous_factory is None:
            _previous_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_scrubbed_record)
        _held.update(values)
        _rebuild()
    try:
        yield
    finally:
        with _lock:
            _held.subtract(values)
            for value in [v for v, n in _held.items() if n <= 0]:
                del _held[value]
            _rebuild()
