"""Outbound connections to user-given targets: the SSRF guard shared by HTTP
nodes, webhooks, service health checks and SQL nodes.

A target is refused when its host is, or resolves to, a private, loopback,
link-local or otherwise non-global address (IPv4 embedded in IPv6
included), unless the host name or that address is allowlisted. Names are
resolved at every attempt, since DNS answers change; a plain-http request is
then pinned to the address that was checked, so a second DNS answer cannot
swap in an internal one (https relies on certificate verification for that).
SQL connections are pinned the same way (server/nodes/sql_pools.py).

What a tenant is told about a refused name (`TargetUnreachable.shown`) is
the same whether it resolves to an internal address or does not resolve at
all, and names neither the address nor the resolver's error: otherwise a
workflow or a webhook could list the names the gateway's DNS knows and the
private addresses they have. The detail (`str(exc)`) is for the server log
(`log_refusal`). An IP literal the tenant wrote is named as it is. Only a
temporary failure of the lookup (EAI_AGAIN) is told apart, as worth
retrying.

Header values sent to such targets are printable ASCII only
(`header_value_problem`): httpx would fail on anything else with an error
that quotes the offending character, which may belong to a secret.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable

import httpx

from flowport.server.resolver import RESOLVING_FOR, getaddrinfo

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

log = logging.getLogger(__name__)


class TargetUnreachable(Exception):
    """A target the guard will not connect to.

    `str(exc)` is the detail, for the server log only: the address a name
    resolved to, the resolver's error. `shown` is what the tenant may see.
    `temporary`: the lookup may work when tried again (a refusal never does).
    """

    def __init__(self, detail: str, host: str, remedy: str = "", *, temporary: bool = False) -> None:
        super().__init__(detail)
        # The caller's setting that would allow it: the guard is shared by several allowlists.
        self.host, self.remedy, self.temporary = host, remedy, temporary

    @property
    def shown(self) -> str:
        """The tenant's message: the same for a name that resolves to an internal address and for one
        that does not resolve, without the address or the resolver's error."""
        if self.temporary:
            return f"cannot resolve {self.host} right now: the name lookup failed temporarily"
        hint = f" ({self.remedy})" if self.remedy else ""
        return (
            f"target {self.host} is not reachable from this gateway: it does not resolve, or it resolves to a "
            f"private, loopback or otherwise internal address that is not allowlisted{hint}; "
            "the server log says which"
        )


class TargetRefused(TargetUnreachable):
    """The target is internal and not allowlisted: a permanent failure."""

    def __init__(self, host: str, address: str, remedy: str = "") -> None:
        self.address = address
        self.literal = literal_address(host) is not None
        named = host if host == address else f"{host} ({address})"
        hint = f" ({remedy})" if remedy else ""
        super().__init__(
            f"target {named} is a private, loopback or otherwise internal address and not allowlisted{hint}",
            host,
            remedy,
        )

    @property
    def shown(self) -> str:
        # An address the tenant wrote itself: naming it tells nothing new.
        return str(self) if self.literal else super().shown


class TargetUnresolvable(TargetUnreachable):
    """The host name did not resolve: `temporary` when the resolver says to try again (EAI_AGAIN)."""


def log_refusal(exc: TargetUnreachable, what: str, tenant: str | None = None) -> None:
    """Log the detail of a refusal the tenant is shown as `exc.shown`: once per refusal, for `tenant`
    (by default the one the lookup was made for, server/resolver.py)."""
    tenant = RESOLVING_FOR.get() if tenant is None else tenant
    # A lookup that may work next time is no refusal yet.
    level = logging.INFO if exc.temporary else logging.WARNING
    log.log(level, "%s for tenant %s refused: %s", what, tenant or "(none)", exc)


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
    """Refuse an internal target (TargetRefused naming `remedy`, TargetUnresolvable: both
    TargetUnreachable); the address to pin plain http to, if any."""
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
        temporary = isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN
        raise TargetUnresolvable(f"cannot resolve {host}: {exc}", host, remedy, temporary=temporary) from exc
    addresses: list[str] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if forbidden_address(address) and address.compressed not in allowlist:
            raise TargetRefused(host, address.compressed, remedy)
        addresses.append(address.compressed)
    if not addresses:
        raise TargetUnresolvable(f"{host} resolves to no address", host, remedy)
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
