"""Tenant isolation, for every RPC of every service.

The RPCs come from the descriptor set, not from a list here: tenant "alpha"
owns one of every resource, and tenant "beta" (a user) calls each RPC with
alpha's identifiers in every field that takes one. What beta must see is
derived from the RPC's declared permission and its verb, so a new RPC is
covered as soon as it exists; an RPC whose verb has no rule fails the test
until one is written.

- admin-only RPCs: PERMISSION_DENIED (beta is not an admin);
- Get, Delete, Cancel, Watch, Redeliver, Revoke: NOT_FOUND, never
  PERMISSION_DENIED, which would confirm the resource exists;
- List: none of alpha's identifiers in the answer (or NOT_FOUND when it
  lists under one of alpha's resources);
- Create and Put with alpha's identifiers: beta's own resource, or
  NOT_FOUND where it points at one of alpha's;
- StreamEvents: none of alpha's events, live or replayed by id;
- webhooks: beta's webhook receives none of alpha's events.

Sessions also belong to the credential that created them: another user key
of alpha's own tenant calls every RPC that names a session with alpha's
session id and gets NOT_FOUND (reason SESSION_NOT_FOUND) where it would use
or list by the session, and does not find it listed. What was made in the
session is as missing: every RPC naming an execution or workflow id, called
with those of alpha's execution and workflow in the session, is NOT_FOUND or
shows none of them, and no unfiltered list or event stream carries them.
Alpha's admin sees all of it.

Webhooks belong to the credential that registered them too: the other user
key of alpha's tenant gets NOT_FOUND (WEBHOOK_NOT_FOUND) from every RPC
naming alpha's webhook and does not list it, and its own webhook receives
none of the events of alpha's sessions; alpha's admin sees alpha's webhook.

Another tenant's admin (gamma) administers its own tenant alone: every admin-only RPC it
calls with alpha's identifiers and tenant is refused, missing or shows nothing of alpha's, every
other RPC answers it as it answers beta, and acting for alpha (x-flowport-act-as-tenant) is
refused on every RPC but the public ones.

Afterwards every resource of alpha is checked to be as it was.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

import flowport.v1
from flowport.clients import ApiError, AsyncClient
from flowport.server.app import Running
from flowport.server.auth.permissions import Access, access_for
from flowport.server.auth.principal import ACT_AS_HEADER
from flowport.transcoder.http_rules import descriptor_path
from flowport.v1 import (
    apikey_pb2,
    event_pb2,
    execution_pb2,
    registry_pb2,
    resource_pb2,
    session_pb2,
    webhook_pb2,
    workflow_pb2,
)

from ..conftest import ADMIN_KEY
from .test_webhooks import OK, Receiver

for _module in pkgutil.iter_modules(flowport.v1.__path__):
    if _module.name.endswith("_pb2"):
        importlib.import_module(f"flowport.v1.{_module.name}")

NOT_FOUND_VERBS = ("Get", "Delete", "Cancel", "Watch", "Redeliver", "Revoke", "Heartbeat", "Deregister", "Update")
LIST_VERBS = ("List",)
# Calls that create or change something; beta's version is checked by name.
OWN_VERBS = ("Create", "Put", "Validate", "Register")
# Verbs with which a call uses the session it names (reads, deletes, lists,
# runs or streams in it): another credential of its tenant finds it missing.
SESSION_USE_VERBS = ("Get", "Delete", "Create", "List", "Stream", "Cancel")
# Calls that name a session but store and show nothing of it.
SESSION_FILTERS = {"ValidateWorkflow"}
# Request fields naming what was made in a session (alpha's execution and workflow in it).
SESSION_CONTENTS = {"execution_id": "execution_id", "workflow_id": "session_workflow_id"}
TENANT_FREE = {
    # Describe the server or the node types, the same for every tenant.
    "/flowport.v1.GatewayService/GetInfo",
    # Beta's own figures: nothing of alpha's may appear in them.
    "/flowport.v1.GatewayService/GetStats",
    "/flowport.v1.GatewayService/GetDurabilityStatus",
    # Where the live views are, the same for every tenant.
    "/flowport.v1.GatewayService/GetDashboard",
    # Beta's own executions in flight and workflows (Kailash's maps keyed by id): none of alpha's.
    "/flowport.v1.GatewayService/GetDurableRequests",
    "/flowport.v1.WorkflowService/GetWorkflowMap",
    "/flowport.v1.SchemaService/ListNodeSchemas",
    "/flowport.v1.SchemaService/GetNodeSchema",
}


@dataclass
class Alpha:
    """What tenant alpha owns; the values go into every field of the same name."""

    ids: dict[str, str] = field(default_factory=dict)
    event_ids: list[str] = field(default_factory=list)

    def marks(self) -> list[str]:
        """Strings that must not appear in anything beta receives."""
        # Not event ids: they are one sequence across tenants (small integers).
        return [v for k, v in self.ids.items() if k.endswith("_id") and k != "request_id"]


def _api_methods() -> list[MethodDescriptor]:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path().read_bytes())
    pool = descriptor_pool.Default()
    return [
        pool.FindMethodByName(f"{f.package}.{service.name}.{method.name}")
        for f in descriptor_set.file
        if f.package == "flowport.v1"
        for service in f.service
        for method in service.method
    ]


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _request(method: MethodDescriptor, alpha: Alpha) -> Message:
    """The input message with alpha's identifiers in every string field that has a value for it."""
    request = message_factory.GetMessageClass(method.input_type)()
    for descriptor in method.input_type.fields:
        value = alpha.ids.get(descriptor.name)
        if value is not None and descriptor.type == descriptor.TYPE_STRING and not descriptor.is_repeated:
            setattr(request, descriptor.name, value)
    if method.containing_service.name == "ResourceService" and "name" in method.input_type.fields_by_name:
        # Resource names are lower case; `name` above is a secret's.
        request.name = alpha.ids["resource_name"]  # type: ignore[attr-defined]
        if method.name == "UpdateResource":  # a valid body, so only the name decides
            request.resource.http.base_url = "http://127.0.0.1:9/beta"  # type: ignore[attr-defined]
    if "request_id" in method.input_type.fields_by_name:
        request.request_id = f"beta-{method.name}-{time.monotonic_ns()}"  # type: ignore[attr-defined]
    return request


class Caller:
    """Calls any RPC by descriptor, with one tenant's key."""

    def __init__(self, channel: grpc.aio.Channel, key: str, tenant: str = "beta", *extra: tuple[str, str]) -> None:
        self.channel = channel
        self.tenant = tenant
        self.metadata = (("x-api-key", key), *extra)

    def _call(self, method: MethodDescriptor) -> Any:
        output = message_factory.GetMessageClass(method.output_type)
        factory: Callable[..., Any] = self.channel.unary_stream if method.server_streaming else self.channel.unary_unary
        return factory(
            _path(method), request_serializer=lambda m: m.SerializeToString(), response_deserializer=output.FromString
        )

    async def unary(self, method: MethodDescriptor, request: Message) -> Message:
        response: Message = await self._call(method)(request, metadata=self.metadata, timeout=30)
        return response

    async def stream(self, method: MethodDescriptor, request: Message, seconds: float) -> list[Message]:
        received: list[Message] = []
        call = self._call(method)(request, metadata=self.metadata)
        try:
            async with asyncio.timeout(seconds):
                async for item in call:
                    received.append(item)
        except TimeoutError:
            call.cancel()
        return received


async def _code(awaitable: Any) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as error:
        return ApiError.from_rpc_error(error).code()
    return grpc.StatusCode.OK


def _text(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


async def _user_key(admin: AsyncClient, tenant: str, role: str = "user") -> tuple[str, str]:
    created = await admin.keys.CreateApiKey(
        apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant=tenant, roles=[role]))
    )
    return created.api_key.key_id, created.key


async def _wait_for(predicate: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _alpha_world(alpha_client: AsyncClient, alpha_caller: Caller, receiver: Receiver, key_id: str) -> Alpha:
    alpha = Alpha()
    alpha.ids["key_id"] = key_id
    alpha.ids["tenant"] = "alpha"
    hook = await alpha_client.webhooks.CreateWebhook(
        webhook_pb2.CreateWebhookRequest(webhook=webhook_pb2.Webhook(url=receiver.url()))
    )
    session = await alpha_client.sessions.CreateSession(
        session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="alpha-user"), request_id="alpha-rid")
    )
    workflow = workflow_pb2.Workflow(name="alpha-flow")
    json_format.ParseDict(
        {"nodes": [{"type": "PythonCodeNode", "name": "double", "config": {"code": "result = n * 2"}}]}, workflow
    )
    created = await alpha_client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
    request = execution_pb2.CreateExecutionRequest(
        workflow_id=created.workflow_id, session_id=session.session_id, wait=True
    )
    request.inputs.update({"n": 21})
    execution = await alpha_client.executions.CreateExecution(request)
    assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED, execution.error.message
    in_session = workflow_pb2.Workflow(name="alpha-session-flow", session_id=session.session_id)
    json_format.ParseDict({"nodes": [{"type": "MergeNode", "name": "m"}]}, in_session)
    await alpha_client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=in_session))
    alpha.ids["session_workflow_id"] = in_session.name
    deliveries = await _wait_for(lambda: _deliveries(alpha_client, hook.webhook_id), "a delivery of alpha's webhook")
    alpha.ids.update(
        session_id=session.session_id,
        workflow_id=created.workflow_id,
        execution_id=execution.execution_id,
        webhook_id=hook.webhook_id,
        delivery_id=deliveries[0].delivery_id,
        name="ALPHA_TOKEN",
        node_type="PythonCodeNode",
    )
    await alpha_client.services.RegisterService(
        registry_pb2.RegisterServiceRequest(
            service=registry_pb2.RegisteredService(
                service_id="alpha-svc",
                endpoint="http://127.0.0.1:9/alpha",
                capabilities=["alpha-capability"],
                ttl=duration_pb2.Duration(seconds=600),
            )
        )
    )
    alpha.ids["service_id"] = "alpha-svc"
    await alpha_client.resources.CreateResource(
        resource_pb2.CreateResourceRequest(
            resource=resource_pb2.Resource(
                name="alpha-api",
                description="alpha-resource-mark",
                http=resource_pb2.HttpProfile(base_url="http://127.0.0.1:9/alpha"),
            )
        )
    )
    alpha.ids.update(resource_name="alpha-api", resource_mark_id="alpha-resource-mark")
    secret_method = descriptor_pool.Default().FindMethodByName("flowport.v1.SecretService.PutSecret")
    secret_request = message_factory.GetMessageClass(secret_method.input_type)(name="ALPHA_TOKEN", value="s3cr3t-alpha")
    await alpha_caller.unary(secret_method, secret_request)
    events = await alpha_caller.stream(
        descriptor_pool.Default().FindMethodByName("flowport.v1.EventService.StreamEvents"),
        event_pb2.StreamEventsRequest(after_id="0"),
        seconds=1.0,
    )
    alpha.event_ids = [e.id for e in events if e.id]  # type: ignore[attr-defined]
    assert alpha.event_ids, "alpha's events should replay for alpha"
    return alpha


async def _deliveries(client: AsyncClient, webhook_id: str) -> list[webhook_pb2.WebhookDelivery]:
    listed = await client.webhooks.ListWebhookDeliveries(
        webhook_pb2.ListWebhookDeliveriesRequest(webhook_id=webhook_id)
    )
    return list(listed.deliveries)


async def test_tenant_b_cannot_reach_anything_of_tenant_a(running: Running) -> None:
    target = f"127.0.0.1:{running.port}"
    alpha_receiver, beta_receiver, sibling_receiver = Receiver(OK), Receiver(OK), Receiver(OK)
    try:
        async with AsyncClient(target, api_key=ADMIN_KEY) as admin:
            alpha_key_id, alpha_key = await _user_key(admin, "alpha")
            _beta_key_id, beta_key = await _user_key(admin, "beta")
            sibling_key_id, sibling_key = await _user_key(admin, "alpha")
            _alpha_admin_key_id, alpha_admin_key = await _user_key(admin, "alpha", "admin")
            _gamma_key_id, gamma_key = await _user_key(admin, "gamma", "admin")
        async with (
            AsyncClient(target, api_key=alpha_key) as alpha_client,
            AsyncClient(target, api_key=beta_key) as beta_client,
        ):
            # Bare channels: the clients' own already carry their key, and a
            # call with two credentials is refused.
            alpha_caller = Caller(grpc.aio.insecure_channel(target), alpha_key)
            beta = Caller(grpc.aio.insecure_channel(target), beta_key)
            sibling = Caller(grpc.aio.insecure_channel(target), sibling_key)
            # Registered first, so it would hear all of alpha's session.
            sibling_hook = await sibling.unary(
                _method("WebhookService", "CreateWebhook"),
                webhook_pb2.CreateWebhookRequest(webhook=webhook_pb2.Webhook(url=sibling_receiver.url())),
            )
            assert sibling_hook.creator == sibling_key_id  # type: ignore[attr-defined]
            alpha = await _alpha_world(alpha_client, alpha_caller, alpha_receiver, alpha_key_id)
            secret_before = await _alpha_secret(alpha_caller)
            await beta_client.webhooks.CreateWebhook(
                webhook_pb2.CreateWebhookRequest(webhook=webhook_pb2.Webhook(url=beta_receiver.url()))
            )
            checked = await _every_rpc(beta, alpha)
            checked += await _another_tenants_admin(target, gamma_key, alpha)
            checked += await _every_session_rpc(sibling, alpha)
            checked += await _every_rpc_on_the_session_s_contents(sibling, alpha)
            checked += await _every_webhook_rpc(sibling, alpha)
            await _no_list_or_stream_shows_the_session(sibling, alpha_client, alpha)
            alpha_admin = Caller(grpc.aio.insecure_channel(target), alpha_admin_key)
            await _alpha_admin_sees_the_session(alpha_admin, alpha)
            hook = await alpha_admin.unary(
                _method("WebhookService", "GetWebhook"),
                webhook_pb2.GetWebhookRequest(webhook_id=alpha.ids["webhook_id"]),
            )
            assert hook.creator == alpha_key_id, "alpha's admin sees alpha's webhook"  # type: ignore[attr-defined]
            # More alpha activity while beta listens, then: nothing of it reached beta.
            stream_method = descriptor_pool.Default().FindMethodByName("flowport.v1.EventService.StreamEvents")
            listening = asyncio.create_task(beta.stream(stream_method, event_pb2.StreamEventsRequest(), seconds=2.0))
            await asyncio.sleep(0.3)
            await alpha_client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
            live = await listening
            assert not any(e.tenant == "alpha" for e in live)  # type: ignore[attr-defined]
            await _alpha_is_untouched(alpha_client, alpha_caller, alpha, secret_before)
            await _sibling_s_webhook_heard_nothing_of_alpha_s_sessions(
                sibling,
                sibling_hook.webhook_id,
                sibling_receiver,
                alpha_client,
                alpha,  # type: ignore[attr-defined]
            )
        await _each_webhook_heard_its_own_tenant_only(alpha_receiver, beta_receiver, alpha)
    finally:
        alpha_receiver.close()
        beta_receiver.close()
        sibling_receiver.close()
    assert checked >= 30


async def _each_webhook_heard_its_own_tenant_only(
    alpha_receiver: Receiver, beta_receiver: Receiver, alpha: Alpha
) -> None:
    """Beta's webhook received beta's events only, alpha's those of alpha's session."""
    # Until each webhook has had its own tenant's events (deliveries run in the background).
    for _ in range(200):
        if beta_receiver.events() and any(
            e.get("session_id") == alpha.ids["session_id"] for e in alpha_receiver.events()
        ):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # and a moment for any delivery that should not come
    beta_seen = beta_receiver.events()
    assert beta_seen, "beta's webhook should have received beta's own events"
    leaked = [e for e in beta_seen if e.get("tenant") != "beta" or e.get("id") in alpha.event_ids]
    assert not leaked, f"beta's webhook received alpha's events: {leaked[:3]}"
    assert alpha_receiver.events(), "alpha's webhook should have received alpha's events"
    assert any(e.get("session_id") == alpha.ids["session_id"] for e in alpha_receiver.events()), (
        "alpha's webhook should have received the events of alpha's own session"
    )


async def _every_rpc(beta: Caller, alpha: Alpha, *, admin: bool = False) -> int:
    """Calls every RPC as beta (`admin`: with an admin key of its own tenant, which administers
    that tenant alone); returns how many were checked."""
    checked = 0
    # Creates last: beta's own resource under alpha's name (a secret, say)
    # would otherwise answer beta's Get.
    for method in sorted(_api_methods(), key=lambda m: m.name.startswith(OWN_VERBS)):
        path, verb = _path(method), method.name
        access = access_for(path)
        request = _request(method, alpha)
        label = f"{path} as beta"
        if access is Access.PUBLIC:
            response = await beta.unary(method, request)
            assert not any(mark in _text(response) for mark in alpha.marks()), label
        elif access is Access.ADMIN and admin:
            await _as_tenant_admin(beta, method, request, alpha, label)
        elif access in (Access.ADMIN, Access.OPERATOR):
            code = await _code(
                beta.stream(method, request, 2.0) if method.server_streaming else beta.unary(method, request)
            )
            assert code is grpc.StatusCode.PERMISSION_DENIED, f"{label}: {code}"
        elif path in TENANT_FREE:
            try:
                response = await beta.unary(method, request)
            except grpc.aio.AioRpcError as error:  # an admin naming alpha in a `tenant` filter (GetStats)
                assert admin and error.code() is grpc.StatusCode.PERMISSION_DENIED, f"{label}: {error.code()}"
            else:
                assert not any(mark in _text(response) for mark in alpha.marks()), label
        elif method.server_streaming and verb == "StreamEvents":
            for replay in ({"after_id": alpha.event_ids[0]}, {"after_id": "0"}, {}):
                stream_request = event_pb2.StreamEventsRequest(**replay)
                stream_request.workflow_id = alpha.ids["workflow_id"]
                received = await beta.stream(method, stream_request, 1.0)
                text = " ".join(_text(m) for m in received)
                assert not any(mark in text for mark in alpha.marks()), f"{label} {replay}: {text[:300]}"
                leaked = [m.id for m in received if m.id in alpha.event_ids or m.tenant == "alpha"]  # type: ignore[attr-defined]
                assert not leaked, f"{label} {replay}: alpha's events {leaked}"
        elif verb.startswith(NOT_FOUND_VERBS):
            code = await _code(
                beta.stream(method, request, 2.0) if method.server_streaming else beta.unary(method, request)
            )
            assert code is grpc.StatusCode.NOT_FOUND, f"{label}: {code}"
        elif verb.startswith(LIST_VERBS):
            try:
                text = _text(await beta.unary(method, request))
            except grpc.aio.AioRpcError as error:  # a list under alpha's parent (a webhook's deliveries)
                assert error.code() is grpc.StatusCode.NOT_FOUND, f"{label}: {error.code()}"
            else:
                assert not any(mark in text for mark in alpha.marks()), f"{label}: {text[:300]}"
        elif verb.startswith(OWN_VERBS):
            await _own(beta, method, request, alpha, label)
        else:
            raise AssertionError(f"{label}: no isolation rule for the verb of {verb}; add one to this test")
        checked += 1
    return checked


async def _as_tenant_admin(admin: Caller, method: MethodDescriptor, request: Message, alpha: Alpha, label: str) -> None:
    """An admin-only RPC called by another tenant's admin with alpha's identifiers (its tenant in
    every `tenant` field): refused, missing, or answered with nothing of alpha's."""
    if method.name.startswith(OWN_VERBS):
        # Keys it makes are its own tenant's; naming alpha's is refused (test_tenant_admins.py).
        code = await _code(admin.unary(method, request))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED), f"{label}: {code}"
        return
    try:
        if method.server_streaming:
            received = await admin.stream(method, request, 1.0)
        else:
            received = [await admin.unary(method, request)]
    except grpc.aio.AioRpcError as error:
        refused = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert error.code() in refused, f"{label}: {error.code()}"
        return
    text = " ".join(_text(m) for m in received)
    assert not any(mark in text for mark in alpha.marks()), f"{label}: {text[:300]}"


async def _another_tenants_admin(target: str, key: str, alpha: Alpha) -> int:
    """An admin of another tenant administers that tenant alone, and acts for no other."""
    admin = Caller(grpc.aio.insecure_channel(target), key, "gamma")
    checked = await _every_rpc(admin, alpha, admin=True)
    return checked + await _nothing_as_alpha(Caller(admin.channel, key, "gamma", (ACT_AS_HEADER, "alpha")))


async def _nothing_as_alpha(admin: Caller) -> int:
    """Every RPC but the public ones, by another tenant's admin acting for alpha: refused."""
    checked = 0
    for method in _api_methods():
        path = _path(method)
        if access_for(path) is Access.PUBLIC:
            continue
        request = message_factory.GetMessageClass(method.input_type)()
        code = await _code(
            admin.stream(method, request, 1.0) if method.server_streaming else admin.unary(method, request)
        )
        assert code is grpc.StatusCode.PERMISSION_DENIED, f"{path} acting for alpha: {code}"
        checked += 1
    return checked


def _session_field(method: MethodDescriptor) -> str | None:
    """Where a request names a session: its `session_id`, or the message field holding one."""
    fields = method.input_type.fields_by_name
    if "session_id" in fields:
        return "session_id"
    return next(
        (
            f.name
            for f in fields.values()
            if f.message_type is not None and "session_id" in f.message_type.fields_by_name
        ),
        None,
    )


def _naming_alphas_session(method: MethodDescriptor, alpha: Alpha, where: str) -> Message:
    """The request with alpha's identifiers, and alpha's session wherever it names one."""
    request = _request(method, alpha)
    if method.name == "CreateWorkflow":  # valid, so only the session decides
        valid = {"name": "sibling-flow", "nodes": [{"type": "MergeNode", "name": "m"}]}
        json_format.ParseDict(valid, request.workflow)  # type: ignore[attr-defined]
    if where != "session_id":
        getattr(request, where).session_id = alpha.ids["session_id"]
    return request


async def _every_session_rpc(sibling: Caller, alpha: Alpha) -> int:
    """Calls, as another user key of alpha's tenant, every RPC that names a session; returns how many."""
    checked = 0
    for method in _api_methods():
        where = _session_field(method)
        if where is None or method.name in SESSION_FILTERS:
            continue
        label = f"{_path(method)} as another credential of alpha's tenant"
        request = _naming_alphas_session(method, alpha, where)
        if method.name == "CreateSession":  # alpha's request id and body: never alpha's session
            replay = session_pb2.CreateSessionRequest(
                session=session_pb2.Session(user_id="alpha-user"), request_id="alpha-rid"
            )
            try:
                text = _text(await sibling.unary(method, replay))
            except grpc.aio.AioRpcError as error:
                assert error.code() is grpc.StatusCode.ALREADY_EXISTS, f"{label}: {error.code()}"
                text = error.details() or ""
            assert alpha.ids["session_id"] not in text, label
        elif method.name.startswith(SESSION_USE_VERBS):
            try:
                if method.server_streaming:
                    await sibling.stream(method, request, 2.0)
                else:
                    await sibling.unary(method, request)
            except grpc.aio.AioRpcError as rpc_error:
                error = ApiError.from_rpc_error(rpc_error)
                assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"), label
            else:
                raise AssertionError(f"{label}: used alpha's session")
        else:
            raise AssertionError(f"{label}: no session rule for the verb of {method.name}; add one to this test")
        checked += 1
    listed = _text(await sibling.unary(_method("SessionService", "ListSessions"), session_pb2.ListSessionsRequest()))
    assert alpha.ids["session_id"] not in listed, "ListSessions shows alpha's session to another credential"
    return checked + 1


def _session_marks(alpha: Alpha) -> list[str]:
    """Identifiers of alpha's session and what was made in it."""
    return [alpha.ids[k] for k in ("session_id", "execution_id", "session_workflow_id")]


async def _every_rpc_on_the_session_s_contents(sibling: Caller, alpha: Alpha) -> int:
    """Calls, as another user key of alpha's tenant, every RPC naming an execution or a workflow with
    those alpha made in its session (lists and streams also with alpha's workflow outside sessions,
    which ran in the session); returns how many."""
    checked = 0
    for method in _api_methods():
        fields = [f for f in SESSION_CONTENTS if f in method.input_type.fields_by_name]
        if not fields or access_for(_path(method)) is not Access.USER:
            continue
        label = f"{_path(method)} with alpha's session's contents, as another credential of alpha's tenant"
        verb = method.name
        for name in fields:
            values = [alpha.ids[SESSION_CONTENTS[name]]]
            if name == "workflow_id" and verb.startswith((*LIST_VERBS, "Stream")):
                values.append(alpha.ids["workflow_id"])
            for value in values:
                request = message_factory.GetMessageClass(method.input_type)()
                setattr(request, name, value)
                await _sees_none_of_the_session(sibling, method, request, alpha, f"{label} ({name}={value})")
        checked += 1
    return checked


async def _sees_none_of_the_session(
    sibling: Caller, method: MethodDescriptor, request: Message, alpha: Alpha, label: str
) -> None:
    verb = method.name
    if verb == "StreamEvents":
        for replay in ("0", ""):
            request.after_id = replay  # type: ignore[attr-defined]
            text = " ".join(_text(m) for m in await sibling.stream(method, request, 1.0))
            assert not any(mark in text for mark in _session_marks(alpha)), f"{label} after {replay!r}: {text[:300]}"
    elif verb.startswith((*NOT_FOUND_VERBS, "Create")):
        code = await _code(
            sibling.stream(method, request, 2.0) if method.server_streaming else sibling.unary(method, request)
        )
        assert code is grpc.StatusCode.NOT_FOUND, f"{label}: {code}"
    elif verb.startswith(LIST_VERBS):
        text = _text(await sibling.unary(method, request))
        assert not any(mark in text for mark in _session_marks(alpha)), f"{label}: {text[:300]}"
    else:
        raise AssertionError(f"{label}: no rule for the verb of {verb}; add one to this test")


async def _no_list_or_stream_shows_the_session(sibling: Caller, alpha_client: AsyncClient, alpha: Alpha) -> None:
    """Unfiltered lists and streams of another credential of alpha's tenant: nothing of alpha's session,
    replayed or live (a session alpha opens while the stream runs included), the tenant's own things still."""
    for service, name, request in (
        ("ExecutionService", "ListExecutions", execution_pb2.ListExecutionsRequest()),
        ("WorkflowService", "ListWorkflows", workflow_pb2.ListWorkflowsRequest()),
    ):
        text = _text(await sibling.unary(_method(service, name), request))
        assert not any(mark in text for mark in _session_marks(alpha)), f"{name}: {text[:300]}"
    assert alpha.ids["workflow_id"] in text, "the tenant's workflow outside sessions is listed"
    stream_method = _method("EventService", "StreamEvents")
    listening = asyncio.create_task(sibling.stream(stream_method, event_pb2.StreamEventsRequest(after_id="0"), 2.0))
    await asyncio.sleep(0.3)
    later = await alpha_client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
    run = execution_pb2.CreateExecutionRequest(
        workflow_id=alpha.ids["session_workflow_id"], session_id=later.session_id, wait=True
    )
    later_run = await alpha_client.executions.CreateExecution(run)
    received = await listening
    text = " ".join(_text(m) for m in received)
    for mark in (*_session_marks(alpha), later.session_id, later_run.execution_id):
        assert mark not in text, f"an unfiltered stream carried {mark}: {text[:300]}"
    assert any(m.type == "workflow.created" for m in received), "the tenant's events outside sessions"  # type: ignore[attr-defined]


async def _every_webhook_rpc(sibling: Caller, alpha: Alpha) -> int:
    """Calls, as another user key of alpha's tenant, every RPC naming a webhook with alpha's webhook,
    and ListWebhooks; returns how many."""
    checked = 0
    for method in _api_methods():
        if "webhook_id" not in method.input_type.fields_by_name or access_for(_path(method)) is not Access.USER:
            continue
        label = f"{_path(method)} with alpha's webhook, as another credential of alpha's tenant"
        try:
            await sibling.unary(method, _request(method, alpha))
        except grpc.aio.AioRpcError as rpc_error:
            error = ApiError.from_rpc_error(rpc_error)
            assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND"), label
        else:
            raise AssertionError(f"{label}: reached alpha's webhook")
        checked += 1
    listed = _text(await sibling.unary(_method("WebhookService", "ListWebhooks"), webhook_pb2.ListWebhooksRequest()))
    assert alpha.ids["webhook_id"] not in listed, "ListWebhooks shows alpha's webhook to another credential"
    return checked + 1


async def _sibling_s_webhook_heard_nothing_of_alpha_s_sessions(
    sibling: Caller, webhook_id: str, receiver: Receiver, alpha_client: AsyncClient, alpha: Alpha
) -> None:
    """The sibling has no session: its webhook hears the tenant's events outside sessions only."""
    # A last event outside sessions: once it is delivered, everything before it was queued.
    marker = workflow_pb2.Workflow(name="alpha-last-flow")
    json_format.ParseDict({"nodes": [{"type": "MergeNode", "name": "m"}]}, marker)
    await alpha_client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=marker))
    list_deliveries = _method("WebhookService", "ListWebhookDeliveries")

    async def all_delivered() -> bool:
        if not any(e.get("workflow_id") == "alpha-last-flow" for e in receiver.events()):
            return False
        listed = await sibling.unary(
            list_deliveries, webhook_pb2.ListWebhookDeliveriesRequest(webhook_id=webhook_id, page_size=1000)
        )
        done = webhook_pb2.WebhookDelivery.STATE_SUCCEEDED
        return all(d.state == done for d in listed.deliveries) and len(listed.deliveries) == len(receiver.seen)  # type: ignore[attr-defined]

    await _wait_for(all_delivered, "every delivery to the sibling's webhook")
    in_sessions = [(e["type"], e["session_id"]) for e in receiver.events() if e.get("session_id")]
    assert not in_sessions, f"the sibling's webhook received events of alpha's sessions: {in_sessions[:3]}"
    assert alpha.ids["session_id"] not in str(receiver.events())


async def _alpha_admin_sees_the_session(admin: Caller, alpha: Alpha) -> None:
    session_id = alpha.ids["session_id"]
    got = await admin.unary(
        _method("SessionService", "GetSession"), session_pb2.GetSessionRequest(session_id=session_id)
    )
    assert got.session_id == session_id  # type: ignore[attr-defined]
    listed = _text(await admin.unary(_method("SessionService", "ListSessions"), session_pb2.ListSessionsRequest()))
    assert session_id in listed, "alpha's admin should list every session of alpha"
    executions = _text(
        await admin.unary(
            _method("ExecutionService", "ListExecutions"), execution_pb2.ListExecutionsRequest(session_id=session_id)
        )
    )
    assert alpha.ids["execution_id"] in executions, "alpha's admin should list the session's executions"
    workflow = await admin.unary(
        _method("WorkflowService", "GetWorkflow"),
        workflow_pb2.GetWorkflowRequest(workflow_id=alpha.ids["session_workflow_id"]),
    )
    assert workflow.session_id == session_id  # type: ignore[attr-defined]
    events = await admin.stream(
        _method("EventService", "StreamEvents"), event_pb2.StreamEventsRequest(after_id="0"), 1.0
    )
    assert any(e.session_id == session_id for e in events), "alpha's admin streams the session's events"  # type: ignore[attr-defined]


def _method(service: str, name: str) -> MethodDescriptor:
    return descriptor_pool.Default().FindMethodByName(f"flowport.v1.{service}.{name}")


async def _own(beta: Caller, method: MethodDescriptor, request: Message, alpha: Alpha, label: str) -> None:
    """Create/Put/Validate with alpha's identifiers: beta's own thing, or NOT_FOUND for alpha's."""
    name = method.name
    if name == "CreateExecution":  # alpha's workflow_id and session_id
        assert await _code(beta.unary(method, request)) is grpc.StatusCode.NOT_FOUND, label
        return
    if name == "CreateSession":  # alpha's request_id, alpha's body: a new session of beta's
        replay = session_pb2.CreateSessionRequest(
            session=session_pb2.Session(user_id="alpha-user"), request_id="alpha-rid"
        )
        created = await beta.unary(method, replay)
        assert created.session_id != alpha.ids["session_id"], label  # type: ignore[attr-defined]
        assert created.tenant == beta.tenant, label  # type: ignore[attr-defined]
        return
    if name == "CreateWorkflow":  # alpha's workflow name: beta's own first version (ids are per tenant)
        workflow = workflow_pb2.Workflow(name="alpha-flow")
        json_format.ParseDict({"nodes": [{"type": "MergeNode", "name": "m"}]}, workflow)
        created = await beta.unary(method, workflow_pb2.CreateWorkflowRequest(workflow=workflow))
        assert (created.tenant, created.version) == (beta.tenant, 1), label  # type: ignore[attr-defined]
        return
    if name == "CreateWebhook":  # nothing of alpha's to name; covered by beta's receiver
        return
    if name == "RegisterService":  # alpha's service id: beta's own registration, alpha's untouched (checked later)
        service = registry_pb2.RegisteredService(service_id=alpha.ids["service_id"], endpoint="http://127.0.0.1:9/b")
        created = await beta.unary(method, registry_pb2.RegisterServiceRequest(service=service))
        assert created.tenant == beta.tenant, label  # type: ignore[attr-defined]
        return
    if name == "CreateResource":  # alpha's resource name: beta's own resource, alpha's untouched (checked later)
        resource = resource_pb2.Resource(
            name=alpha.ids["resource_name"], http=resource_pb2.HttpProfile(base_url="http://127.0.0.1:9/beta")
        )
        created = await beta.unary(method, resource_pb2.CreateResourceRequest(resource=resource))
        assert created.tenant == beta.tenant, label  # type: ignore[attr-defined]
        return
    if name == "PutSecret":  # alpha's secret name: beta's own secret, alpha's untouched (checked later)
        request.value = "beta-value"  # type: ignore[attr-defined]
        await beta.unary(method, request)
        return
    if name == "ValidateWorkflow":  # nothing stored
        text = _text(await beta.unary(method, request))
        assert not any(mark in text for mark in alpha.marks()), label
        return
    if access_for(_path(method)) in (Access.ADMIN, Access.OPERATOR):
        return
    raise AssertionError(f"{label}: no isolation rule for {name}; add one to this test")


async def _alpha_secret(caller: Caller) -> str:
    method = descriptor_pool.Default().FindMethodByName("flowport.v1.SecretService.GetSecret")
    return _text(await caller.unary(method, message_factory.GetMessageClass(method.input_type)(name="ALPHA_TOKEN")))


async def _alpha_is_untouched(client: AsyncClient, caller: Caller, alpha: Alpha, secret_before: str) -> None:
    ids = alpha.ids
    await client.sessions.GetSession(session_pb2.GetSessionRequest(session_id=ids["session_id"]))
    workflow = await client.workflows.GetWorkflow(workflow_pb2.GetWorkflowRequest(workflow_id=ids["workflow_id"]))
    assert workflow.version == 1
    in_session = workflow_pb2.GetWorkflowRequest(workflow_id=ids["session_workflow_id"])
    assert (await client.workflows.GetWorkflow(in_session)).session_id == ids["session_id"], "another key deleted it"
    execution = await client.executions.GetExecution(
        execution_pb2.GetExecutionRequest(execution_id=ids["execution_id"])
    )
    assert execution.state == execution_pb2.Execution.STATE_SUCCEEDED
    await client.webhooks.GetWebhook(webhook_pb2.GetWebhookRequest(webhook_id=ids["webhook_id"]))
    assert await _alpha_secret(caller) == secret_before, "beta's PutSecret changed alpha's secret"
    service = await client.services.GetService(registry_pb2.GetServiceRequest(service_id=ids["service_id"]))
    assert (service.tenant, list(service.capabilities)) == ("alpha", ["alpha-capability"]), "beta changed it"
    resource = await client.resources.GetResource(resource_pb2.GetResourceRequest(name=ids["resource_name"]))
    assert (resource.tenant, resource.description, resource.http.base_url) == (
        "alpha",
        "alpha-resource-mark",
        "http://127.0.0.1:9/alpha",
    ), "beta changed alpha's resource"
