"""Where a webhook may point.

At registration an IP-literal host in a private, loopback, link-local or
otherwise internal range is refused, and plain http is accepted only for an
allowlisted host. Every delivery attempt then goes through the SSRF guard
HTTP nodes use too (server/egress.py): names resolved each time, internal
addresses refused unless allowlisted, and the connection (http or https)
made to the checked address (egress.route).
"""

from __future__ import annotations

import httpx

from flowport.server.egress import (
    WEBHOOK_ALLOWLIST_REMEDY,
    TargetRefused,
    TargetUnresolvable,
    allowlisted,
    check_target,
    forbidden_address,
    literal_address,
    normalize_allowlist,
)

__all__ = ["TargetRefused", "TargetUnresolvable", "check_target", "normalize_allowlist", "registration_problem"]


def registration_problem(url: httpx.URL, allowlist: frozenset[str]) -> str | None:
    """Why `url` may not be registered, or None (the host name itself is checked per attempt)."""
    if url.scheme == "http" and not allowlisted(url.host, allowlist):
        return "must be https (plain http only for a host in --webhook-allowlist, or loopback with --dev)"
    literal = literal_address(url.host)
    if literal is not None and forbidden_address(literal) and not allowlisted(url.host, allowlist):
        return (
            f"{literal.compressed} is a private, loopback or link-local address and not allowlisted "
            f"({WEBHOOK_ALLOWLIST_REMEDY})"
        )
    return None
