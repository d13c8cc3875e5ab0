"""One delivery attempt: the request, its outcome, and the wait before the next.

An attempt resolves and checks the target, then POSTs the stored body to
the address that was checked (TLS still for the name) within one overall
timeout. 2xx succeeds; timeouts, connection errors, 429
and 5xx may be retried (honouring Retry-After); anything else, and a refused
target, fails for good, as does a header value HTTP cannot carry (outside
printable ASCII) or a header name registration now refuses (one stored
before the rule: Host, Transfer-Encoding and the like). Error texts name no URL and no header value (a header's
name at most), so neither a token in a query string nor a secret ever
reaches the delivery row or a log. A host name that resolves to an internal
address and one that does not resolve are refused alike, with one error
that names neither the address nor the resolver's error (the server log
does): the tenant reads `last_error`, and must not map internal names with
it. Only a temporary lookup failure is retried. A request that fails on
its way says what failed (could not connect, TLS handshake failed, ...),
not the error's text, which would tell an open port from a closed one; the
server log has it, with the tenant.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx
import orjson
from google.protobuf import json_format

from flowport.server.egress import (
    WEBHOOK_ALLOWLIST_REMEDY,
    TargetUnreachable,
    failure_shown,
    header_value_problem,
    log_failure,
    log_refusal,
    route,
)
from flowport.server.events.bus import BusEvent
from flowport.server.events.numbers import whole_numbers
from flowport.server.nodes.http import header_label, parse_retry_after
from flowport.server.observability import tracing
from flowport.server.version import VERSION
from flowport.server.webhooks.signing import HEADER as SIGNATURE_HEADER
from flowport.server.webhooks.signing import sign
from flowport.server.webhooks.targets import check_target
from flowport.server.webhooks.validation import header_name_problem, kept_headers

USER_AGENT = f"flowport-webhooks/{VERSION}"
# Enough of a receiver's error body to say what went wrong, no more.
MAX_ERROR_BODY = 200
MAX_READ = 64 * 1024
MAX_ERROR = 1024

_jitter = random.SystemRandom()


def event_body(event: BusEvent) -> bytes:
    """The event as delivered: proto3 JSON with proto field names, every field, compact."""
    proto = event.to_proto()
    as_dict = json_format.MessageToDict(
        proto, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # Declaration order reads best (id and type first).
    ordered = {f.name: whole_numbers(as_dict[f.name]) for f in proto.DESCRIPTOR.fields if f.name in as_dict}
    return orjson.dumps(ordered)


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how a webhook's deliveries are sent."""

    url: httpx.URL
    headers: dict[str, str]
    secret: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to."""

    status_code: int  # 0 when no response arrived
    error: str  # empty on success
    retryable: bool
    retry_after: float | None
    duration_us: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Seconds before the attempt after `attempt`: full jitter over a doubling, capped window.

    Full jitter spreads the retries of many deliveries that failed together
    (a receiver that was down) instead of bringing them back in one wave.
    """
    return _jitter.uniform(0.0, min(cap, initial * 2.0 ** min(attempt - 1, 62)))


def _headers(target: Target, body: bytes, event_id: str, delivery_id: str, attempt: int) -> dict[str, str]:
    headers = kept_headers(target.headers)
    headers.update(
        {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Flowport-Event-Id": event_id,
            "X-Flowport-Delivery-Id": delivery_id,
            "X-Flowport-Delivery-Attempt": str(attempt),
        }
    )
    if target.secret:
        headers[SIGNATURE_HEADER] = sign(target.secret, body, int(time.time()))
    return headers


async def _read_some(response: httpx.Response) -> bytes:
    """Up to MAX_READ bytes of the body: enough to reuse the connection for a short
    answer, without letting a receiver make us download a large one."""
    data = bytearray()
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= MAX_READ:
            break
    return bytes(data)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


async def attempt(
    http: httpx.AsyncClient,
    target: Target,
    *,
    body: bytes,
    event_id: str,
    delivery_id: str,
    attempt_number: int,
    timeout: float,
    allowlist: frozenset[str],
) -> Outcome:
    """POST `body` to `target` once, within `timeout` seconds in all."""
    headers = _headers(target, body, event_id, delivery_id, attempt_number)
    tracing.inject(headers)  # the receiver may continue the trace (nothing with tracing off)
    start = time.perf_counter()

    def outcome(status: int, error: str, retryable: bool, retry_after: float | None = None) -> Outcome:
        return Outcome(status, _clip(error), retryable, retry_after, int((time.perf_counter() - start) * 1e6))

    for name, value in target.headers.items():
        # A webhook stored before registration refused it: a Host or Transfer-Encoding of its own
        # would go out next to flowport's (two Hosts, or a body framed two ways on a shared connection).
        if (problem := header_name_problem(name)) is not None:
            return outcome(0, f"header {header_label(name)} {problem}", retryable=False)
        problem = header_value_problem(value)
        if problem is not None:
            # httpx would raise quoting the character; the value is the receiver's credential.
            return outcome(0, f"header {name} {problem}", retryable=False)
    try:
        async with asyncio.timeout(timeout):
            # To the address that was checked, never to a second answer for the name (egress.route).
            checked = await check_target(target.url, allowlist, remedy=WEBHOOK_ALLOWLIST_REMEDY)
            via = route(target.url, checked)
            headers.update(via.headers)
            request = httpx.Request(
                "POST",
                via.url,
                headers=headers,
                content=body,
                extensions={"timeout": httpx.Timeout(timeout).as_dict(), **via.extensions},
            )
            response = await http.send(request, stream=True, follow_redirects=False)
            try:
                content = await _read_some(response)
            finally:
                await response.aclose()
    except TargetUnreachable as exc:
        # The tenant sees `shown`; what the name resolved to, or why it did not, is the log's.
        log_refusal(exc, f"webhook delivery {delivery_id}")
        return outcome(0, exc.shown, retryable=exc.temporary)
    except (TimeoutError, httpx.TimeoutException):
        return outcome(0, f"no answer within {timeout:g}s", retryable=True)
    except httpx.HTTPError as exc:
        # Connection refused or reset, a malformed answer: the receiver may recover. What failed,
        # not the error's text, which tells an open port from a closed one (the log has it).
        log_failure(exc, f"webhook delivery {delivery_id}")
        return outcome(0, f"request failed: {type(exc).__name__}: {failure_shown(exc)}", retryable=True)
    status = response.status_code
    if 200 <= status < 300:
        return outcome(status, "", retryable=False)
    # A compressed body (read raw) would only show as noise.
    encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
    snippet = "" if encoded else content[:MAX_ERROR_BODY].decode("utf-8", errors="replace").strip()
    error = f"receiver answered HTTP {status}" + (f": {snippet}" if snippet else "")
    if status == 429 or status >= 500:
        return outcome(
            status, error, retryable=True, retry_after=parse_retry_after(response.headers.get("retry-after"))
        )
    return outcome(status, error, retryable=False)
