"""Resource identifiers: a type prefix, then 26 Crockford base32 characters.

48 bits of milliseconds followed by 80 random bits (the ULID layout), so ids
sort by creation time and never collide in practice across processes.
"""

from __future__ import annotations

import base64
import os
import time

# RFC 4648 base32 re-lettered as Crockford's alphabet, whose order matches
# ASCII order, so encoded ids sort like the numbers they encode.
_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def new_id(prefix: str) -> str:
    """A fresh id such as `ses_01JA2Z7W1Q9V3C5TQF4W8K2M6N`."""
    raw = (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10)
    return f"{prefix}_{base64.b32encode(raw)[:26].decode().translate(_CROCKFORD)}"
