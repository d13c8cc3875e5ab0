"""Resource identifiers: a type prefix, then 26 Crockford base32 characters.

48 bits of milliseconds followed by 80 random bits (the ULID layout), so ids
sort by creation time and never collide in practice across processes.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's: its order is ASCII order, so ids sort
# Every 10-bit value as its two characters: an id is 13 table lookups (the
# standard library's base32 is pure Python and cost more than the rest of
# creating an execution's ids).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
# Random bytes are read from the OS a page at a time (one syscall per ~400
# ids), into a buffer per thread so no two callers ever share bytes.
_RANDOM_CHUNK = 4096


class _RandomBytes(threading.local):
    def __init__(self) -> None:
        self.buffer = b""
        self.offset = 0

    def take10(self) -> bytes:
        if self.offset + 10 > len(self.buffer):
            self.buffer, self.offset = os.urandom(_RANDOM_CHUNK), 0
        self.offset += 10
        return self.buffer[self.offset - 10 : self.offset]


_random = _RandomBytes()


def new_id(prefix: str) -> str:
    """A fresh id such as `ses_01JA2Z7W1Q9V3C5TQF4W8K2M6N`."""
    # 128 bits then two zero bits (as base32 pads them): 26 characters of 5 bits.
    value = ((time.time_ns() // 1_000_000) << 80 | int.from_bytes(_random.take10(), "big")) << 2
    return prefix + "_" + "".join([_PAIRS[(value >> shift) & 1023] for shift in range(120, -10, -10)])
