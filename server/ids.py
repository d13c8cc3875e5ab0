"""Resource identifiers: a type prefix, then 26 Crockford base32 characters.

48 bits of milliseconds followed by 80 random bits (the ULID layout), so ids
sort by creation time and never collide in practice across processes.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(prefix: str) -> str:
    """A fresh id such as `ses_01JA2Z7W1Q9V3C5TQF4W8K2M6N`."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return f"{prefix}_{''.join(reversed(chars))}"
