"""Where a call came from: the client's address, and the proxy it came through.

Envoy (use_remote_address, no trusted hops) appends the address it saw to
`x-forwarded-for`, so the last entry is the client as Envoy saw it; anything
before it is what the client claimed, and is never used. The header counts
only when the peer itself is a configured trusted proxy: anyone else could
send it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Origin:
    """A call's client address and, when it came through one, the trusted proxy."""

    client: str
    proxy: str = ""


def origin_of(metadata: Sequence[tuple[str, Any]], peer: str, trusted_proxies: frozenset[str]) -> Origin:
    """The call's origin from its metadata and gRPC peer string."""
    address = peer_host(peer)
    if address in trusted_proxies:
        for key, value in metadata:
            if key == "x-forwarded-for" and isinstance(value, str):
                forwarded = value.split(",")[-1].strip()
                if forwarded:
                    return Origin(forwarded, address)
    return Origin(address)


def peer_host(peer: str) -> str:
    """The host of a gRPC peer such as "ipv4:127.0.0.1:5000" or "ipv6:[::1]:5000"."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit("]", 1)[0].lstrip("[")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer
