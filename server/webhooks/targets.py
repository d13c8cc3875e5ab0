"""Where a webhook may point: the SSRF rules, at registration and per attempt.

At registration an IP-literal host in a private, loopback, link-local or
otherwise internal range is refused, and plain http is accepted only for an
allowlisted host. Host names are resolved at every attempt (DNS answers
change) and refused when any address is internal, unless the name or that
address is allowlisted. Plain-http requests are then pinned to the address
that was checked, so a second DNS answer cannot swap in an internal one;
https relies on certificate verification for that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import httpx

from flowport.server.nodes.http import forbidden_address


class TargetRefused(Exception):
    """The target is internal and not allowlisted: a permanent failure."""


class TargetUnresolvable(Exception):
    """The host name did not resolve: perhaps temporary, so retried."""


def normalize_allowlist(items: Iterable[str]) -> frozenset[str]:
    """Lower-case host names and addresses without IPv6 brackets."""
    return frozenset(item.strip().lower().strip("[]") for item in items if item.strip())


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def allowlisted(host: str, allowlist: frozenset[str]) -> bool:
    """Whether the host (name or address, in any spelling) is allowlisted."""
    host = host.lower()
    literal = _literal(host)
    return host in allowlist or (literal is not None and literal.compressed in allowlist)


def registration_problem(url: httpx.URL, allowlist: frozenset[str]) -> str | None:
    """Why `url` may not be registered, or None (the host name itself is checked per attempt)."""
    if url.scheme == "http" and not allowlisted(url.host, allowlist):
        return "must be https (plain http only for an allowlisted host)"
    literal = _literal(url.host)
    if literal is not None and forbidden_address(literal) and not allowlisted(url.host, allowlist):
        return f"{literal.compressed} is a private, loopback or link-local address and not allowlisted"
    return None


async def check_target(url: httpx.URL, allowlist: frozenset[str]) -> str | None:
    """Refuse an internal target; the address to pin a plain-http request to, if any."""
    host = url.host.lower()
    if allowlisted(host, allowlist):
        return None
    literal = _literal(host)
    if literal is not None:
        if forbidden_address(literal):
            raise TargetRefused(f"target {literal.compressed} is an internal address and not allowlisted")
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetUnresolvable(f"cannot resolve {host}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if forbidden_address(address) and address.compressed not in allowlist:
            raise TargetRefused(
                f"target {host} resolves to {address.compressed}, an internal address, and is not allowlisted"
            )
        addresses.append(address.compressed)
    if not addresses:
        raise TargetUnresolvable(f"{host} resolves to no address")
    return addresses[0] if url.scheme == "http" else None
