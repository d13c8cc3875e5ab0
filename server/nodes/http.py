"""HTTP node types: `HTTPRequestNode` (one URL) and `RESTClientNode` (a base
URL, a resource and an auth scheme). Both build an `HttpCall` and hand it to
`perform`, which owns everything else.

Behaviour of `perform`:

- The request goes through the process-wide `httpx.AsyncClient` in
  `ctx.services.http` (never one per call). Requests are built as
  `httpx.Request` objects, so the client's cookie jar, default headers and
  auth are not applied: nothing one workflow receives leaks into another's
  requests.
- SSRF guard, before every attempt and every redirect hop: the host is
  resolved (server/resolver.py) and refused (`HTTP_TARGET_FORBIDDEN`) when
  any address is private, loopback, link-local, reserved, multicast,
  unspecified or otherwise not global (IPv4-mapped/6to4/Teredo IPv6 forms
  are unwrapped), unless the host name or that address is in
  `ctx.services.http_allowlist`. A name that does not resolve is refused
  the same way, with the same message, which names neither the address nor
  the resolver's error (the server log has them): a workflow cannot map
  internal names with it. Only a temporary lookup failure is retried
  (`HTTP_UNREACHABLE`). Requests are sent to the checked address, so a
  second DNS answer cannot swap in an internal one: plain `http` with the
  name as Host, `https` with TLS for the name (egress.route).
- A request that fails on its way is `HTTP_UNREACHABLE` saying what failed
  (could not connect, TLS handshake failed, ...), never the error's text,
  which would tell an open port from a closed one; the log has it.
- Retries (`retry_attempts` after the first) on connect errors, timeouts,
  5xx and 429, with exponential backoff and jitter
  (`retry_delay * 2**(n-1)` scaled by a random 0.5-1.0, capped at
  `max_retry_delay`); a `Retry-After` header (seconds or HTTP date) is used
  instead, capped at `max_retry_delay`. No sleep reaches past
  `ctx.remaining`; each attempt gets `min(timeout, ctx.remaining)` in total.
- Any other status (and a retryable one once the attempts or the time are
  used up) is returned as outputs with `success: false`; only a connect
  error or timeout on the last attempt raises (`HTTP_UNREACHABLE`,
  `HTTP_TIMEOUT`, retryable).
- Redirects are not followed unless `follow_redirects` is true (then at
  most 5 hops, each checked by the SSRF guard; `Authorization`, `Cookie`,
  `X-API-Key` and RESTClientNode's API key header are dropped when the
  origin changes).
- Bodies larger than `max_response_bytes` (at most 10 MiB) fail with
  `HTTP_RESPONSE_TOO_LARGE`; the size is counted after decompression (and
  before it too). gzip and deflate are decoded here a step at a time, each
  step counted before the next, so a compressed bomb never expands past the
  cap in memory; a body in br or zstd, which could not be decoded that way,
  or compressed more than once (only the last layer's output would be
  counted), fails with `HTTP_BAD_RESPONSE`.
- Header values (from the config, inputs, a resource's profile, secrets)
  must be printable ASCII (tabs inside allowed): anything else fails the
  node with `INVALID_PARAMETER` naming the header, never quoting the value
  or any character of it (it may hold a secret).
- Header names must be HTTP tokens, and none of `CLIENT_OWNED_HEADERS`
  (framing, connection and routing headers, any case): the client sets
  those. Workflow validation refuses them in a config (`header_problems`);
  `build_call` refuses them again after substitution, since headers may also
  come from inputs, connections and a resource's profile stored earlier.
- `${secret:NAME}` is resolved in the request fields of `secret_fields`,
  in values from the node's config only (server/secrets/resolver.py). The
  values are masked (`***`) in the outputs and error messages; a header
  holding one is dropped on a redirect to another origin, like
  Authorization; a body holding one is never re-sent to another origin
  (`HTTP_REDIRECT_REFUSED`). A secret goes into a URL as written: one that
  may contain `&`, `?`, `/` or `#` belongs in `params`, which encodes it.

`retry_safe` is False on both classes: the engine cannot tell a GET from a
POST at class level, and re-running a POST is not safe.

`perform` takes an optional `AttemptGate`, which holds each attempt back
and may choose the wait after an answer: RateLimitedAPINode
(rate_limited.py) uses it to keep every attempt to its rate limit.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import email.utils
import json
import math
import random
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, TypeGuard

import httpx

from flowport.server import json_parse
from flowport.server.egress import (
    HTTP_ALLOWLIST_REMEDY,
    TargetUnreachable,
    check_target,
    failure_shown,
    header_value_problem,
    log_failure,
    log_refusal,
    route,
)
from flowport.server.errors import SHOWN_CHARS, cut, shown
from flowport.server.nodes.base import (
    MAX_CONFIG_PROBLEMS,
    JsonSchema,
    NodeContext,
    NodeError,
    NodeType,
    Violation,
)
from flowport.server.nodes.json_size import json_size
from flowport.server.nodes.substitution import Budget, check_params, substitute
from flowport.server.observability import tracing
from flowport.server.resources.pinning import ABSENT, pinned_to_config
from flowport.server.secrets.references import secret_references
from flowport.server.secrets.resolver import NONE, ConfigSecrets, Revealed, masking, revealed
from flowport.server.version import VERSION

if TYPE_CHECKING:
    from flowport.server.resources.directory import HttpResource

MAX_RESPONSE_BYTES: Final = 10 * 1024 * 1024
# The largest request body a node sends, as JSON (`json`/`body` after substitution).
MAX_REQUEST_BODY_BYTES: Final = 16 * 1024 * 1024
# A compressed body is decoded at most this much at a time and counted before any more is: one
# small compressed chunk can otherwise expand a thousandfold in memory before the cap is checked.
DECODE_STEP: Final = 64 * 1024
MAX_REDIRECTS: Final = 5
DEADLINE_MARGIN: Final = 0.05  # seconds
METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
USER_AGENT: Final = f"flowport/{VERSION}"

# Replaced by tests to record backoff delays without waiting for them.
_sleep = asyncio.sleep
_jitter = random.SystemRandom()

# An HTTP token (RFC 9110 5.1). \Z, not $: `$` also matches before a final newline.
_HEADER_NAME = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

# Headers the HTTP client sets itself (lower case; refused in any case): how the body is framed,
# what becomes of the connection, and where the request is routed. Every tenant's requests share
# one pool of keep-alive connections, so a caller's Transfer-Encoding next to the client's
# Content-Length would let a server read part of one body as the next request (smuggling); and a
# caller's Host would reach virtual hosts behind a shared ingress that the SSRF guard, which checks
# addresses only, never saw.
CLIENT_OWNED_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        # The client never waits for a 100 Continue: a server that honours one stalls the call.
        "expect",
    }
)
# Headers that carry a credential for the origin they were set for (lower case): dropped when a
# redirect leaves that origin, and a resource's profile must take their values from secrets.
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})


def is_header_name(name: object) -> TypeGuard[str]:
    """Whether `name` is an HTTP token, so a header may carry it (and a field path may end in it)."""
    return isinstance(name, str) and _HEADER_NAME.match(name) is not None


def header_name_problem(name: object) -> str | None:
    """Why a header named `name` may not be given by a tenant or an operator, or None."""
    if not is_header_name(name):
        return "is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    if name.lower() in CLIENT_OWNED_HEADERS:
        return "is set by the HTTP client (message framing, the connection or routing) and cannot be given"
    return None


def header_label(name: object) -> str:
    """`name` as a message shows it: as is when it is a valid header name, else quoted and cut."""
    return name if is_header_name(name) else shown(name, 40)


def header_problems(headers: Mapping[Any, Any], where: str) -> list[Violation]:
    """Problems with the headers of a config or a request (field path `where`), each at
    `where.<Name>` (at `where` itself for a name that cannot be a path segment). Values are
    checked as written: a `${...}` reference is filled in only when the node runs, and checked then."""
    problems: list[Violation] = []
    for name, value in headers.items():
        field = f"{where}.{name}" if is_header_name(name) else where
        problem = header_name_problem(name)
        if problem is not None:
            problems.append((field, problem if field != where else f"{header_label(name)} {problem}"))
        elif isinstance(value, str) and (problem := header_value_problem(value)) is not None:
            # Never the value: it may be a credential.
            problems.append((field, f"the value {problem}"))
        if len(problems) >= MAX_CONFIG_PROBLEMS:
            break
    return problems


# -- schemas ---------------------------------------------------------------

_QUERY_VALUE: JsonSchema = {"type": ["string", "number", "boolean", "null"]}
_QUERY_SCHEMA: JsonSchema = {
    "type": "object",
    "additionalProperties": {"anyOf": [_QUERY_VALUE, {"type": "array", "items": _QUERY_VALUE}]},
}
_HEADERS_SCHEMA: JsonSchema = {"type": "object", "additionalProperties": {"type": "string"}}

# Request and retry settings shared by both node types.
_COMMON_PROPERTIES: dict[str, JsonSchema] = {
    "method": {"enum": list(METHODS), "default": "GET", "description": "HTTP method."},
    "headers": {
        **_HEADERS_SCHEMA,
        "description": "Request headers; values may hold ${name} references. The client's own "
        "(Host, Content-Length, Transfer-Encoding, Connection and other hop-by-hop headers) are refused.",
    },
    "params": {**_QUERY_SCHEMA, "description": "Query string parameters (merged into the URL's own)."},
    "query": {**_QUERY_SCHEMA, "description": "Same as `params`; wins on a shared name."},
    "body": {"description": "Any JSON value, sent as JSON (content-type application/json)."},
    "json": {"description": "Same as `body`."},
    "data": {"type": "string", "description": "A raw string body, sent as is (UTF-8)."},
    "timeout": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 300,
        "default": 30,
        "description": "Seconds one attempt may take in total (also bounded by the node's remaining time).",
    },
    "retry_attempts": {
        "type": "integer",
        "minimum": 0,
        "maximum": 10,
        "default": 0,
        "description": "Attempts after the first, on connect errors, timeouts, 5xx and 429.",
    },
    "retry_delay": {
        "type": "number",
        "minimum": 0,
        "default": 1,
        "description": "Seconds; base of the exponential backoff.",
    },
    "max_retry_delay": {
        "type": "number",
        "minimum": 0,
        "default": 30,
        "description": "Longest wait between attempts, Retry-After included.",
    },
    "expect_json": {
        "type": "boolean",
        "description": "true: a 2xx body must be JSON (else HTTP_INVALID_JSON); false: never parse; "
        "absent: parse when the content-type is JSON.",
    },
    "follow_redirects": {
        "type": "boolean",
        "default": False,
        "description": f"Follow up to {MAX_REDIRECTS} redirects, each target checked like the first.",
    },
    "max_response_bytes": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_RESPONSE_BYTES,
        "default": MAX_RESPONSE_BYTES,
        "description": "Largest (decompressed) body accepted.",
    },
}

_RESPONSE_SCHEMA: JsonSchema = {
    "type": "object",
    "properties": {
        "status_code": {"type": "integer"},
        "headers": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Lower-case names; repeated headers joined with ', '.",
        },
        "body": {"type": "string", "description": "The body as text (charset from content-type, else UTF-8)."},
        "json": {"description": "The parsed body when it is JSON (see expect_json), else null."},
        "url": {"type": "string", "description": "The URL that answered (after redirects)."},
        "attempts": {"type": "integer", "description": "Attempts made, retries included."},
    },
    "required": ["status_code", "headers", "body", "json", "url", "attempts"],
}

_OUTPUTS_SCHEMA: JsonSchema = {
    "type": "object",
    "properties": {
        "response": _RESPONSE_SCHEMA,
        "status_code": {"type": "integer"},
        "success": {"type": "boolean", "description": "True for a 2xx status."},
    },
}


def _inputs_schema(config_schema: JsonSchema) -> JsonSchema:
    """Every config key may also arrive as a parameter; other names feed ${name} references."""
    return {"type": "object", "properties": dict(config_schema["properties"]), "additionalProperties": True}


# -- the call --------------------------------------------------------------


@dataclass(frozen=True)
class HttpCall:
    """One request as a node asked for it, references already substituted."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    timeout: float = 30.0
    retry_attempts: int = 0
    retry_delay: float = 1.0
    max_retry_delay: float = 30.0
    expect_json: bool | None = None
    follow_redirects: bool = False
    max_response_bytes: int = MAX_RESPONSE_BYTES
    # Header names (lower case) dropped when a redirect changes origin.
    sensitive_headers: frozenset[str] = CREDENTIAL_HEADERS
    # The body holds a secret: never re-sent to another origin by a 307/308.
    secret_body: bool = False


def build_call(
    params: Mapping[str, Any],
    url: Any,
    headers: Mapping[str, Any],
    *,
    sensitive_headers: frozenset[str] = frozenset(),
    secrets: Revealed = NONE,
    budget: Budget | None = None,
) -> HttpCall:
    """An HttpCall from merged parameters, for `url` and `headers` already substituted (within
    `budget`, which the rest shares)."""
    budget = budget or Budget()
    if not isinstance(url, str) or not url:
        raise NodeError(f"url must be a non-empty string, got {url!r}", reason="INVALID_PARAMETER")
    method = str(params.get("method") or "GET").upper()
    if method not in METHODS:
        raise NodeError(f"method {method!r} is not one of {', '.join(METHODS)}", reason="INVALID_PARAMETER")

    query: dict[str, Any] = {}
    for key in ("params", "query"):
        value = substitute(params.get(key), params, secrets.for_key(key), budget)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise NodeError(f"{key} must be an object, got {type(value).__name__}", reason="INVALID_PARAMETER")
        query.update(value)

    final_headers = _clean_headers(headers)
    content: bytes | None = None
    bodies = [key for key in ("json", "body", "data") if params.get(key) is not None]
    if len(bodies) > 1:
        raise NodeError(f"give only one of json, body, data (got {', '.join(bodies)})", reason="INVALID_PARAMETER")
    if bodies == ["data"]:
        data = substitute(params["data"], params, secrets.for_key("data"), budget)
        content = (data if isinstance(data, str) else json.dumps(data)).encode()
    elif bodies:
        value = substitute(params[bodies[0]], params, secrets.for_key(bodies[0]), budget)
        # A whole-string reference keeps its value by reference, so ["${x}"] * 150000 is small
        # in memory and huge written out: measured (each shared value once) before it is.
        size = json_size(value, MAX_REQUEST_BODY_BYTES)
        if size > MAX_REQUEST_BODY_BYTES:
            raise NodeError(
                f"{bodies[0]} would be more than {MAX_REQUEST_BODY_BYTES} bytes as JSON", reason="REQUEST_TOO_LARGE"
            )
        try:
            content = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise NodeError(f"{bodies[0]} is not JSON-serialisable: {exc}", reason="INVALID_PARAMETER") from exc
        if not any(name.lower() == "content-type" for name in final_headers):
            final_headers["Content-Type"] = "application/json"
    if not any(name.lower() == "user-agent" for name in final_headers):
        final_headers["User-Agent"] = USER_AGENT

    expect_json = params.get("expect_json")
    return HttpCall(
        method=method,
        url=url,
        headers=final_headers,
        query=query,
        content=content,
        timeout=float(params.get("timeout", 30)),
        retry_attempts=int(params.get("retry_attempts", 0)),
        retry_delay=float(params.get("retry_delay", 1)),
        max_retry_delay=float(params.get("max_retry_delay", 30)),
        expect_json=expect_json if isinstance(expect_json, bool) else None,
        follow_redirects=bool(params.get("follow_redirects", False)),
        max_response_bytes=min(int(params.get("max_response_bytes", MAX_RESPONSE_BYTES)), MAX_RESPONSE_BYTES),
        sensitive_headers=HttpCall.sensitive_headers
        | {name.lower() for name in sensitive_headers}
        | _secret_headers(params, secrets),
        secret_body=any(
            secret_references(params.get(key)) and secrets.for_key(key) is not None for key in ("json", "body", "data")
        ),
    )


def _secret_headers(params: Mapping[str, Any], secrets: Revealed) -> set[str]:
    """Names (lower case) of headers whose value holds a secret: like Authorization, kept to their origin."""
    names: set[str] = set()
    for key in ("headers", "default_headers"):
        given = params.get(key)
        if isinstance(given, Mapping) and secrets.for_key(key) is not None:
            names.update(str(name).lower() for name, value in given.items() if secret_references(value))
    return names


def _clean_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    cleaned: dict[str, str] = {}
    for name, value in headers.items():
        # Checked after substitution: headers may also come from inputs, connections or a profile.
        problem = header_name_problem(name)
        if problem is not None:
            raise NodeError(f"header {header_label(name)} {problem}", reason="INVALID_PARAMETER")
        if value is None:
            continue
        text = value if isinstance(value, str) else str(value)
        # Never the value, nor where it goes wrong: it may hold a secret (httpx's own error quotes the character).
        problem = header_value_problem(text)
        if problem is not None:
            raise NodeError(f"header {name} {problem}", reason="INVALID_PARAMETER")
        cleaned[name] = text
    return cleaned


# -- performing it ---------------------------------------------------------


class _Transient(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class _Fetched:
    url: str
    status_code: int
    headers: httpx.Headers
    content: bytes
    charset: str | None


class AttemptGate(Protocol):
    """Holds each attempt of `perform` back, and may set the wait after an answer (RateLimitedAPINode)."""

    async def admit(self, attempt: int) -> None:
        """Before attempt `attempt` (from 1): returns when it may be sent, or raises NodeError.

        On the first attempt the error is the node's; on a later one the
        previous attempt's result stands, as when time runs out.
        """
        ...

    async def answered(self, status: int, headers: httpx.Headers) -> float | None:
        """After an attempt got an answer: seconds to wait before the next attempt, or None for perform's backoff."""
        ...


async def perform(ctx: NodeContext, call: HttpCall, *, gate: AttemptGate | None = None) -> dict[str, Any]:
    """Run `call` with retries; the node's outputs."""
    client = ctx.services.http
    if client is None:
        raise NodeError("no shared HTTP client is configured", reason="HTTP_CLIENT_UNAVAILABLE")
    url = _parse_url(call.url)
    if call.query:
        url = url.copy_merge_params(call.query)
    allowlist = frozenset(host.lower().strip("[]") for host in ctx.services.http_allowlist)
    shares = ctx.services.http_shares

    attempts = call.retry_attempts + 1
    made = 0
    fetched: _Fetched | None = None
    failure: _Transient | None = None
    for attempt in range(1, attempts + 1):
        if gate is not None:
            try:
                await gate.admit(attempt)
            except NodeError:
                if made == 0:
                    raise
                break
        # A little before the engine's own deadline, so the node reports what timed out.
        budget = min(call.timeout, ctx.remaining - DEADLINE_MARGIN)
        if budget <= 0:
            if made == 0:
                raise NodeError("no time left for the request", reason="HTTP_TIMEOUT", retryable=True)
            break
        made = attempt
        slot = contextlib.nullcontext() if shares is None else shares.slot(ctx.tenant)
        try:
            fetched, failure = await _attempt(client, call, url, allowlist, budget, slot=slot), None
        except _Transient as exc:
            fetched, failure = None, exc
        wait = None if gate is None or fetched is None else await gate.answered(fetched.status_code, fetched.headers)
        if fetched is not None and not _retryable_status(fetched.status_code):
            break
        if attempt == attempts:
            break
        delay = _backoff(call, attempt, fetched) if wait is None else wait
        if delay >= ctx.remaining - DEADLINE_MARGIN:
            break
        await _sleep(delay)

    if failure is not None:
        raise NodeError(
            f"{failure.message} (after {made} attempt{'s' if made != 1 else ''})", reason=failure.reason, retryable=True
        )
    assert fetched is not None
    return _outputs(fetched, made, call.expect_json)


def _parse_url(raw: str) -> httpx.URL:
    try:
        url = httpx.URL(raw)
    except httpx.InvalidURL as exc:
        raise NodeError(f"invalid url {shown(raw)}: {cut(str(exc), SHOWN_CHARS)}", reason="HTTP_INVALID_URL") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise NodeError(f"url must be http(s) with a host, got {shown(raw)}", reason="HTTP_INVALID_URL")
    return url


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _backoff(call: HttpCall, attempt: int, fetched: _Fetched | None) -> float:
    """Seconds to wait before attempt `attempt + 1`."""
    if fetched is not None:
        retry_after = parse_retry_after(fetched.headers.get("retry-after"))
        if retry_after is not None:
            return min(retry_after, call.max_retry_delay)
    exponential = min(call.retry_delay * 2.0 ** (attempt - 1), call.max_retry_delay)
    return exponential * _jitter.uniform(0.5, 1.0)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or HTTP date); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return None if math.isnan(seconds) else max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def _attempt(
    client: httpx.AsyncClient,
    call: HttpCall,
    url: httpx.URL,
    allowlist: frozenset[str],
    budget: float,
    *,
    slot: contextlib.AbstractAsyncContextManager[Any],
) -> _Fetched:
    """One attempt, redirects included, within `budget` seconds, holding `slot` (the tenant's share
    of the shared pool) while it runs (a CLIENT span when tracing)."""
    # Created here, run by the await: inside the span when there is one.
    attempt = _attempt_within(client, call, url, allowlist, budget, slot=slot)
    if not tracing.enabled():
        return await attempt
    # The origin only: a path may hold a filled-in secret (a webhook token), and spans are not masked.
    attributes = {
        "http.request.method": call.method,
        "url.scheme": url.scheme,
        "server.address": url.host,
        "server.port": url.port or (443 if url.scheme == "https" else 80),
    }
    with tracing.span(f"{call.method}", kind="client", attributes=attributes) as span:
        fetched = await attempt
        if span is not None:
            span.set_attribute("http.response.status_code", fetched.status_code)
            if fetched.status_code >= 500:
                tracing.fail(span, f"HTTP {fetched.status_code}")
        return fetched


async def _attempt_within(
    client: httpx.AsyncClient,
    call: HttpCall,
    url: httpx.URL,
    allowlist: frozenset[str],
    budget: float,
    *,
    slot: contextlib.AbstractAsyncContextManager[Any],
) -> _Fetched:
    try:
        # Waiting for the tenant's place counts against the attempt's time, as waiting for a
        # connection of the pool does.
        async with asyncio.timeout(budget), slot:
            return await _exchange(client, call, url, allowlist, budget)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise _Transient("HTTP_TIMEOUT", f"{call.method} {_safe(url)} timed out after {budget:.3g}s") from exc
    except httpx.LocalProtocolError as exc:
        # Not the error's text: h11 quotes the offending header value, which may hold a secret.
        raise NodeError(
            f"cannot send {call.method} {_safe(url)}: httpx refused the request as malformed",
            reason="INVALID_PARAMETER",
        ) from exc
    except httpx.TransportError as exc:
        # What failed, not the error's text: it names addresses and tells a closed port from one
        # that answered something else (the log has it, with the tenant).
        log_failure(exc, f"an HTTP node's {call.method} to {url.host}")
        raise _Transient("HTTP_UNREACHABLE", f"{call.method} {_safe(url)} failed: {failure_shown(exc)}") from exc
    except httpx.HTTPError as exc:
        raise NodeError(f"{call.method} {_safe(url)}: bad response: {exc}", reason="HTTP_BAD_RESPONSE") from exc


async def _exchange(
    client: httpx.AsyncClient, call: HttpCall, url: httpx.URL, allowlist: frozenset[str], budget: float
) -> _Fetched:
    method, content, headers = call.method, call.content, dict(call.headers)
    for hop in range(MAX_REDIRECTS + 1):
        # To the address that was checked, never to a second answer for the name (egress.route).
        via = route(url, await _check_target(url, allowlist))
        request_headers = dict(headers)
        tracing.inject(request_headers)  # traceparent, so the service can continue the trace
        request_headers.update(via.headers)  # a Host for plain http: callers can give none (CLIENT_OWNED_HEADERS)
        request = httpx.Request(
            method,
            via.url,
            headers=request_headers,
            content=content,
            extensions={"timeout": httpx.Timeout(budget).as_dict(), **via.extensions},
        )
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            if call.follow_redirects and response.is_redirect and hop < MAX_REDIRECTS:
                target = url.join(response.headers["location"])
                if target.scheme in ("http", "https") and target.host:
                    method, content = _redirect_method(method, content, response.status_code)
                    if content is None:
                        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                    if (target.scheme, target.host, target.port) != (url.scheme, url.host, url.port):
                        if content is not None and call.secret_body:
                            raise NodeError(
                                f"not following the redirect to {_safe(target)}: "
                                "the request body holds a secret and the redirect keeps it",
                                reason="HTTP_REDIRECT_REFUSED",
                            )
                        headers = {k: v for k, v in headers.items() if k.lower() not in call.sensitive_headers}
                    url = target
                    continue
            body = await _read_capped(response, call.max_response_bytes, method == "HEAD", url)
            return _Fetched(str(url), response.status_code, response.headers, body, response.charset_encoding)
        finally:
            await response.aclose()
    raise AssertionError("unreachable: the last hop always returns")  # pragma: no cover


def _redirect_method(method: str, content: bytes | None, status: int) -> tuple[str, bytes | None]:
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        return "GET", None
    return method, content


async def _read_capped(response: httpx.Response, cap: int, head: bool, url: httpx.URL) -> bytes:
    declared = response.headers.get("content-length", "")
    # ASCII digits only ("²".isdigit() is true), and few enough for int(); the read below caps the rest.
    if not head and declared.isascii() and declared.isdigit() and len(declared) <= 18 and int(declared) > cap:
        raise NodeError(
            f"response from {_safe(url)} is {declared} bytes, more than the {cap} allowed",
            reason="HTTP_RESPONSE_TOO_LARGE",
        )
    inflater: _Inflater | None = None
    started = False
    received = 0
    body = bytearray()
    # Raw bytes, decoded here a step at a time: httpx's aiter_bytes() decodes a whole chunk at once.
    async for chunk in response.aiter_raw():
        if not started:
            # Only a body that is there is refused for its coding (not a HEAD answer's header).
            inflater, started = _inflater(response.headers, url), True
        received += len(chunk)
        for piece in (chunk,) if inflater is None else inflater.feed(chunk):
            body += piece
            if len(body) > cap:
                raise _too_large(url, cap)
        # The compressed size counts too, as the content-length check above does: data past the
        # end of a gzip stream, or deflate blocks that decode to nothing, would otherwise be read
        # without limit until the timeout.
        if received > cap:
            raise _too_large(url, cap)
    return bytes(body)


# Codings httpx would decode in one piece each when its optional packages are installed: refused,
# as they cannot be decoded a step at a time here. Other names it does not know (a mislabelled
# "utf-8", say) it passes through undecoded, and so does the node.
_UNDECODED_CODINGS: Final = frozenset({"br", "zstd"})


class _Inflater:
    """One gzip or deflate layer of a body, producing at most DECODE_STEP bytes per piece."""

    def __init__(self, coding: str, url: httpx.URL) -> None:
        self._coding, self._url = coding, url
        self._zlib: zlib._Decompress | None = None
        # deflate: its first bytes, until there are two to tell a zlib header from raw deflate.
        self._start = b""

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._zlib is None:
            if self._coding == "deflate":
                data = self._start + data
                if len(data) < 2:
                    self._start = data
                    return
                # "deflate" is meant to be zlib-wrapped, but servers also send raw deflate (as httpx allows).
                wbits = zlib.MAX_WBITS if _zlib_header(data) else -zlib.MAX_WBITS
            else:
                wbits = zlib.MAX_WBITS | 16  # gzip
            self._zlib = zlib.decompressobj(wbits)
        inflater = self._zlib
        more = bool(data)
        # After the end of the stream anything more is ignored (as httpx does), and never buffered.
        while more and not inflater.eof:
            try:
                piece = inflater.decompress(data, DECODE_STEP)
            except zlib.error as exc:
                raise NodeError(
                    f"response from {_safe(self._url)} is not valid {self._coding} data: {exc}",
                    reason="HTTP_BAD_RESPONSE",
                ) from exc
            data = inflater.unconsumed_tail
            if piece:
                yield piece
            # zlib stops when its input or the room it was given runs out; only the latter leaves
            # output pending.
            more = bool(data) or len(piece) == DECODE_STEP


def _zlib_header(data: bytes) -> bool:
    """Whether `data` starts with a zlib header (RFC 1950: method 8, window at most 32 KiB, check bits)."""
    return data[0] & 0x0F == 8 and data[0] >> 4 <= 7 and (data[0] << 8 | data[1]) % 31 == 0


def _inflater(headers: httpx.Headers, url: httpx.URL) -> _Inflater | None:
    """The gzip or deflate layer to decode a body with, if any; NodeError for a coding the node cannot
    decode (br, zstd) or a body compressed more than once."""
    inflater: _Inflater | None = None
    for listed in headers.get_list("content-encoding", split_commas=True):
        coding = listed.strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            if inflater is not None:
                # Only the last layer's output could be counted against the cap: what an inner layer
                # expands to would be decoded (and thrown away) unbounded, holding the event loop.
                raise NodeError(
                    f"response from {_safe(url)} is compressed more than once, which HTTP nodes do not decode "
                    "(they decode one layer of gzip or deflate)",
                    reason="HTTP_BAD_RESPONSE",
                )
            inflater = _Inflater("gzip" if coding == "x-gzip" else coding, url)
        elif coding in _UNDECODED_CODINGS:
            raise NodeError(
                f"response from {_safe(url)} is compressed with {coding}, which HTTP nodes do not decode "
                "(they decode gzip and deflate)",
                reason="HTTP_BAD_RESPONSE",
            )
    return inflater


def _too_large(url: httpx.URL, cap: int) -> NodeError:
    return NodeError(
        f"response from {_safe(url)} is larger than the {cap} bytes allowed", reason="HTTP_RESPONSE_TOO_LARGE"
    )


def _safe(url: httpx.URL) -> str:
    """The URL without credentials or query (for messages)."""
    return str(url.copy_with(username=None, password=None, query=None, fragment=None))


# -- SSRF guard (server/egress.py) -----------------------------------------


async def _check_target(url: httpx.URL, allowlist: frozenset[str]) -> str | None:
    """Refuse forbidden targets as node errors; the checked address to send the request to, if any.

    The error says neither what a name resolves to nor why it does not resolve (the log does, with
    the tenant the engine resolves for): a refused name and a missing one read the same."""
    try:
        return await check_target(url, allowlist, remedy=HTTP_ALLOWLIST_REMEDY)
    except TargetUnreachable as exc:
        log_refusal(exc, "an HTTP node's request")
        if exc.temporary:
            raise _Transient("HTTP_UNREACHABLE", exc.shown) from None
        raise NodeError(exc.shown, reason="HTTP_TARGET_FORBIDDEN") from None


# -- outputs ----------------------------------------------------------------


def _outputs(fetched: _Fetched, attempts: int, expect_json: bool | None) -> dict[str, Any]:
    text = fetched.content.decode(_codec(fetched.charset), errors="replace")
    success = 200 <= fetched.status_code < 300
    parsed: Any = None
    mime = fetched.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json_type = mime == "application/json" or mime.endswith("+json")
    if text.strip() and (expect_json or (expect_json is None and is_json_type)):
        try:
            parsed = json_parse.loads_python(text)
        except ValueError as exc:
            if expect_json and success:
                raise NodeError(f"response from {fetched.url} is not JSON: {exc}", reason="HTTP_INVALID_JSON") from exc
    response = {
        "status_code": fetched.status_code,
        "headers": dict(fetched.headers.items()),
        "body": text,
        "json": parsed,
        "url": fetched.url,
        "attempts": attempts,
    }
    return {"response": response, "status_code": fetched.status_code, "success": success}


def _codec(charset: str | None) -> str:
    if charset:
        try:
            return codecs.lookup(charset).name
        except LookupError:
            pass
    return "utf-8"


# -- node types -------------------------------------------------------------


class _HTTPNode(NodeType):
    """What both HTTP node types share: outputs, safety, running an HttpCall."""

    category: ClassVar[str] = "api"
    outputs_schema: ClassVar[JsonSchema] = _OUTPUTS_SCHEMA
    # Stored once: the body is already there twice when it is JSON (as text and parsed).
    output_aliases: ClassVar[Mapping[str, str]] = {"result": "response"}
    # ${name} references may name any parameter, so connections may write any name.
    open_inputs: ClassVar[bool] = True
    # Class-level: a POST is not safe to run twice, so neither type is.
    retry_safe: ClassVar[bool] = False
    default_timeout: ClassVar[float] = 60.0
    max_timeout: ClassVar[float] = 600.0
    # Parameters taken from the workflow's config only (RateLimitedAPINode's limits).
    config_only: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def is_retry_safe(cls, config: Mapping[str, Any]) -> bool:
        # Safe methods only (RFC 9110): rerunning a POST could act twice.
        return str(config.get("method", "GET")).upper() in ("GET", "HEAD", "OPTIONS")

    @classmethod
    def validate_config(cls, config: Mapping[str, Any], path: str) -> list[Violation]:
        """The schema's problems, and headers no request may carry: refused when the workflow is
        created rather than failing every run."""
        problems = super().validate_config(config, path)
        properties = cls.config_schema.get("properties", {})
        for key in ("default_headers", "headers"):
            given = config.get(key)
            if key in properties and isinstance(given, Mapping):
                problems += header_problems(given, f"{path}.{key}")
        # RESTClientNode sends its api_key auth under this name.
        name = config.get("api_key_header")
        if "api_key_header" in properties and isinstance(name, str) and name and (problem := header_name_problem(name)):
            problems.append((f"{path}.api_key_header", f"{header_label(name)} {problem}"))
        return problems[:MAX_CONFIG_PROBLEMS]

    def call(
        self, params: Mapping[str, Any], secrets: Revealed = NONE, profile: HttpResource | None = None
    ) -> HttpCall:
        """The request `params` describe, with `secrets` in the config values that reference them,
        against `profile` (a named HTTP resource) when the node names one."""
        raise NotImplementedError

    def prepare(self, config: Mapping[str, Any]) -> HttpPrepared:
        pinned_keys = self.config_only + (RESOURCE_PINNED if "resource_name" in config else ())
        return HttpPrepared(
            ConfigSecrets.of(config, self.secret_fields, SECRET_TARGETS),
            {key: config.get(key, ABSENT) for key in pinned_keys},
        )

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        check_params(type(self), params)
        pinned = prepared.pinned if isinstance(prepared, HttpPrepared) else {}
        for key in self.config_only:
            if params.get(key, ABSENT) != pinned.get(key, ABSENT):
                raise NodeError(
                    f"{key} must be set in the workflow's config, not by an execution input or a connection",
                    reason="CONFIG_ONLY_PARAMETER",
                )
        scope = prepared.secrets if isinstance(prepared, HttpPrepared) else None
        if params.get("resource_name") is not None:
            pinned_to_config(params, pinned, RESOURCE_PINNED)
        profile = await _profile(ctx, params)
        async with revealed(ctx, scope, params) as secrets:
            # A profile's secrets too (none without a profile: then this changes nothing).
            with masking(ctx, profile.secret_values if profile is not None else ()) as mask:
                outputs = await self.send(ctx, self.call(params, secrets, profile), params)
            # A service may echo what it was sent (a URL, a header): the outputs are recorded, so mask it.
            masked: dict[str, Any] = mask.value(secrets.redact(outputs))
            return masked

    async def send(self, ctx: NodeContext, call: HttpCall, params: Mapping[str, Any]) -> dict[str, Any]:
        """Perform `call`; the outputs. RateLimitedAPINode wraps it to hold each attempt to its limit."""
        return await perform(ctx, call)


# With a resource, where the request goes comes from the workflow's config only.
RESOURCE_PINNED: Final = ("resource_name", "url", "method")


@dataclass(frozen=True)
class HttpPrepared:
    """What an HTTP node keeps per workflow version: its config's secret references, and the
    config values of the parameters that may not come from inputs or connections."""

    secrets: ConfigSecrets
    pinned: Mapping[str, Any]


async def _profile(ctx: NodeContext, params: Mapping[str, Any]) -> HttpResource | None:
    """The HTTP resource the node names (`resource_name`), with its secrets; None when it names none."""
    name = params.get("resource_name")
    if name is None:
        return None
    directory = ctx.services.resources
    if directory is None:
        raise NodeError("this server has no resource registry", reason="RESOURCES_UNAVAILABLE")
    return await directory.http(ctx, str(name))


def profile_url(profile: HttpResource, url: Any) -> str:
    """`url` under the profile's base_url, as httpx's `base_url` does: a relative `url` (with or
    without a leading '/') is appended to the base path; an absolute one must be on the same origin
    (the profile's headers carry its credentials)."""
    if url is not None and not isinstance(url, str):
        raise NodeError(f"url must be a string, got {type(url).__name__}", reason="INVALID_PARAMETER")
    base = httpx.URL(profile.base_url)
    try:
        given = httpx.URL(url or "")
        if given.is_relative_url:
            prefix = base.raw_path.split(b"?", 1)[0]
            prefix = prefix if prefix.endswith(b"/") else prefix + b"/"
            joined = base.copy_with(raw_path=prefix + given.raw_path.lstrip(b"/")) if url else base
        else:
            joined = given
    except httpx.InvalidURL as exc:
        raise NodeError(
            f"url {url!r} cannot be resolved against resource {profile.name!r}: {exc}", reason="INVALID_PARAMETER"
        ) from exc
    if (joined.scheme, joined.host, joined.port) != (base.scheme, base.host, base.port):
        raise NodeError(
            f"url {_safe(joined)} leaves the origin of resource {profile.name!r} ({_safe(base.copy_with(path='/'))})",
            reason="HTTP_OUTSIDE_RESOURCE",
        )
    return str(joined)


def with_profile(
    profile: HttpResource, headers: Mapping[str, Any], params: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The profile's headers under the node's own (which win, by case-insensitive name), and the
    parameters with the profile's timeout unless the node sets one."""
    for name in profile.headers:
        # Said here, naming the resource: a profile stored before the rule existed may have one.
        if (problem := header_name_problem(name)) is not None:
            raise NodeError(
                f"header {header_label(name)} of resource {shown(profile.name)} {problem}", reason="INVALID_PARAMETER"
            )
    merged: dict[str, Any] = dict(profile.headers)
    for name, value in headers.items():
        merged = {k: v for k, v in merged.items() if k.lower() != str(name).lower()}
        merged[name] = value
    if profile.timeout is not None and params.get("timeout") is None:
        params = {**params, "timeout": profile.timeout}
    return merged, dict(params)


# Where `${secret:NAME}` is resolved: everything that goes into the request.
_REQUEST_SECRET_FIELDS: Final = frozenset({"url", "headers", "params", "query", "body", "json", "data"})
# Where the request goes: an execution input or a connection that changes
# one of these means no secret is resolved (it could send them elsewhere).
SECRET_TARGETS: Final = ("url", "base_url", "resource", "path", "method", "params", "query", "resource_name")

_HTTP_REQUEST_CONFIG: JsonSchema = {
    "type": "object",
    "properties": {
        "url": {
            "type": "string",
            "minLength": 1,
            "description": "Target URL (with resource_name: resolved against its base_url); may hold ${name} "
            "references.",
        },
        "resource_name": {
            "type": "string",
            "pattern": r"^[a-z0-9][a-z0-9_-]{0,62}$",
            "description": "An HTTP resource of the tenant (/api/resources): its base_url, headers and timeout.",
        },
        **_COMMON_PROPERTIES,
    },
    "anyOf": [{"required": ["url"]}, {"required": ["resource_name"]}],
    "additionalProperties": False,
}


class HTTPRequestNode(_HTTPNode):
    """One HTTP request to `url`."""

    type_name: ClassVar[str] = "HTTPRequestNode"
    description: ClassVar[str] = (
        "Sends one HTTP request (retries with backoff on 5xx, 429 and network errors) and returns the response."
    )
    config_schema: ClassVar[JsonSchema] = _HTTP_REQUEST_CONFIG
    inputs_schema: ClassVar[JsonSchema] = _inputs_schema(_HTTP_REQUEST_CONFIG)
    secret_fields: ClassVar[frozenset[str]] = _REQUEST_SECRET_FIELDS

    @classmethod
    def validate_config(cls, config: Mapping[str, Any], path: str) -> list[Violation]:
        problems = [p for p in super().validate_config(config, path) if "is not valid under any" not in p[1]]
        if "url" not in config and "resource_name" not in config:
            problems.append((f"{path}.url", f"required by {cls.type_name} (or resource_name)"))
        return problems

    def call(
        self, params: Mapping[str, Any], secrets: Revealed = NONE, profile: HttpResource | None = None
    ) -> HttpCall:
        budget = Budget()  # one for all the node's parameters
        url = substitute(params.get("url"), params, secrets.for_key("url"), budget)
        headers = substitute(params.get("headers") or {}, params, secrets.for_key("headers"), budget)
        if profile is None:
            return build_call(params, url, headers, secrets=secrets, budget=budget)
        merged, params = with_profile(profile, headers, params)
        return build_call(
            params,
            profile_url(profile, url),
            merged,
            sensitive_headers=profile.secret_headers,
            secrets=secrets,
            budget=budget,
        )


AUTH_TYPES: Final = ("none", "bearer", "basic", "api_key")

_REST_CONFIG: JsonSchema = {
    "type": "object",
    "properties": {
        "base_url": {"type": "string", "minLength": 1, "description": "e.g. https://api.example.com/v1"},
        "resource": {"type": "string", "description": "Path appended to base_url; may hold ${name} references."},
        "path": {"type": "string", "description": "Same as `resource`."},
        "auth_type": {"enum": list(AUTH_TYPES), "default": "none"},
        "auth_token": {"type": "string", "description": "Bearer token or API key."},
        "username": {"type": "string", "description": "For basic auth."},
        "password": {"type": "string", "description": "For basic auth."},
        "api_key_header": {"type": "string", "minLength": 1, "default": "X-API-Key"},
        "default_headers": {**_HEADERS_SCHEMA, "description": "Sent with every request; `headers` override them."},
        **_COMMON_PROPERTIES,
    },
    "required": ["base_url"],
    "allOf": [
        {
            "if": {"properties": {"auth_type": {"enum": ["bearer", "api_key"]}}, "required": ["auth_type"]},
            "then": {"required": ["auth_token"]},
        },
        {
            "if": {"properties": {"auth_type": {"const": "basic"}}, "required": ["auth_type"]},
            "then": {"required": ["username", "password"]},
        },
    ],
    "additionalProperties": False,
}


class RESTClientNode(_HTTPNode):
    """A call to a REST resource under `base_url`, with bearer, basic or API key auth."""

    type_name: ClassVar[str] = "RESTClientNode"
    description: ClassVar[str] = (
        "Calls a REST API resource under base_url with bearer, basic or API key auth; same behaviour and "
        "outputs as HTTPRequestNode."
    )
    config_schema: ClassVar[JsonSchema] = _REST_CONFIG
    inputs_schema: ClassVar[JsonSchema] = _inputs_schema(_REST_CONFIG)
    secret_fields: ClassVar[frozenset[str]] = _REQUEST_SECRET_FIELDS | {
        "base_url",
        "resource",
        "path",
        "auth_token",
        "username",
        "password",
        "default_headers",
    }

    def call(
        self, params: Mapping[str, Any], secrets: Revealed = NONE, profile: HttpResource | None = None
    ) -> HttpCall:
        budget = Budget()  # one for all the node's parameters
        base = substitute(params.get("base_url"), params, secrets.for_key("base_url"), budget)
        resource_key = "resource" if "resource" in params else "path"
        resource = substitute(params.get(resource_key), params, secrets.for_key(resource_key), budget)
        if not isinstance(base, str) or not base:
            raise NodeError("base_url must be a non-empty string", reason="INVALID_PARAMETER")
        url = base
        if resource not in (None, ""):
            url = base.rstrip("/") + "/" + str(resource).lstrip("/")
        headers: dict[str, Any] = {}
        for key in ("default_headers", "headers"):
            for name, value in (substitute(params.get(key) or {}, params, secrets.for_key(key), budget)).items():
                headers = {k: v for k, v in headers.items() if k.lower() != str(name).lower()}
                headers[name] = value
        sensitive: frozenset[str] = frozenset()
        auth_type = params.get("auth_type") or "none"
        if auth_type != "none":
            name, value = self._auth_header(auth_type, params, secrets, budget)
            headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
            headers[name] = value
            sensitive = frozenset({name.lower()})
        return build_call(params, url, headers, sensitive_headers=sensitive, secrets=secrets, budget=budget)

    @staticmethod
    def _auth_header(auth_type: str, params: Mapping[str, Any], secrets: Revealed, budget: Budget) -> tuple[str, str]:
        if auth_type == "basic":
            username = substitute(params.get("username"), params, secrets.for_key("username"), budget)
            password = substitute(params.get("password"), params, secrets.for_key("password"), budget)
            if username is None or password is None:
                raise NodeError("basic auth needs username and password", reason="INVALID_PARAMETER")
            if ":" in str(username):
                raise NodeError("a basic auth username may not contain ':'", reason="INVALID_PARAMETER")
            pair = f"{username}:{password}".encode()
            return "Authorization", "Basic " + base64.b64encode(pair).decode("ascii")
        token = substitute(params.get("auth_token"), params, secrets.for_key("auth_token"), budget)
        if token is None or token == "":
            raise NodeError(f"auth_type {auth_type} needs auth_token", reason="INVALID_PARAMETER")
        if auth_type == "bearer":
            return "Authorization", f"Bearer {token}"
        header = str(params.get("api_key_header") or "X-API-Key")
        return header, str(token)
