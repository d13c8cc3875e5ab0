"""The servers Envoy sends calls to besides (or instead of) `flowport up`'s own.

`--upstream HOST:PORT` is one server at a fixed address (IPv4, or IPv6 in
brackets); `--upstream-dns NAME:PORT` is a DNS name Envoy resolves and keeps
resolving, every address it answers with one server (Envoy's STRICT_DNS, as
a Kubernetes headless service answers with its pods). The two are kept
apart so an address never waits on DNS and a name is never taken for a
single server.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from flowport.server.errors import shown

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_PORT = re.compile(r"\A[0-9]{1,5}\Z")
MAX_NAME = 253


@dataclass(frozen=True)
class Upstream:
    """One `--upstream` or `--upstream-dns` value, parsed."""

    host: str  # an address (IPv6 without brackets) or a DNS name
    port: int
    by_name: bool  # from --upstream-dns: Envoy resolves `host`

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str, *, by_name: bool) -> Upstream:
    """`text` as HOST:PORT (an address, or a name when `by_name`); ValueError saying what is wrong."""
    what = "NAME:PORT" if by_name else "HOST:PORT (IPv6 in brackets)"
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or "]" in port:
        raise ValueError(f"{shown(text, 80)} is not {what}")
    if not _PORT.match(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{shown(text, 80)}: the port must be a number from 1 to 65535")
    bracketed = host.startswith("[") and host.endswith("]")
    literal = host[1:-1] if bracketed else host
    address = _address(literal)
    if by_name:
        if address is not None:
            raise ValueError(f"{shown(text, 80)} is an address, not a name: give it with --upstream")
        if not _is_name(host):
            raise ValueError(f"{shown(text, 80)}: {shown(host, 80)} is not a DNS name")
        return Upstream(host.rstrip(".").lower(), int(port), by_name=True)
    if address is None:
        if _is_name(host):
            raise ValueError(f"{shown(text, 80)} names a host: give a name with --upstream-dns")
        raise ValueError(f"{shown(text, 80)} is not {what}")
    if address.version == 6 and not bracketed:
        raise ValueError(f"{shown(text, 80)}: an IPv6 address goes in brackets, e.g. [::1]:50051")
    if address.version == 4 and bracketed:
        raise ValueError(f"{shown(text, 80)}: only an IPv6 address goes in brackets")
    return Upstream(str(address), int(port), by_name=False)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # A zone (fe80::1%eth0) is refused: Envoy's socket addresses have none.
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_name(host: str) -> bool:
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    # An all-numeric last label would be a malformed address, not a name.
    return 0 < len(name) <= MAX_NAME and all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()
