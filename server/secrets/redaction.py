"""Keeping secret values out of outputs, error messages and logs.

`Redactor` replaces every occurrence of some values with `***`, in the
forms a value takes on its way back: as written, percent-encoded (wholly
or in part, as URL libraries do; `+` for a space), JSON-escaped (a body)
and repr-escaped (an error message, a logged bytes object), each
character in any of those forms. A service that echoes a value
transformed otherwise (e.g. base64 inside a Basic auth header) is not
recognised. Values longer than PER_CHARACTER_LIMIT are matched only as
written and fully percent- or JSON-encoded, to keep the pattern small.

`scrubbing_logs(values)` covers logs: while any node holds revealed
values, every log record this process makes, from any library (httpx logs
request URLs, SQLAlchemy bound parameters at INFO), is redacted when it is
created, tracebacks included.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
PER_CHARACTER_LIMIT = 4096
_ESCAPES = {  # JSON's and repr's short escapes
    '"': [r'\\"'],
    "'": [r"\\'"],
    "\\": [r"\\\\"],
    "/": [r"\\/"],
    "\n": [r"\\n"],
    "\r": [r"\\r"],
    "\t": [r"\\t"],
    "\b": [r"\\b"],
    "\f": [r"\\f"],
}


def _hex(number: int, digits: int) -> str:
    """A case-insensitive pattern for `number` in hex."""
    return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in f"{number:0{digits}x}")


def _character(char: str) -> str:
    """Every form `char` may take in a URL, a JSON string or a repr."""
    options = [re.escape(char), "".join("%" + _hex(byte, 2) for byte in char.encode())]
    code = ord(char)
    if char == " ":
        options.append(r"\+")
    if not char.isalnum() or not char.isascii():
        options += _ESCAPES.get(char, [])
        if code < 0x100:
            options.append(r"\\x" + _hex(code, 2))  # repr
        if code < 0x10000:
            options.append(r"\\u" + _hex(code, 4))  # JSON, repr
        else:
            options.append(r"\\U" + _hex(code, 8))  # repr (JSON's surrogate pairs are not matched)
        if not char.isascii():
            options.append("".join(r"\\x" + _hex(byte, 2) for byte in char.encode()))  # a bytes repr
    return "(?:" + "|".join(options) + ")"


def _pattern(value: str) -> str:
    if len(value) <= PER_CHARACTER_LIMIT:
        return "".join(_character(char) for char in value)
    forms = {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}
    return "|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))


class Redactor:
    """Masks a fixed set of values wherever they appear in strings."""

    def __init__(self, values: Iterable[str]) -> None:
        # Longest first, so a value containing another is masked whole.
        unique = sorted({value for value in values if value}, key=len, reverse=True)
        patterns = [f"(?:{_pattern(value)})" for value in unique]
        self._pattern = re.compile("|".join(patterns)) if patterns else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        """`text` with every value masked."""
        return text if self._pattern is None else self._pattern.sub(MASK, text)

    def value(self, value: Any) -> Any:
        """`value` (JSON-like: dicts, lists, strings) with every value masked, keys included."""
        if self._pattern is None:
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
