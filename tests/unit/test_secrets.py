"""Secrets: sealed at rest, write-only through the API, per tenant, resolved
only inside the node that needs them, and rotated without downtime.

Real components throughout: the gRPC server in-process on a SQLite file, a
real HTTP server on 127.0.0.1 for the nodes to call, and the key file the
server creates."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import grpc
import httpx
import pytest
from google.protobuf import json_format, struct_pb2

from flowport.clients import ApiError, AsyncClient
from flowport.clients.cli import main
from flowport.clients.cli.secrets import rotate_key
from flowport.server.api.secrets import MAX_VALUE_BYTES
from flowport.server.app import Running, start, stop
from flowport.server.events.bus import BusEvent
from flowport.server.secrets.cipher import Sealed, SecretDecryptError, associated_data, open_sealed, seal
from flowport.server.secrets.keyring import Keyring, KeyringError, generate_key, parse, read_key_file
from flowport.server.secrets.redaction import MASK, Redactor
from flowport.server.secrets.source import KEY_FILE, open_key_source
from flowport.server.secrets.vault import SecretVault
from flowport.server.settings import Settings, SettingsError
from flowport.server.storage import SqliteStore
from flowport.server.storage.postgres import PostgresStore
from flowport.v1 import apikey_pb2, audit_pb2, execution_pb2, resource_pb2, secret_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings

# Characters that change when URL-, JSON- or repr-encoded (ASCII: it goes into a header too).
TOKEN = "tok_8f3a!d9 e+/=&?\"'\\-TOP-SECRET"
P = secret_pb2


# -- a receiver on 127.0.0.1 ------------------------------------------------


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.seen: list[tuple[str, dict[str, str]]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers with what it was sent, in the body and a header: the worst case for leaks."""

    server: _Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.seen.append((self.path, headers))
        self.rfile.read(int(headers.get("content-length") or 0))
        if self.path == "/hop":  # to another origin: localhost instead of 127.0.0.1
            self.send_response(307)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/landed")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"path": self.path, "authorization": headers.get("authorization", "")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Echo", headers.get("authorization", ""))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- the server and its clients ---------------------------------------------


async def _tenant_client(admin: AsyncClient, running: Running, tenant: str) -> AsyncClient:
    created = await admin.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant=tenant, roles=["user"]))
    )
    return AsyncClient(f"127.0.0.1:{running.port}", api_key=created.key)


@pytest.fixture
async def beta(admin: AsyncClient, running: Running) -> AsyncIterator[AsyncClient]:
    client = await _tenant_client(admin, running, "beta")
    async with client:
        yield client


async def _error(awaitable: Any) -> ApiError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return ApiError.from_rpc_error(caught.value)


async def _put(client: AsyncClient, name: str, value: str, **fields: Any) -> P.Secret:
    return await client.secrets.PutSecret(P.PutSecretRequest(name=name, value=value, **fields))


def _workflow(name: str, nodes: list[dict[str, Any]]) -> workflow_pb2.Workflow:
    return json_format.ParseDict({"name": name, "nodes": nodes}, workflow_pb2.Workflow())


async def _run(client: AsyncClient, workflow: workflow_pb2.Workflow, inputs: dict[str, Any] | None = None) -> Any:
    await client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
    request = execution_pb2.CreateExecutionRequest(workflow_id=workflow.name, wait=True)
    if inputs:
        request.inputs.CopyFrom(json_format.ParseDict(inputs, struct_pb2.Struct()))
    return await client.executions.CreateExecution(request)


def _call_node(url: str, **config: Any) -> dict[str, Any]:
    return {"type": "HTTPRequestNode", "name": "call", "config": {"url": url, **config}}


def _stored_bytes(data_dir: Path) -> bytes:
    """Every byte of the database as it is on disk (main file and write-ahead log)."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("flowport.db*")))


# -- sealing ----------------------------------------------------------------


def test_sealed_values_open_only_with_their_key_tenant_and_name() -> None:
    ring = Keyring((generate_key(),))
    sealed = seal(ring, "acme", "API_TOKEN", TOKEN.encode())
    assert sealed.key_id == ring.primary_id and TOKEN.encode() not in sealed.blob
    assert open_sealed(ring, "acme", "API_TOKEN", sealed) == TOKEN.encode()
    # The same value sealed twice differs (random nonce): equal values are not recognisable at rest.
    assert seal(ring, "acme", "API_TOKEN", TOKEN.encode()).blob != sealed.blob
    for tenant, name in [("beta", "API_TOKEN"), ("acme", "OTHER"), ("acmeAPI_", "TOKEN")]:
        with pytest.raises(SecretDecryptError, match="does not authenticate"):
            open_sealed(ring, tenant, name, sealed)
    with pytest.raises(SecretDecryptError, match="does not hold key"):
        open_sealed(Keyring((generate_key(),)), "acme", "API_TOKEN", sealed)
    tampered = Sealed(sealed.key_id, sealed.blob[:-1] + bytes([sealed.blob[-1] ^ 1]))
    with pytest.raises(SecretDecryptError):
        open_sealed(ring, "acme", "API_TOKEN", tampered)
    # Length-prefixed: no (tenant, name) pair can spell another's associated data.
    assert associated_data("ab", "c") != associated_data("a", "bc")


def test_a_ciphertext_relabelled_with_another_keys_id_does_not_open() -> None:
    ring = Keyring((generate_key(),))
    sealed = seal(ring, "acme", "API_TOKEN", b"v")
    impostor = Keyring((generate_key(),))
    forged = Sealed(impostor.primary_id, sealed.blob)
    with pytest.raises(SecretDecryptError):
        open_sealed(impostor, "acme", "API_TOKEN", forged)


def test_keyring_text_form_and_its_errors() -> None:
    first, second = generate_key(), generate_key()
    text = f"# comment\n{base64.b64encode(first).decode()}\n{base64.urlsafe_b64encode(second).decode().rstrip('=')}\n"
    ring = parse(text, "test")
    assert ring.keys == (first, second) and ring.primary == first
    assert parse(f"{base64.b64encode(first).decode()},{base64.b64encode(second).decode()}", "env").keys == ring.keys
    with pytest.raises(KeyringError, match="test: key 1 is 3 bytes"):
        parse(base64.b64encode(b"abc").decode(), "test")
    with pytest.raises(KeyringError, match="not base64"):
        parse("not base64!", "test")
    with pytest.raises(KeyringError, match="holds no key"):
        parse("# nothing\n", "test")


def test_the_secrets_key_setting_is_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="secrets_key"):
        make_settings(tmp_path, secrets_key="c2hvcnQ=")
    key = base64.b64encode(generate_key()).decode()
    with pytest.raises(SettingsError, match="not both"):
        make_settings(tmp_path, secrets_key=key, secrets_key_file=tmp_path / "keys")
    settings = make_settings(tmp_path / "data", secrets_key=key)
    assert open_key_source(settings).current().primary == base64.b64decode(key)
    # The setting replaces the key file: none is created.
    assert not (settings.data_dir / KEY_FILE).exists()
    with pytest.raises(KeyringError, match="does not exist"):
        open_key_source(make_settings(tmp_path / "data", secrets_key_file=tmp_path / "missing"))


def test_redactor_masks_the_forms_a_value_comes_back_in() -> None:
    value = TOKEN + "λ"
    redactor = Redactor([value, "other"])
    forms = [
        value,
        quote(value, safe=""),
        quote_plus(value),
        str(httpx.URL("http://h/x?key=" + value)).split("key=", 1)[1],  # partly encoded, as httpx leaves it
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
        repr(value.encode())[2:-1],
    ]
    for form in forms:
        assert redactor.text(f"<{form}>") == f"<{MASK}>", form
    assert redactor.value({value: [f"Bearer {value}", 3]}) == {MASK: [f"Bearer {MASK}", 3]}
    assert redactor.text(f"cannot resolve {value.lower()}.invalid") == f"cannot resolve {MASK}.invalid"  # a URL host
    assert redactor.text("an0ther value") == "an0ther value"
    assert redactor.text("another value") == f"an{MASK} value"  # masked wherever it appears
    assert not Redactor([])


def test_masking_is_plain_substring_search_whatever_the_data() -> None:
    # Per-character patterns made this quadratic: a 4 KiB secret of 'a's and
    # 200,000 'a's of output stalled the event loop for seconds.
    secret = "a" * 4095 + "b"
    output = "a" * 200_000 + secret
    assert Redactor([secret]).text(output) == "a" * 200_000 + MASK


# -- the API ----------------------------------------------------------------


async def test_values_never_come_back_from_the_api(admin: AsyncClient, settings: Settings) -> None:
    put = await _put(admin, "API_TOKEN", TOKEN, description="the payment API")
    got = await admin.secrets.GetSecret(P.GetSecretRequest(name="API_TOKEN"))
    listed = await admin.secrets.ListSecrets(P.ListSecretsRequest())
    assert put == got and list(listed.secrets) == [got]
    assert (got.name, got.tenant, got.description, got.version) == ("API_TOKEN", "default", "the payment API", 1)
    assert got.create_time == got.update_time and got.create_time.seconds > 0
    for message in (put, got, listed):
        assert TOKEN.encode() not in message.SerializeToString()
        assert TOKEN not in json_format.MessageToJson(message)
    # Not on disk either: only sealed.
    assert TOKEN.encode() not in _stored_bytes(settings.data_dir)


async def test_secret_changes_are_audited_without_their_values(admin: AsyncClient) -> None:
    await _put(admin, "API_TOKEN", TOKEN)
    await admin.secrets.DeleteSecret(P.DeleteSecretRequest(name="API_TOKEN"))
    request = audit_pb2.ListAuditEventsRequest(action="secret.*")
    for _ in range(50):  # entries ride on the next group commit
        entries = (await admin.audit.ListAuditEvents(request)).audit_events
        if len(entries) == 2:
            break
        await asyncio.sleep(0.05)
    assert [(e.action, e.resource, e.resource_tenant, e.code) for e in entries] == [
        ("secret.deleted", "secrets/API_TOKEN", "default", "OK"),
        ("secret.written", "secrets/API_TOKEN", "default", "OK"),
    ]
    assert all(TOKEN.encode() not in e.SerializeToString() for e in entries)


async def test_put_replaces_with_a_new_version_and_the_same_put_changes_nothing(admin: AsyncClient) -> None:
    first = await _put(admin, "DB_PASSWORD", "one")
    again = await _put(admin, "DB_PASSWORD", "one")
    assert again == first
    changed = await _put(admin, "DB_PASSWORD", "two")
    assert changed.version == 2 and changed.create_time == first.create_time
    described = await _put(admin, "DB_PASSWORD", "two", description="rotated monthly")
    assert described.version == 3 and described.description == "rotated monthly"


async def test_list_pages_by_name_and_delete_removes(admin: AsyncClient) -> None:
    for name in ["C", "A", "B"]:
        await _put(admin, name, "v")
    page = await admin.secrets.ListSecrets(P.ListSecretsRequest(page_size=2))
    assert [s.name for s in page.secrets] == ["A", "B"] and page.next_page_token
    rest = await admin.secrets.ListSecrets(P.ListSecretsRequest(page_size=2, page_token=page.next_page_token))
    assert [s.name for s in rest.secrets] == ["C"] and not rest.next_page_token
    await admin.secrets.DeleteSecret(P.DeleteSecretRequest(name="B", request_id="del-1"))
    # A retry of a delete that succeeded succeeds.
    await admin.secrets.DeleteSecret(P.DeleteSecretRequest(name="B", request_id="del-1"))
    for call in (
        admin.secrets.GetSecret(P.GetSecretRequest(name="B")),
        admin.secrets.DeleteSecret(P.DeleteSecretRequest(name="B")),
    ):
        error = await _error(call)
        assert (error.code(), error.reason, error.metadata) == (
            grpc.StatusCode.NOT_FOUND,
            "SECRET_NOT_FOUND",
            {"name": "B"},
        )


async def test_request_id_replays_and_refuses_another_secret(admin: AsyncClient) -> None:
    first = await _put(admin, "TOKEN", "one", request_id="r-1")
    await _put(admin, "TOKEN", "two")
    # The retry returns the first result and changes nothing.
    assert await _put(admin, "TOKEN", "one", request_id="r-1") == first
    assert (await admin.secrets.GetSecret(P.GetSecretRequest(name="TOKEN"))).version == 2
    error = await _error(_put(admin, "OTHER", "one", request_id="r-1"))
    assert (error.code(), error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"name": "api_token", "value": "s3cr3t-value"}, "name"),
        ({"name": "1TOKEN", "value": "s3cr3t-value"}, "name"),
        ({"name": "A" * 129, "value": "s3cr3t-value"}, "name"),
        ({"name": "", "value": "s3cr3t-value"}, "name"),
        ({"name": "TOKEN", "value": ""}, "value"),
        ({"name": "TOKEN", "value": "s3cr3t-value" + "x" * MAX_VALUE_BYTES}, "value"),
        ({"name": "TOKEN", "value": "s3cr3t-value", "description": "d" * 513}, "description"),
        ({"name": "TOKEN", "value": "s3cr3t-value", "request_id": "r" * 129}, "request_id"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    admin: AsyncClient, request_fields: dict[str, Any], field: str
) -> None:
    error = await _error(admin.secrets.PutSecret(P.PutSecretRequest(**request_fields)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == [field]
    value = request_fields["value"]
    if value:
        assert value not in error.message and all(value not in d for _, d in error.violations)


async def test_the_largest_value_is_accepted(admin: AsyncClient) -> None:
    assert (await _put(admin, "BIG", "é" * (MAX_VALUE_BYTES // 2))).version == 1


async def test_another_tenants_secret_is_not_found(admin: AsyncClient, beta: AsyncClient) -> None:
    await _put(admin, "API_TOKEN", TOKEN)
    for call in (
        beta.secrets.GetSecret(P.GetSecretRequest(name="API_TOKEN")),
        beta.secrets.DeleteSecret(P.DeleteSecretRequest(name="API_TOKEN")),
    ):
        assert (await _error(call)).code() is grpc.StatusCode.NOT_FOUND
    assert list((await beta.secrets.ListSecrets(P.ListSecretsRequest())).secrets) == []
    # Beta's own secret of the same name is a different secret.
    mine = await _put(beta, "API_TOKEN", "beta's own")
    assert (mine.tenant, mine.version) == ("beta", 1)
    assert (await admin.secrets.GetSecret(P.GetSecretRequest(name="API_TOKEN"))).tenant == "default"


def _sqlite_only(where: object) -> None:
    # These read or change the database file behind the server's back; the
    # PostgreSQL run of the other tests covers the same code through the API.
    if (isinstance(where, Settings) and where.database_url is not None) or isinstance(where, PostgresStore):
        pytest.skip("inspects the SQLite file directly")


async def test_a_ciphertext_moved_to_another_tenants_row_does_not_open(admin: AsyncClient, running: Running) -> None:
    _sqlite_only(running.store)
    await _put(admin, "API_TOKEN", TOKEN)
    vault = running.services.secrets
    assert isinstance(vault, SecretVault)
    await vault.put(
        tenant="beta", name="API_TOKEN", value="placeholder", description="", now_us=1, idempotency_key=None
    )
    with sqlite3.connect(running.store.path) as conn:
        conn.execute(
            "UPDATE secrets SET key_id=(SELECT key_id FROM secrets WHERE tenant='default' AND name='API_TOKEN'), "
            "sealed=(SELECT sealed FROM secrets WHERE tenant='default' AND name='API_TOKEN') "
            "WHERE tenant='beta' AND name='API_TOKEN'"
        )
    with pytest.raises(SecretDecryptError, match="does not authenticate"):
        await vault.reveal("beta", ["API_TOKEN"])
    assert await vault.reveal("default", ["API_TOKEN"]) == {"API_TOKEN": TOKEN}


# -- nodes ------------------------------------------------------------------


async def test_an_http_node_gets_the_secret_and_nothing_records_it(
    settings: Settings, receiver: _Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # httpx's request lines are kept at WARNING by a server's log set-up (an earlier test may have
    # made one in this process): let them through here, to see them masked.
    caplog.set_level(logging.DEBUG, logger="httpx")
    running = await start(settings)
    events: list[BusEvent] = []
    running.bus.add_listener(events.append)
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            await _put(admin, "API_TOKEN", TOKEN)
            # Inserted into the URL as written (no URL syntax in it, or it would change the URL's shape).
            await _put(admin, "URL_PART", "u TOP-SECRET!~")
            workflow = _workflow(
                "leaky",
                [
                    _call_node(
                        receiver.url("/echo?raw=${secret:URL_PART}"),
                        params={"key": "${secret:API_TOKEN}"},
                        headers={"Authorization": "Bearer ${secret:API_TOKEN}"},
                    )
                ],
            )
            execution = await _run(admin, workflow)
            assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED, execution.error
            fetched = await admin.executions.GetExecution(
                execution_pb2.GetExecutionRequest(execution_id=execution.execution_id)
            )
            listed = await admin.executions.ListExecutions(execution_pb2.ListExecutionsRequest())
    finally:
        await stop(running, 1.0)
    # It reached the service, in the query and the header...
    path, headers = receiver.seen[0]
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert parse_qs(urlsplit(path).query) == {"raw": ["u TOP-SECRET!~"], "key": [TOKEN]}
    # ...which echoed it back: masked in the recorded outputs.
    response = json_format.MessageToDict(fetched.outputs)["call"]["response"]
    assert response["json"]["authorization"] == f"Bearer {MASK}"
    assert response["headers"]["x-echo"] == f"Bearer {MASK}"
    assert response["url"].endswith(f"/echo?raw={MASK}&key={MASK}")
    # Nowhere else either: responses, events, logs, the database on disk.
    for message in (execution, fetched, listed):
        assert "TOP-SECRET" not in json_format.MessageToJson(message)
    assert events and all("TOP-SECRET" not in str(e.to_proto()) for e in events)
    assert caplog.records and "TOP-SECRET" not in caplog.text
    # httpx logged the request URL, with the values masked as the record was made.
    assert any(r.name == "httpx" and f"raw={MASK}&key={MASK}" in r.getMessage() for r in caplog.records)
    assert all("TOP-SECRET" not in r.getMessage() for r in caplog.records)
    assert b"TOP-SECRET" not in _stored_bytes(settings.data_dir)


async def test_an_unknown_secret_fails_the_node_naming_it(admin: AsyncClient, receiver: _Receiver) -> None:
    workflow = _workflow("missing", [_call_node(receiver.url("/x"), headers={"X-Key": "${secret:NOT_THERE}"})])
    execution = await _run(admin, workflow)
    assert execution.state == execution_pb2.Execution.STATE_FAILED
    assert "NOT_THERE" in execution.error.message
    node_run = execution.node_runs[0]
    assert "SECRET_NOT_FOUND" in str(node_run.error)
    assert receiver.seen == []


async def test_a_node_error_that_would_show_the_value_masks_it(admin: AsyncClient) -> None:
    await _put(admin, "HOST", "secret-host-TOP-SECRET.invalid")
    workflow = _workflow("unresolvable", [_call_node("ftp://${secret:HOST}/x")])
    execution = await _run(admin, workflow)
    assert execution.state == execution_pb2.Execution.STATE_FAILED
    assert "HTTP_INVALID_URL" in str(execution.node_runs[0].error)
    assert "TOP-SECRET" not in json_format.MessageToJson(execution)
    assert MASK in execution.error.message


async def test_a_secret_a_header_cannot_carry_fails_the_node_without_showing_it(
    admin: AsyncClient, receiver: _Receiver
) -> None:
    # httpx's UnicodeEncodeError would quote the character and its position in the value.
    await _put(admin, "ACCENTED", "pa\u00dfw\u00f6rd-TOP-SECRET")
    profile = resource_pb2.HttpProfile(base_url=receiver.url("/"), headers={"X-Key": "${secret:ACCENTED}"})
    await admin.resources.CreateResource(
        resource_pb2.CreateResourceRequest(resource=resource_pb2.Resource(name="partner", http=profile))
    )
    nodes = {
        "header": (
            _call_node(receiver.url("/x"), headers={"Authorization": "Bearer ${secret:ACCENTED}"}),
            "Authorization",
        ),
        "rest": (
            {
                "type": "RESTClientNode",
                "name": "call",
                "config": {"base_url": receiver.url("/"), "auth_type": "api_key", "auth_token": "${secret:ACCENTED}"},
            },
            "X-API-Key",
        ),
        "profile": ({"type": "HTTPRequestNode", "name": "call", "config": {"resource_name": "partner"}}, "X-Key"),
    }
    for name, (node, header) in nodes.items():
        execution = await _run(admin, _workflow(f"accented-{name}", [node]))
        assert execution.state == execution_pb2.Execution.STATE_FAILED, name
        assert "INVALID_PARAMETER" in str(execution.node_runs[0].error), execution.error.message
        assert f"header {header} holds " in execution.error.message, execution.error.message
        recorded = json_format.MessageToJson(execution, ensure_ascii=True) + execution.error.message
        for shown in ("\u00df", "\u00f6", "\\xdf", "\\xf6", "\\u00f6", "TOP-SECRET", "position"):
            assert shown not in recorded, (name, shown)
    assert receiver.seen == []


async def test_each_tenant_resolves_its_own_secret(admin: AsyncClient, beta: AsyncClient, receiver: _Receiver) -> None:
    await _put(admin, "API_TOKEN", "default's")
    await _put(beta, "API_TOKEN", "beta's")
    node = [_call_node(receiver.url("/t"), headers={"Authorization": "${secret:API_TOKEN}"})]
    for client in (admin, beta):
        execution = await _run(client, _workflow("same", node))
        assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED
    assert [h["authorization"] for _, h in receiver.seen] == ["default's", "beta's"]
    # Beta deletes its secret: its node fails; default's still works.
    await beta.secrets.DeleteSecret(P.DeleteSecretRequest(name="API_TOKEN"))
    failed = await beta.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="same", wait=True))
    assert failed.state == execution_pb2.Execution.STATE_FAILED and "API_TOKEN" in failed.error.message


async def test_secrets_do_not_follow_a_redirect_to_another_origin(admin: AsyncClient, receiver: _Receiver) -> None:
    await _put(admin, "API_TOKEN", TOKEN)
    header = _call_node(receiver.url("/hop"), follow_redirects=True, headers={"X-Key": "${secret:API_TOKEN}"})
    execution = await _run(admin, _workflow("hop-header", [header]))
    assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED, execution.error
    assert [path for path, _ in receiver.seen] == ["/hop", "/landed"]
    assert receiver.seen[0][1]["x-key"] == TOKEN and "x-key" not in receiver.seen[1][1]
    body = _call_node(receiver.url("/hop"), method="POST", follow_redirects=True, body={"t": "${secret:API_TOKEN}"})
    refused = await _run(admin, _workflow("hop-body", [body]))
    assert refused.state == execution_pb2.Execution.STATE_FAILED
    assert "HTTP_REDIRECT_REFUSED" in str(refused.node_runs[0].error)
    assert len(receiver.seen) == 3


async def test_values_from_inputs_are_not_searched_for_secrets(admin: AsyncClient, receiver: _Receiver) -> None:
    """A caller's (or a remote service's) data cannot pull a secret into a request."""
    await _put(admin, "API_TOKEN", TOKEN)
    workflow = _workflow("inputs", [_call_node(receiver.url("/i"), headers={"X-Config": "${secret:API_TOKEN}"})])
    execution = await _run(admin, workflow, {"call": {"headers": {"X-Injected": "${secret:API_TOKEN}"}}})
    assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED
    sent = receiver.seen[0][1]
    assert sent["x-injected"] == "${secret:API_TOKEN}" and "x-config" not in sent


async def test_inputs_that_redirect_a_request_get_no_secret(admin: AsyncClient, receiver: _Receiver) -> None:
    """The config's header holds a secret; an input moves the request elsewhere: nothing is resolved."""
    await _put(admin, "API_TOKEN", TOKEN)
    node = _call_node(receiver.url("/configured"), headers={"Authorization": "Bearer ${secret:API_TOKEN}"})
    workflow = _workflow("redirected", [node])
    execution = await _run(admin, workflow, {"call": {"url": receiver.url("/attacker")}})
    assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED
    path, sent = receiver.seen[0][0], receiver.seen[0][1]
    assert path == "/attacker" and TOKEN not in str(sent)
    assert sent["authorization"] == "Bearer ${secret:API_TOKEN}"


async def test_a_sql_node_binds_the_secret_and_masks_it_in_rows(admin: AsyncClient, settings: Settings) -> None:
    await _put(admin, "DB_TOKEN", TOKEN)
    await _put(admin, "DB_FILE", "other.db")
    node = {
        "type": "SQLDatabaseNode",
        "name": "q",
        "config": {
            "connection_string": "sqlite:///${secret:DB_FILE}",
            "query": "SELECT length(:token) AS n, :token AS echoed",
            "query_params": {"token": "${secret:DB_TOKEN}"},
        },
    }
    execution = await _run(admin, _workflow("sql", [node]))
    assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED, execution.error
    row = json_format.MessageToDict(execution.outputs)["q"]["result"]["rows"][0]
    assert row == {"n": len(TOKEN), "echoed": MASK}
    # The connection string's secret was resolved too: the file is in the tenant's folder.
    assert (settings.sqlite_root / "default" / "other.db").exists()


async def test_validation_accepts_secret_references_where_they_resolve(admin: AsyncClient) -> None:
    def validate(nodes: list[dict[str, Any]]) -> Any:
        return admin.workflows.ValidateWorkflow(workflow_pb2.ValidateWorkflowRequest(workflow=_workflow("v", nodes)))

    ok = await validate([_call_node("https://api.example.com", headers={"Authorization": "Bearer ${secret:TOKEN}"})])
    assert ok.valid, ok.errors
    bad = await validate(
        [
            _call_node("https://api.example.com/${secret:bad-name}"),
            {"type": "PythonCodeNode", "name": "code", "config": {"code": "result = '${secret:TOKEN}'"}},
        ]
    )
    assert [e.field for e in bad.errors] == ["nodes[0].config.url", "nodes[1].config.code"]
    assert "secret name 'bad-name'" in bad.errors[0].description
    assert "PythonCodeNode does not resolve" in bad.errors[1].description


# -- keys: first start and rotation -----------------------------------------


async def test_first_start_creates_a_private_key_file_and_keeps_using_it(settings: Settings) -> None:
    running = await start(settings)
    path = settings.data_dir / KEY_FILE
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        first = read_key_file(path)
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            await _put(admin, "KEPT", "across restarts")
    finally:
        await stop(running, 1.0)
    running = await start(settings)
    try:
        assert read_key_file(path) == first
        vault = running.services.secrets
        assert vault is not None
        assert await vault.reveal("default", ["KEPT"]) == {"KEPT": "across restarts"}
    finally:
        await stop(running, 1.0)


async def test_rotate_key_reseals_everything_while_the_server_runs(settings: Settings, receiver: _Receiver) -> None:
    _sqlite_only(settings)
    running = await start(settings)
    path = settings.data_dir / KEY_FILE
    old = read_key_file(path)
    try:
        async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as admin:
            beta = await _tenant_client(admin, running, "beta")
            async with beta:
                for i in range(120):  # more than one batch
                    await _put(admin if i % 2 else beta, f"S{i}", f"value {i}")
            workflow = _workflow("rotating", [_call_node(receiver.url("/r"), headers={"X-V": "${secret:S1}"})])
            before = await _run(admin, workflow)
            lines: list[str] = []
            assert await rotate_key(settings, wait=1.5, out=lines.append) == 0
            # The server keeps serving: it picks up the new key on its own.
            after = await admin.executions.CreateExecution(
                execution_pb2.CreateExecutionRequest(workflow_id="rotating", wait=True)
            )
            new_put = await _put(admin, "AFTER", "sealed with the new key")
    finally:
        await stop(running, 1.0)
    assert before.state == after.state == execution_pb2.Execution.STATE_SUCCEEDED
    assert [h["x-v"] for _, h in receiver.seen] == ["value 1", "value 1"]
    assert new_put.version == 1
    new = read_key_file(path)
    assert new.keys == (new.primary,) and new.primary_id not in old.ids
    assert any("resealed 120 values" in line for line in lines)
    with sqlite3.connect(settings.database_path) as conn:
        key_ids = {row[0] for row in conn.execute("SELECT key_id FROM secrets")}
        audited = conn.execute("SELECT count(*) FROM audit_log WHERE action='secret.key_rotated'").fetchone()
    assert key_ids == {new.primary_id}
    assert audited == (1,)
    # The old key is no longer needed, and no longer enough.
    store = await SqliteStore.open(settings.database_path)
    try:
        only_new = SecretVault(store, open_key_source(settings, create=False))
        assert await only_new.reveal("beta", ["S0"]) == {"S0": "value 0"}
        stored = await store.get_secret("default", "S1")
        assert stored is not None
        with pytest.raises(SecretDecryptError):
            open_sealed(old, "default", "S1", stored.sealed)
    finally:
        await store.close()


def test_rotate_key_cli_and_its_help(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    _sqlite_only(settings)
    argv = ["secrets", "rotate-key", "--data-dir", str(settings.data_dir), "--wait", "0"]
    assert main(argv) == 2  # no database yet: most likely the wrong --data-dir
    assert "no database" in capsys.readouterr().err

    async def first_start() -> None:
        await stop(await start(settings), 1.0)

    asyncio.run(first_start())
    old = read_key_file(settings.data_dir / KEY_FILE)
    assert main(argv) == 0
    assert read_key_file(settings.data_dir / KEY_FILE).primary_id not in old.ids
    assert "done: every secret is encrypted with key" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["secrets", "rotate-key", "--help"])
    assert "Servers keep serving throughout" in capsys.readouterr().out
    assert main(["secrets", "generate-key"]) == 0
    assert len(base64.b64decode(capsys.readouterr().out.strip())) == 32


async def test_rotation_with_the_setting_reports_keys_to_remove(tmp_path: Path) -> None:
    old_key, new_key = generate_key(), generate_key()
    encoded = base64.b64encode(old_key).decode()
    settings = make_settings(tmp_path / "data", secrets_key=encoded)
    store = await SqliteStore.open(settings.database_path)
    try:
        await SecretVault(store, open_key_source(settings)).put(
            tenant="t", name="X", value="v", description="", now_us=1, idempotency_key=None
        )
    finally:
        await store.close()
    rotated = make_settings(tmp_path / "data", secrets_key=f"{base64.b64encode(new_key).decode()},{encoded}")
    lines: list[str] = []
    assert await rotate_key(rotated, wait=0, out=lines.append) == 0
    old_id = Keyring((old_key,)).primary_id
    assert any(f"no value uses keys {old_id} any more" in line for line in lines)
    assert not (settings.data_dir / KEY_FILE).exists()
    # A key that cannot open a value stops the rotation before anything is removed.
    assert await rotate_key(make_settings(tmp_path / "data", secrets_key=encoded), wait=0, out=lines.append) == 1
    assert settings.database_path.exists()
