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

    def take(self, count: int) -> bytes:
        if self.offset + count > len(self.buffer):
            self.buffer, self.offset = os.urandom(_RANDOM_CHUNK), 0
        self.offset += count
        return self.buffer[self.offset - count : self.offset]


_random = _RandomBytes()


def random_bytes(count: int) -> bytes:
    """`count` (at most a few dozen) bytes from the OS's random source, read ahead a page at a time."""
    return _random.take(count)


def new_id(prefix: str) -> str:
    """A fresh id such as `ses_01JA2Z7W1Q9V3C5TQF4W8K2M6N`."""
    # 128 bits then two zero bits (as base32 pads them): 26 characters of 5 bits.
    value = ((time.time_ns() // 1_000_000) << 80 | int.from_bytes(_random.take(10), "big")) << 2
    return prefix + "_" + "".join([_PAIRS[(value >> shift) & 1023] for shift in range(120, -10, -10)])
