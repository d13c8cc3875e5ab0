"""What a valid Resource is, checked once for the API and the settings file.

Credentials never sit in a resource as plain text: a database password (in
the URL or its query) and the values of credential headers must be
`${secret:NAME}` references to the tenant's secret store, resolved only when
a node runs. An HTTP profile's header names follow the HTTP nodes' rule
(server/nodes/http.py): HTTP tokens, none of the client's own headers
(Host, Content-Length, Transfer-Encoding and the hop-by-hop ones). Defaults
are filled in here, so a stored resource states every setting it runs with.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Final

import httpx

from flowport.server.egress import header_value_problem
from flowport.server.errors import cut, shown
from flowport.server.nodes.http import CREDENTIAL_HEADERS, header_name_problem, is_header_name
from flowport.server.nodes.sql_pools import UnsupportedDatabase, async_url
from flowport.server.secrets.references import SECRET_NAME, secret_references
from flowport.v1 import resource_pb2

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

NAME = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
NAME_RULE: Final = "1 to 63 characters: a-z, 0-9, '_' and '-', starting with a letter or digit"
DEFAULT_POOL_SIZE, MAX_POOL_SIZE = 5, 100
DEFAULT_MAX_OVERFLOW, MAX_MAX_OVERFLOW = 0, 200
DEFAULT_POOL_RECYCLE: Final = 3600
MAX_HTTP_TIMEOUT: Final = 300.0
MAX_HEADERS: Final = 64
MAX_TEXT: Final = 2048
MAX_HEADER_NAME: Final = 128
_REFERENCE = re.compile(r"\$\{secret:([^{}]*)\}")

Violation = tuple[str, str]


def check(resource: resource_pb2.Resource, where: str = "resource") -> list[Violation]:
    """Problems with `resource`, each with its field path under `where`; fills in defaults."""
    found: list[Violation] = []
    if not NAME.match(resource.name):
        found.append((f"{where}.name", NAME_RULE))
    if len(resource.description) > MAX_TEXT:
        found.append((f"{where}.description", f"at most {MAX_TEXT} characters"))
    kind = resource.WhichOneof("kind")
    if kind is None:
        found.append((f"{where}.database", "one of database or http is required"))
    elif kind == "database":
        found += _check_database(resource.database, f"{where}.database")
    else:
        found += _check_http(resource.http, f"{where}.http")
    for path, name in secret_references(_strings(resource)):
        if not SECRET_NAME.match(name):
            rule = "upper-case letters, digits and _, not starting with a digit"
            found.append((f"{where}.{path}", f"secret name {shown(name, 40)}: {rule}"))
    return found


def _strings(resource: resource_pb2.Resource) -> dict[str, object]:
    if resource.HasField("database"):
        return {"database": {"connection_string": resource.database.connection_string}}
    if resource.HasField("http"):
        return {"http": {"base_url": resource.http.base_url, "headers": dict(resource.http.headers)}}
    return {}


def parse_url(connection_string: str) -> tuple[URL, dict[str, str]]:
    """The URL of `connection_string` with each `${secret:NAME}` stood in for by a token of
    letters and digits (a reference's colon and braces would split the URL wrongly), and
    the secret name of each token."""
    names: dict[str, str] = {}

    def stand_in(match: re.Match[str]) -> str:
        token = f"fpsecretref{len(names)}x{secrets.token_hex(4)}"
        names[token] = match.group(1)
        return token

    replaced = _REFERENCE.sub(stand_in, connection_string)
    from sqlalchemy.engine import make_url  # loaded when a resource is checked, not at start

    return make_url(replaced.replace("postgres://", "postgresql://", 1)), names


def _check_database(pool: resource_pb2.DatabasePool, where: str) -> list[Violation]:
    found: list[Violation] = []
    from sqlalchemy.exc import ArgumentError

    text = pool.connection_string
    field = f"{where}.connection_string"
    try:
        if len(text) > MAX_TEXT:
            raise UnsupportedDatabase(f"at most {MAX_TEXT} characters")
        url, tokens = parse_url(text)
        async_url(url.render_as_string(hide_password=False))
    except (UnsupportedDatabase, ArgumentError, ValueError) as exc:  # ValueError: e.g. a port that is not a number
        found.append((field, cut(str(exc), 300)))
        return found

    def only_references(value: str) -> bool:
        rest = value
        for token in tokens:
            rest = rest.replace(token, "")
        return rest == "" and value != ""

    if url.password is not None and url.password != "" and not only_references(str(url.password)):
        found.append((field, "the password must be a ${secret:NAME} reference (put the value with PUT /api/secrets)"))
    for key, value in url.query.items():
        values = value if isinstance(value, tuple) else (value,)
        if "password" in key.lower() and not all(only_references(v) for v in values):
            found.append((field, f"query parameter {shown(key)} must be a ${{secret:NAME}} reference"))
    if pool.pool_size == 0:
        pool.pool_size = DEFAULT_POOL_SIZE
    if not 1 <= pool.pool_size <= MAX_POOL_SIZE:
        found.append((f"{where}.pool_size", f"between 1 and {MAX_POOL_SIZE}"))
    if not 0 <= pool.max_overflow <= MAX_MAX_OVERFLOW:
        found.append((f"{where}.max_overflow", f"between 0 and {MAX_MAX_OVERFLOW}"))
    if pool.pool_recycle_seconds == 0:
        pool.pool_recycle_seconds = DEFAULT_POOL_RECYCLE
    if pool.pool_recycle_seconds < -1:
        found.append((f"{where}.pool_recycle_seconds", "seconds (at least 1), or -1 for never"))
    return found


def _check_http(profile: resource_pb2.HttpProfile, where: str) -> list[Violation]:
    found: list[Violation] = []
    try:
        url = httpx.URL(profile.base_url)
        if url.scheme not in ("http", "https") or not url.host or len(profile.base_url) > MAX_TEXT:
            raise ValueError
        if url.userinfo or "${secret:" in profile.base_url:
            found.append((f"{where}.base_url", "credentials belong in headers, from the secret store, not the URL"))
    except (httpx.InvalidURL, ValueError):
        found.append((f"{where}.base_url", f"an http or https URL of at most {MAX_TEXT} characters"))
    if len(profile.headers) > MAX_HEADERS:
        # Each is not looked at: 200,000 of them in a 4 MB request held the event loop 1.2 s.
        found.append((f"{where}.headers", f"at most {MAX_HEADERS}"))
    for name, value in sorted(profile.headers.items()) if len(profile.headers) <= MAX_HEADERS else ():
        # Each at its own field path; a name that cannot be one is quoted (cut) instead.
        fits = is_header_name(name) and len(name) <= MAX_HEADER_NAME
        here, label = (f"{where}.headers.{name}", "") if fits else (f"{where}.headers", f"{shown(name, 40)} ")
        if len(name) > MAX_HEADER_NAME:
            found.append((here, f"{label}is longer than {MAX_HEADER_NAME} characters"))
        elif (problem := header_name_problem(name)) is not None:
            # The rule HTTP nodes follow: a token, and none of the client's own headers (Host,
            # Transfer-Encoding, ...), which every node naming the profile would send.
            found.append((here, label + problem))
        elif len(value) > MAX_TEXT:
            found.append((here, f"a header value of at most {MAX_TEXT} characters"))
        elif (problem := header_value_problem(value)) is not None:
            # Secrets filled in later are checked when a node sends them.
            found.append((here, f"the value {problem}"))
        elif name.lower() in CREDENTIAL_HEADERS and "${secret:" not in value:
            found.append((here, "a credential: write it as a ${secret:NAME} reference (e.g. Bearer ${secret:TOKEN})"))
    if profile.timeout_seconds and not 0 < profile.timeout_seconds <= MAX_HTTP_TIMEOUT:
        found.append((f"{where}.timeout_seconds", f"more than 0 and at most {MAX_HTTP_TIMEOUT:g}"))
    return found
