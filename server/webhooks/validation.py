"""Checks on a webhook as a caller registers it; each problem names its field."""

from __future__ import annotations

import re

import httpx

from flowport.server.egress import header_value_problem
from flowport.server.errors import shown
from flowport.server.events.kailash import is_known
from flowport.server.nodes.http import CLIENT_OWNED_HEADERS, is_header_name
from flowport.server.nodes.http import header_name_problem as request_header_name_problem
from flowport.server.webhooks.targets import registration_problem
from flowport.v1 import webhook_pb2

WEBHOOK_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# A dotted type such as "execution.completed", or a family such as "execution.*".
EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*(\.\*)?$")
MAX_URL = 2048
MAX_EVENT_TYPES = 64
MAX_HEADERS = 32
MAX_HEADER_VALUE = 4096
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 1024
MAX_DESCRIPTION = 1024
MAX_HEADER_NAME = 256

# Besides the HTTP client's own (framing, connection, routing: server/nodes/http.py), the headers
# that describe a delivery's body or identify its sender: flowport sets those itself.
RESERVED_HEADERS = CLIENT_OWNED_HEADERS | frozenset({"content-encoding", "expect", "user-agent"})
RESERVED_PREFIX = "x-flowport-"
# Accepted (Kailash clients send it) but dropped: a delivery's body is always JSON.
IGNORED_HEADERS = frozenset({"content-type"})


def header_name_problem(name: str) -> str | None:
    """Why a webhook may not carry a header named `name`, or None: checked at registration and
    again at each delivery (a webhook stored before a rule existed may break it)."""
    if len(name) > MAX_HEADER_NAME:
        return f"is longer than {MAX_HEADER_NAME} characters"
    # The rule HTTP nodes follow: a token, and none of the client's own headers.
    if (problem := request_header_name_problem(name)) is not None:
        return problem
    lower = name.lower()
    if lower in RESERVED_HEADERS or lower.startswith(RESERVED_PREFIX):
        return "is set by flowport on every delivery and cannot be given"
    return None


def kept_headers(headers: dict[str, str]) -> dict[str, str]:
    """`headers` without the ones flowport accepts and ignores."""
    return {name: value for name, value in headers.items() if name.lower() not in IGNORED_HEADERS}


Violation = tuple[str, str]


def url_problem(raw: str, allowlist: frozenset[str]) -> str | None:
    """Why `raw` is not a usable webhook URL, or None."""
    if not raw:
        return "required"
    if len(raw) > MAX_URL:
        return f"at most {MAX_URL} characters"
    try:
        url = httpx.URL(raw)
    except httpx.InvalidURL as exc:
        return f"not a valid URL: {exc}"
    if url.scheme not in ("http", "https") or not url.host:
        return "must be an http(s) URL with a host"
    if url.userinfo:
        # They would show up wherever the URL does; send credentials in webhook.headers.
        return "must not contain credentials; use webhook.headers"
    return registration_problem(url, allowlist)


def _event_type_problems(types: list[str]) -> list[Violation]:
    if len(types) > MAX_EVENT_TYPES:
        return [("webhook.event_types", f"at most {MAX_EVENT_TYPES} types")]
    problems: list[Violation] = []
    for i, name in enumerate(types):
        if not EVENT_TYPE.match(name):
            problem = f"[{i}] {shown(name)} is not an event type such as 'execution.completed' or 'execution.*'"
            problems.append(("webhook.event_types", problem))
        elif not is_known(name):
            # A webhook for a type nothing publishes would be accepted and never fire.
            problem = f"[{i}] {shown(name)} is no event type the gateway publishes, nor a Kailash name of one"
            problems.append(("webhook.event_types", problem))
    return problems


def _header_problems(headers: dict[str, str]) -> list[Violation]:
    if len(headers) > MAX_HEADERS:
        return [("webhook.headers", f"at most {MAX_HEADERS} headers")]
    problems: list[Violation] = []
    seen: set[str] = set()
    for name, value in sorted(headers.items()):
        # Each at its own field path; a name that cannot be one is quoted (cut) instead.
        fits = is_header_name(name) and len(name) <= MAX_HEADER_NAME
        field, label = (f"webhook.headers.{name}", "") if fits else ("webhook.headers", f"{shown(name, 40)} ")
        lower = name.lower()
        if (problem := header_name_problem(name)) is not None:
            problems.append((field, label + problem))
        elif lower in seen:
            problems.append((field, "is given twice (header names ignore case)"))
        if len(value) > MAX_HEADER_VALUE:
            problems.append((field, f"{label}the value must be at most {MAX_HEADER_VALUE} characters"))
        elif (problem := header_value_problem(value)) is not None:
            # Never the value: it is write-only, like the secret (a receiver's credential).
            problems.append((field, f"{label}the value {problem}"))
        seen.add(lower)
    return problems


def webhook_problems(given: webhook_pb2.Webhook, allowlist: frozenset[str]) -> list[Violation]:
    """Every problem with `given`, as (field, description) pairs."""
    problems: list[Violation] = []
    if given.webhook_id and not WEBHOOK_ID.match(given.webhook_id):
        problems.append(("webhook.webhook_id", "1 to 128 letters, digits, '_', '-' or '.'"))
    url = url_problem(given.url, allowlist)
    if url is not None:
        problems.append(("webhook.url", url))
    problems += _event_type_problems(list(given.event_types))
    problems += _header_problems(dict(given.headers))
    secret = len(given.secret.encode())
    if given.secret and not MIN_SECRET_BYTES <= secret <= MAX_SECRET_BYTES:
        problems.append(("webhook.secret", f"{MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes"))
    if len(given.description) > MAX_DESCRIPTION:
        problems.append(("webhook.description", f"at most {MAX_DESCRIPTION} characters"))
    return problems
