"""Where a call came from: the client's address, and the proxy it came through.

Envoy (use_remote_address, no trusted hops) appends the address it saw to
`x-forwarded-for`, so the last entry is the client as Envoy saw it; anything
before it is what the client claimed, and is never used. The header counts
only when the peer itself is a configured trusted proxy: anyone else could
send it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Peers whose answer is remembered: the few proxies and clients a server sees, bounded.
_REMEMBERED = 1024


def trusted_network(entry: str) -> IpNetwork:
    """One `--trusted-proxies` entry, an address (`10.0.0.7`, `::1`) or a network (`10.0.0.0/8`),
    as a network; ValueError, naming the entry, for anything else (a host name would never match)."""
    try:
        return ipaddress.ip_network(entry.strip(), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            network = ipaddress.ip_network(entry.strip(), strict=False)
            raise ValueError(f"{entry!r} has host bits set: the network is {network}") from None
        raise ValueError(f"{entry[:64]!r} is not an IP address or network (such as 10.0.0.7 or 10.0.0.0/8)") from None


class TrustedProxies:
    """The peers allowed to name the client in `x-forwarded-for`: addresses and networks.

    `address in proxies` is asked on every call: an exact address is a set
    lookup, and the answer for a peer matched against networks is remembered
    (a server sees few peers; the memory is bounded all the same).
    """

    def __init__(self, entries: Iterable[str]) -> None:
        networks = [trusted_network(entry) for entry in entries]
        single = {n.network_address for n in networks if n.num_addresses == 1}
        self._exact = frozenset(str(address) for address in single)
        self._networks = tuple(n for n in networks if n.num_addresses > 1)
        self._seen: dict[str, bool] = {}

    @property
    def everyone(self) -> bool:
        """Whether a listed network holds every address of its family (0.0.0.0/0, ::/0)."""
        return any(network.prefixlen == 0 for network in self._networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        if address in self._exact:
            return True
        if not self._networks and not self._exact:
            return False
        known = self._seen.get(address)
        if known is None:
            known = self._matches(address)
            if len(self._seen) >= _REMEMBERED:
                self._seen.clear()
            self._seen[address] = known
        return known

    def _matches(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is no part of it
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.7 is 10.0.0.7 reached over an IPv6 socket
        if str(ip) in self._exact:
            return True
        return any(ip in network for network in self._networks if network.version == ip.version)


@dataclass(frozen=True)
class Origin:
    """A call's client address and, when it came through one, the trusted proxy."""

    client: str
    proxy: str = ""


def origin_of(metadata: Sequence[tuple[str, Any]], peer: str, trusted_proxies: TrustedProxies) -> Origin:
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
    """The host of a gRPC peer such as "ipv4:127.0.0.1:5000" or "ipv6:[::1]:5000" (which grpcio
    writes URI-escaped: "ipv6:%5B::1%5D:5000")."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv6":
        return rest.rsplit("]", 1)[0].lstrip("[")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer
