"""Outbound connections to user-given targets: the SSRF guard shared by HTTP
nodes, webhooks, service health checks and SQL nodes.

A target is refused when its host is, or resolves to, a private, loopback,
link-local or otherwise non-global address (IPv4 embedded in IPv6
included), unless the host name or that address is allowlisted. Names are
resolved at every attempt, since DNS answers change; a plain-http request is
then pinned to the address that was checked, so a second DNS answer cannot
swap in an internal one (https relies on certificate verification for that).
SQL connections are pinned the same way (server/nodes/sql_pools.py).

Header values sent to such targets are printable ASCII only
(`header_value_problem`): httpx would fail on anything else with an error
that quotes the offending character, which may belong to a secret.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

import httpx

from flowport.server.resolver import getaddrinfo

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(Exception):
    """The target is internal and not allowlisted: a permanent failure."""

    def __init__(self, host: str, address: str, remedy: str = "") -> None:
        self.host, self.address = host, address
        shown = host if host == address else f"{host} ({address})"
        # The caller's setting that would allow it: the guard is shared by several allowlists.
        hint = f" ({remedy})" if remedy else ""
        super().__init__(
            f"target {shown} is a private, loopback or otherwise internal address and not allowlisted{hint}"
        )


class TargetUnresolvable(Exception):
    """The host name did not resolve: perhaps temporary, so worth retrying."""


def normalize_allowlist(items: Iterable[str]) -> frozenset[str]:
    """Lower-case host names and addresses without IPv6 brackets."""
    return frozenset(item.strip().lower().strip("[]") for item in items if item.strip())


def literal_address(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def allowlisted(host: str, allowlist: frozenset[str]) -> bool:
    """Whether the host (name or address, in any spelling) is allowlisted."""
    host = host.lower()
    literal = literal_address(host)
    return host in allowlist or (literal is not None and literal.compressed in allowlist)


def forbidden_address(address: IPAddress) -> bool:
    """True for addresses no user-given URL may reach unless allowlisted."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and forbidden_address(embedded):
            return True
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
        or not address.is_global
    )


async def check_target(url: httpx.URL, allowlist: frozenset[str], *, remedy: str = "") -> str | None:
    """Refuse an internal target (TargetRefused naming `remedy`, TargetUnresolvable); the address to pin
    plain http to, if any."""
    port = url.port or (443 if url.scheme == "https" else 80)
    address = await resolve_host(url.host, port, allowlist, remedy=remedy)
    return address if url.scheme == "http" else None


async def resolve_host(host: str, port: int, allowlist: frozenset[str], *, remedy: str = "") -> str | None:
    """Refuse an internal `host` (TargetRefused naming `remedy`, the setting that would allow it;
    TargetUnresolvable); the checked address to connect to instead of the name, or None when `host`
    is allowlisted or an address already."""
    host = host.lower().strip("[]")
    if allowlisted(host, allowlist):
        return None
    literal = literal_address(host)
    if literal is not None:
        if forbidden_address(literal):
            raise TargetRefused(host, literal.compressed, remedy)
        return None
    try:
        infos = await getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetUnresolvable(f"cannot resolve {host}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if forbidden_address(address) and address.compressed not in allowlist:
            raise TargetRefused(host, address.compressed, remedy)
        addresses.append(address.compressed)
    if not addresses:
        raise TargetUnresolvable(f"{host} resolves to no address")
    return addresses[0]


# Visible ASCII, space and tab: what httpx encodes (it refuses the rest) and HTTP allows.
_SENDABLE_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot be sent as an HTTP header value, or None; never quotes the value."""
    if not _SENDABLE_HEADER_VALUE.fullmatch(value):
        return (
            "holds a line break, a control character or a character outside ASCII, which an HTTP header "
            "cannot carry (encode it first, e.g. percent-encoding or base64)"
        )
    if value != value.strip(" \t"):
        return "starts or ends with a space or tab, which an HTTP header cannot carry"
    return None
