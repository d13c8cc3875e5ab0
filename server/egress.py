"""Outbound connections to user-given targets: the SSRF guard shared by HTTP
nodes, webhooks, service health checks and SQL nodes.

A target is refused when its host is, or resolves to, a private, loopback,
link-local or otherwise non-global address (IPv4 embedded in IPv6
included), unless the host name or that address is allowlisted. Names are
resolved at every attempt, since DNS answers change; the request is then
pinned to the address that was checked (`route`), so a second DNS answer
cannot swap in an internal one. https is pinned too, its TLS still for the
name: certificate verification does not stop a name that rebinds to an
internal address, it only fails the handshake after the connection, and the
failure told a tenant which internal ports were open. SQL connections are
pinned the same way (server/nodes/sql_pools.py).

What a tenant is told about a refused name (`TargetUnreachable.shown`) is
the same whether it resolves to an internal address or does not resolve at
all, and names neither the address nor the resolver's error: otherwise a
workflow or a webhook could list the names the gateway's DNS knows and the
private addresses they have. The detail (`str(exc)`) is for the server log
(`log_refusal`). An IP literal the tenant wrote is named as it is. Only a
temporary failure of the lookup (EAI_AGAIN) is told apart, as worth
retrying.

A request that fails on its way (no connection, a failed TLS handshake, a
broken-off answer) is told to the tenant as what failed (`failure_shown`),
never as the error's text, which names addresses and tells a closed port
from one that answered something else; the server log has the text
(`log_failure`).

Header values sent to such targets are printable ASCII only
(`header_value_problem`): httpx would fail on anything else with an error
that quotes the offending character, which may belong to a secret.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from flowport.server.observability.log_budget import LogBudget
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


# The settings that let a target through although internal, as refusals name them: HTTP nodes and
# service health checks share --http-allowlist, webhooks have their own; --dev adds loopback to both.
HTTP_ALLOWLIST_REMEDY = "--http-allowlist, or --dev for loopback"
WEBHOOK_ALLOWLIST_REMEDY = "--webhook-allowlist, or --dev for loopback"

# Lines of refused and failed outbound requests written per tenant a minute: a tenant's requests
# in a loop must not flood the log every operator reads.
LOG_LINES_PER_MINUTE = 60
LOG_BUDGET = LogBudget(per_minute=LOG_LINES_PER_MINUTE)


def log_refusal(exc: TargetUnreachable, what: str, tenant: str | None = None) -> None:
    """Log the detail of a refusal the tenant is shown as `exc.shown`: once per refusal, for `tenant`
    (by default the one the lookup was made for, server/resolver.py)."""
    tenant, held = _within_budget(tenant)
    if held is None:
        return
    # A lookup that may work next time is no refusal yet.
    level = logging.INFO if exc.temporary else logging.WARNING
    log.log(level, "%s for tenant %s refused: %s%s", what, tenant or "(none)", exc, held)


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
    TargetUnreachable); the checked address to send the request to (`route`), or None to connect
    as the URL says (an allowlisted host, or an address already)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return await resolve_host(url.host, port, allowlist, remedy=remedy)


@dataclass(frozen=True)
class Route:
    """How to send a request for a checked URL: to `url`, with `headers` and `extensions` added."""

    url: httpx.URL
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


def route(url: httpx.URL, address: str | None) -> Route:
    """Send a request for `url` to `address`, what check_target found it at (None: as the URL says).

    Plain http goes to the address with the name as Host. https keeps the name in the URL, so the
    pool keeps its connections apart by name and TLS sends and verifies the name as usual, and a
    new connection is opened to the address instead of a second lookup of the name
    (`_ConnectTo`). Not the address in the URL with the name as `sni_hostname`: httpcore pools
    connections by URL only, and a request for one name would go out on another name's
    connection to the same address, whose certificate was verified for the other name."""
    if address is None:
        return Route(url)
    if url.scheme == "http":
        return Route(url.copy_with(host=address), headers={"Host": url.netloc.decode("ascii")})
    return Route(url, extensions={"trace": _ConnectTo(url.raw_host.decode("ascii"), address)})


class _ConnectTo:
    """httpcore's `trace` request extension: a new connection for `host` goes to `address`.

    httpcore has no documented way to connect a URL's host to another address. It hands this hook
    the very arguments of the connection it is about to open, so the host among them is replaced;
    once connected, the peer is checked, and a connection anywhere else (an httpcore that no
    longer honours the change, a proxy) is closed before a byte is sent and fails as a connect
    error. A request that reuses a pooled connection for the same name opens none: it goes to the
    address that connection was checked at, even if the name resolves elsewhere by now (also
    checked, or the request was refused before it got here)."""

    def __init__(self, host: str, address: str) -> None:
        self._host, self._address = host, address

    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.started" and info.get("host") == self._host:
            info["host"] = self._address
        elif event == "connection.connect_tcp.complete":
            stream = info.get("return_value")
            peer = None if stream is None else stream.get_extra_info("server_addr")
            if not (isinstance(peer, tuple) and peer and _same_address(str(peer[0]), self._address)):
                if stream is not None:
                    await stream.aclose()
                raise httpcore.ConnectError(f"connected to {peer} for {self._host}, not the checked {self._address}")


def _same_address(one: str, other: str) -> bool:
    try:
        return ipaddress.ip_address(one.split("%", 1)[0]) == ipaddress.ip_address(other)
    except ValueError:
        return False


def failure_shown(exc: httpx.HTTPError) -> str:
    """What a tenant is told of a request that failed without an answer: what failed, never the
    error's text (addresses, the kind of refusal, a TLS alert: what tells ports apart)."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "TLS handshake failed" if _caused_by(exc, ssl.SSLError) else "could not connect"
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.CloseError)):
        return "the connection broke off"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the server closed the connection or did not answer in HTTP"
    return "the request failed"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx's error, httpcore's, the cause: a few links at most
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def log_failure(exc: BaseException, what: str, tenant: str | None = None) -> None:
    """Log the detail of a failure the tenant is shown as `failure_shown(exc)`, for `tenant` (by
    default the one lookups are made for, server/resolver.py)."""
    tenant, held = _within_budget(tenant)
    if held is None:
        return
    root = exc
    for _ in range(8):  # the first cause: the socket's or the TLS library's own error
        cause = root.__cause__ or root.__context__
        if cause is None:
            break
        root = cause
    detail = f"{type(exc).__name__}: {exc}" + (f" ({type(root).__name__}: {root})" if root is not exc else "")
    log.info("%s for tenant %s failed: %s%s", what, tenant or "(none)", detail, held)


def _within_budget(tenant: str | None) -> tuple[str | None, str | None]:
    """The tenant a line is for (by default the one lookups are made for), and what the line adds
    about lines held back before it; None for the second when this one is held back (LOG_BUDGET)."""
    tenant = RESOLVING_FOR.get() if tenant is None else tenant
    write, held = LOG_BUDGET.admit(tenant or "")
    if not write:
        return tenant, None
    return tenant, f" ({held} more such lines of this tenant were not written)" if held else ""


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
