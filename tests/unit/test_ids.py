"""Resource ids: ULID layout in Crockford base32, sortable by creation time."""

from __future__ import annotations

import base64
import re

from hypothesis import given
from hypothesis import strategies as st

from flowport.server import ids

_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "0123456789ABCDEFGHJKMNPQRSTVWXYZ")


@given(st.integers(min_value=0, max_value=2**48 - 1), st.binary(min_size=10, max_size=10))
def test_the_encoding_is_rfc4648_base32_in_crockfords_letters(ms: int, random: bytes) -> None:
    value = (ms << 80 | int.from_bytes(random, "big")) << 2
    fast = "".join(ids._PAIRS[(value >> shift) & 1023] for shift in range(120, -10, -10))
    reference = base64.b32encode(ms.to_bytes(6, "big") + random)[:26].decode().translate(_CROCKFORD)
    assert fast == reference


def test_ids_are_unique_well_formed_and_sort_by_time() -> None:
    made = [ids.new_id("exe") for _ in range(3000)]  # crosses several refills of the random buffer
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"exe_[0-9A-HJKMNP-TV-Z]{26}", i) for i in made)
    times = [i[4:13] for i in made]  # the first 9 characters are the high 45 bits of the milliseconds
    assert times == sorted(times)
