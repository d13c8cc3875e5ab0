"""https requests go to the address the SSRF guard checked, with TLS for the name: a name that
answers a checked address to the guard and an internal one to a second lookup (DNS rebinding)
never gets a connection to the internal one. HTTP nodes, webhook deliveries and service health
checks alike; and a failed connection tells the tenant what failed, not the error's text.

The stage: a TLS server on 127.0.0.1 whose certificate (from a CA of the test's own) names
api/b/svc/hooks.example.test, and a listener at the same port on ::1, the "internal" service. The
guard's lookups (egress.getaddrinfo) answer 127.0.0.1, allowlisted as an address; every other
lookup (socket.getaddrinfo, what httpcore would use to connect by name) answers ::1."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpcore
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2_grpc

from flowport.server import egress
from flowport.server.nodes.base import NodeError
from flowport.server.resolver import RESOLVING_FOR
from flowport.server.service_checks import HEALTHY, UNHEALTHY, probe
from flowport.server.webhooks import delivery
from flowport.v1 import registry_pb2

from .test_http_nodes import make_ctx
from .test_http_nodes import run_http as run_node

pytestmark = pytest.mark.timeout(120)

CERTIFIED = ("api.example.test", "b.example.test", "svc.example.test", "hooks.example.test")
UNCERTIFIED = "c.example.test"  # resolves like the others; the certificate does not name it
ALLOWLIST = frozenset({"127.0.0.1"})  # the address, not the names: names are checked and pinned


# -- certificates ----------------------------------------------------------------------------


def _certificate(
    subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server certificate it signed for CERTIFIED (DNS names only, no IP address)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowport test CA")])
    ca = (
        _certificate(ca_name, ca_key, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        _certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERTIFIED[0])]), key, ca_name, ca_key)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in CERTIFIED]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("pki")
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Pki(ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


# -- the servers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    connection: int
    sni: str | None
    host: str | None
    path: str


@dataclass
class Stage:
    port: int
    # Requests the TLS server on 127.0.0.1 answered, with the TLS name of their connection.
    seen: list[Seen] = field(default_factory=list)
    # Connections the internal listener on ::1 accepted, and the bytes it was sent.
    internal_connections: int = 0
    internal_bytes: int = 0
    # Lookups made outside the guard, for names of this test.
    second_lookups: list[str] = field(default_factory=list)


async def _serve_tls(
    stage: Stage, names: dict[Any, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    connection = next(_connections)
    sni = names.get(writer.get_extra_info("ssl_object"))
    try:
        while True:  # keep-alive: every request on the connection
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict(line.split(":", 1) for line in head[1:] if line)
            headers = {name.lower(): value.strip() for name, value in headers.items()}
            if int(headers.get("content-length", 0)):
                await reader.readexactly(int(headers["content-length"]))
            stage.seen.append(Seen(connection, sni, headers.get("host"), head[0].split(" ")[1]))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


_connections = itertools.count(1000)


async def _serve_internal(stage: Stage, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    stage.internal_connections += 1
    with contextlib.suppress(ConnectionError):
        stage.internal_bytes += len(await asyncio.wait_for(reader.read(65536), 2))
    writer.close()


@pytest.fixture
async def stage(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stage]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    names: dict[Any, str] = {}  # the name each connection asked for, by its SSL object

    def record_name(ssl_object: Any, name: str | None, _: ssl.SSLContext) -> None:
        if name is not None:
            names[ssl_object] = name

    context.sni_callback = record_name

    holder: list[Stage] = []
    try:
        internal = await asyncio.start_server(lambda r, w: _serve_internal(holder[0], r, w), "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback for the internal listener")
    port = internal.sockets[0].getsockname()[1]
    try:
        tls = await asyncio.start_server(
            lambda r, w: _serve_tls(holder[0], names, r, w), "127.0.0.1", port, ssl=context
        )
    except OSError:
        internal.close()
        pytest.skip(f"port {port} is taken on 127.0.0.1")
    holder.append(Stage(port))
    ours = (*CERTIFIED, UNCERTIFIED)

    async def checked_lookup(host: str, port: int) -> list[tuple[Any, ...]]:
        if host not in ours:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    system_lookup = socket.getaddrinfo

    def second_lookup(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in ours:
            holder[0].second_lookups.append(name)
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", int(port), 0, 0))]
        return system_lookup(host, port, *args, **kwargs)

    monkeypatch.setattr(egress, "getaddrinfo", checked_lookup)
    monkeypatch.setattr(socket, "getaddrinfo", second_lookup)
    try:
        yield holder[0]
    finally:
        for server in (tls, internal):
            server.close()
            await server.wait_closed()


@pytest.fixture
async def client(pki: Pki) -> AsyncIterator[httpx.AsyncClient]:
    trusted = ssl.create_default_context(cadata=pki.ca_pem.decode())
    async with httpx.AsyncClient(verify=trusted, trust_env=False) as shared:
        yield shared


@pytest.fixture
def tenant() -> Iterator[str]:
    acting = RESOLVING_FOR.set("t1")  # as the engine, the dispatcher and the checker set it
    try:
        yield "t1"
    finally:
        RESOLVING_FOR.reset(acting)


async def run_http(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    return await run_node(make_ctx(client, timeout=30.0, allowlist=ALLOWLIST), **params)


def assert_never_inside(stage: Stage) -> None:
    assert stage.second_lookups == [], "the name was looked up again to connect"
    assert stage.internal_connections == 0, "a connection reached the internal address"


# -- HTTP nodes ------------------------------------------------------------------------------


async def test_https_goes_to_the_checked_address_with_tls_for_the_name(stage: Stage, client: httpx.AsyncClient) -> None:
    out = await run_http(client, url=f"https://api.example.test:{stage.port}/x", timeout=10)
    assert out["success"] is True and out["response"]["body"] == "ok"
    assert out["response"]["url"] == f"https://api.example.test:{stage.port}/x"
    # The certificate names no address: the handshake passed because it was verified for the name.
    [seen] = stage.seen
    assert (seen.sni, seen.host, seen.path) == ("api.example.test", f"api.example.test:{stage.port}", "/x")
    assert_never_inside(stage)


async def test_names_on_one_address_keep_their_own_connections(stage: Stage, client: httpx.AsyncClient) -> None:
    # A connection whose TLS was for one name never carries another name's request (its
    # certificate was not verified for it), and each name's connection is still kept alive.
    for name in ("api.example.test", "b.example.test", "api.example.test"):
        out = await run_http(client, url=f"https://{name}:{stage.port}/{name}", timeout=10)
        assert out["success"] is True
    assert [(seen.sni, seen.host) for seen in stage.seen] == [
        (name, f"{name}:{stage.port}") for name in ("api.example.test", "b.example.test", "api.example.test")
    ]
    first, second, third = (seen.connection for seen in stage.seen)
    assert first != second and third == first
    assert_never_inside(stage)


async def test_the_certificate_is_verified_for_the_name_and_its_failure_not_quoted(
    stage: Stage, client: httpx.AsyncClient, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=egress.__name__), pytest.raises(NodeError) as caught:
        await run_http(client, url=f"https://{UNCERTIFIED}:{stage.port}/x", timeout=10)
    assert (caught.value.reason, caught.value.retryable) == ("HTTP_UNREACHABLE", True)
    assert caught.value.message == (
        f"GET https://{UNCERTIFIED}:{stage.port}/x failed: TLS handshake failed (after 1 attempt)"
    )
    assert stage.seen == []
    assert_never_inside(stage)
    [logged] = [r.getMessage() for r in caplog.records if r.name == egress.__name__]
    assert f"tenant {tenant}" in logged and "CERTIFICATE_VERIFY_FAILED" in logged


async def test_a_refused_connection_says_so_without_the_error(
    client: httpx.AsyncClient, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed: nothing listens on it
        with caplog.at_level(logging.INFO, logger=egress.__name__), pytest.raises(NodeError) as caught:
            await run_http(client, url=f"http://127.0.0.1:{port}/x", timeout=10)
    assert caught.value.reason == "HTTP_UNREACHABLE"
    assert caught.value.message == f"GET http://127.0.0.1:{port}/x failed: could not connect (after 1 attempt)"
    [logged] = [r.getMessage() for r in caplog.records if r.name == egress.__name__]
    assert f"tenant {tenant}" in logged and "ConnectError" in logged


class _CopiedArguments(httpcore._trace.Trace):
    """httpcore as it might become: its trace hook sees a copy of the connection's arguments."""

    def __init__(self, name: str, logger: Any, request: Any = None, kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(name, logger, request, dict(kwargs or {}))


async def test_a_connection_anywhere_but_the_checked_address_is_dropped_before_tls(
    stage: Stage, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the address no longer swapped in, the connection would go by name to the second
    # lookup's answer: it is closed as soon as it is made, before a byte is sent.
    monkeypatch.setattr(httpcore._async.connection, "Trace", _CopiedArguments)
    with pytest.raises(NodeError) as caught:
        await run_http(client, url=f"https://api.example.test:{stage.port}/x", timeout=10)
    assert caught.value.reason == "HTTP_UNREACHABLE"
    assert caught.value.message.endswith("failed: could not connect (after 1 attempt)")
    assert stage.seen == []
    assert stage.internal_bytes == 0, "nothing was sent to the internal address"


# -- webhooks and service health checks ------------------------------------------------------


async def _deliver(client: httpx.AsyncClient, url: str) -> delivery.Outcome:
    return await delivery.attempt(
        client,
        delivery.Target(httpx.URL(url), {}, b""),
        body=b"{}",
        event_id="evt_1",
        delivery_id="dlv_1",
        attempt_number=1,
        timeout=10.0,
        allowlist=ALLOWLIST,
    )


async def test_a_webhook_delivery_goes_to_the_checked_address(stage: Stage, client: httpx.AsyncClient) -> None:
    outcome = await _deliver(client, f"https://hooks.example.test:{stage.port}/hook")
    assert outcome.ok and outcome.error == ""
    [seen] = stage.seen
    assert (seen.sni, seen.host, seen.path) == ("hooks.example.test", f"hooks.example.test:{stage.port}", "/hook")
    assert_never_inside(stage)
    # A failed handshake is told as such, not with the TLS library's words.
    failed = await _deliver(client, f"https://{UNCERTIFIED}:{stage.port}/hook")
    assert (failed.status_code, failed.retryable) == (0, True)
    assert failed.error == "request failed: ConnectError: TLS handshake failed"
    assert_never_inside(stage)


async def test_a_service_health_check_goes_to_the_checked_address(stage: Stage, client: httpx.AsyncClient) -> None:
    service = registry_pb2.RegisteredService(
        service_id="svc_1", endpoint=f"https://svc.example.test:{stage.port}", health_path="/health"
    )
    status = (await probe(client, service, ALLOWLIST, timeout=10.0)).status
    assert status == HEALTHY
    [seen] = stage.seen
    assert (seen.sni, seen.host, seen.path) == ("svc.example.test", f"svc.example.test:{stage.port}", "/health")
    assert_never_inside(stage)


async def test_a_grpcs_health_check_goes_to_the_checked_address_with_tls_for_the_name(
    stage: Stage, client: httpx.AsyncClient, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gRPC resolves names itself (not through socket.getaddrinfo): these do not resolve for it at
    # all, so a check that passes connected to the checked address.
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(pki.key_file.read_bytes(), pki.cert_file.read_bytes())])
    )
    await server.start()
    # The checker trusts the system's CAs; here the test's own.
    monkeypatch.setattr(grpc, "ssl_channel_credentials", functools.partial(grpc.ssl_channel_credentials, pki.ca_pem))
    try:
        statuses = []
        for name in ("svc.example.test", UNCERTIFIED):
            service = registry_pb2.RegisteredService(service_id="svc_1", endpoint=f"grpcs://{name}:{port}")
            statuses.append((await probe(client, service, ALLOWLIST, timeout=10.0)).status)
    finally:
        await server.stop(None)
    # The certificate is verified for the name: one it does not name fails.
    assert statuses == [HEALTHY, UNHEALTHY]
