"""Every RPC of the API through the SDK, through Envoy of a real `flowport up`: the typed
stubs reach each method and the answers are the messages the API describes."""

from __future__ import annotations

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.protobuf import duration_pb2, json_format

from flowport.clients import ApiError, Client
from flowport.clients.retry import api_services
from flowport.v1 import (
    apikey_pb2,
    audit_pb2,
    event_pb2,
    execution_pb2,
    gateway_pb2,
    registry_pb2,
    resource_pb2,
    schema_pb2,
    secret_pb2,
    session_pb2,
    webhook_pb2,
    workflow_pb2,
)

from ..conftest import ADMIN_KEY, Stack

pytestmark = pytest.mark.integration


class _Refusing(BaseHTTPRequestHandler):
    """A webhook receiver that answers 410 Gone: the delivery is dead-lettered at once."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(410)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_every_rpc_answers_through_the_sdk_and_envoy(stack: Stack) -> None:  # noqa: PLR0915 - one walk through the API
    called: set[str] = set()
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=receiver.serve_forever, args=(0.05,), daemon=True).start()
    tag = uuid.uuid4().hex[:8]
    with Client(stack.envoy_target, api_key=ADMIN_KEY, timeout=30) as fp:

        def call(stub_method: object, request: object) -> object:
            method: str | bytes = stub_method._method  # type: ignore[attr-defined]
            name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
            called.add(name)
            return stub_method(request)  # type: ignore[operator]

        info = call(fp.gateway.GetInfo, gateway_pb2.GetInfoRequest())
        assert info.version  # type: ignore[attr-defined]
        call(fp.gateway.GetHealth, gateway_pb2.GetHealthRequest())
        call(fp.gateway.GetStats, gateway_pb2.GetStatsRequest())
        metrics = call(fp.gateway.GetMetrics, gateway_pb2.GetMetricsRequest())
        assert b"flowport_rpc_requests_total" in metrics.data  # type: ignore[attr-defined]
        # Kailash's enterprise and durability routes, as RPCs.
        assert call(fp.gateway.GetDashboard, gateway_pb2.GetDashboardRequest()).console == "/console/"  # type: ignore[attr-defined]
        durability = call(fp.gateway.GetDurabilityStatus, gateway_pb2.GetDurabilityStatusRequest())
        assert durability.enabled  # type: ignore[attr-defined]
        call(fp.gateway.GetDurableRequests, gateway_pb2.GetDurableRequestsRequest())
        features = call(fp.gateway.GetEnterpriseFeatures, gateway_pb2.GetEnterpriseFeaturesRequest())
        assert features.ListFields()  # type: ignore[attr-defined]
        enterprise_health = call(fp.gateway.GetEnterpriseHealth, gateway_pb2.GetEnterpriseHealthRequest())
        assert "base_server" in enterprise_health.components  # type: ignore[attr-defined]

        session = call(fp.sessions.CreateSession, session_pb2.CreateSessionRequest(session=session_pb2.Session()))
        sid = session.session_id  # type: ignore[attr-defined]
        assert call(fp.sessions.GetSession, session_pb2.GetSessionRequest(session_id=sid)).session_id == sid  # type: ignore[attr-defined]
        call(fp.sessions.ListSessions, session_pb2.ListSessionsRequest(page_size=5))

        config = {
            "name": f"every_{tag}",
            "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'n': n + 1}"}}],
        }
        workflow = json_format.ParseDict(config, workflow_pb2.Workflow())
        verdict = call(fp.workflows.ValidateWorkflow, workflow_pb2.ValidateWorkflowRequest(workflow=workflow))
        assert verdict.valid  # type: ignore[attr-defined]
        created = call(fp.workflows.CreateWorkflow, workflow_pb2.CreateWorkflowRequest(workflow=workflow))
        wid = created.workflow_id  # type: ignore[attr-defined]
        call(fp.workflows.GetWorkflow, workflow_pb2.GetWorkflowRequest(workflow_id=wid))
        assert wid in call(fp.workflows.GetWorkflowMap, workflow_pb2.GetWorkflowMapRequest()).fields  # type: ignore[attr-defined]
        call(fp.workflows.ListWorkflows, workflow_pb2.ListWorkflowsRequest(page_size=5))

        schemas = call(fp.schemas.ListNodeSchemas, schema_pb2.ListNodeSchemasRequest())
        assert any(s.node_type == "PythonCodeNode" for s in schemas.node_schemas)  # type: ignore[attr-defined]
        call(fp.schemas.GetNodeSchema, schema_pb2.GetNodeSchemaRequest(node_type="PythonCodeNode"))
        wschema = call(fp.schemas.GetWorkflowSchema, schema_pb2.GetWorkflowSchemaRequest(workflow_id=wid))
        assert "n" in json_format.MessageToDict(wschema, preserving_proto_field_name=True)["inputs_schema"]["required"]

        webhook = call(
            fp.webhooks.CreateWebhook,
            webhook_pb2.CreateWebhookRequest(
                webhook=webhook_pb2.Webhook(
                    url=f"http://127.0.0.1:{receiver.server_port}/hook", event_types=["execution.completed"]
                )
            ),
        )
        hid = webhook.webhook_id  # type: ignore[attr-defined]
        call(fp.webhooks.GetWebhook, webhook_pb2.GetWebhookRequest(webhook_id=hid))
        call(fp.webhooks.ListWebhooks, webhook_pb2.ListWebhooksRequest(page_size=5))

        events = fp.events.StreamEvents(event_pb2.StreamEventsRequest(types=["execution.*"]))
        called.add("StreamEvents")
        request = execution_pb2.CreateExecutionRequest(workflow_id=wid, session_id=sid, wait=True)
        request.inputs.update({"n": 1})
        done = call(fp.executions.CreateExecution, request)
        eid = done.execution_id  # type: ignore[attr-defined]
        assert done.state == execution_pb2.Execution.STATE_SUCCEEDED  # type: ignore[attr-defined]
        first = next(e for e in events if e.type != "heartbeat")
        assert first.execution_id == eid
        events.cancel()
        recent = call(fp.events.ListRecentEvents, event_pb2.ListRecentEventsRequest(execution_id=eid))
        assert {e.execution_id for e in recent.events} == {eid}  # type: ignore[attr-defined]
        call(fp.executions.GetExecution, execution_pb2.GetExecutionRequest(execution_id=eid))
        call(fp.executions.ListExecutions, execution_pb2.ListExecutionsRequest(workflow_id=wid))
        cancelled = call(fp.executions.CancelExecution, execution_pb2.CancelExecutionRequest(execution_id=eid))
        assert cancelled.state == execution_pb2.Execution.STATE_SUCCEEDED  # type: ignore[attr-defined]
        updates = list(fp.executions.WatchExecution(execution_pb2.WatchExecutionRequest(execution_id=eid)))
        called.add("WatchExecution")
        assert updates[0].execution.execution_id == eid

        deadline = time.monotonic() + 20
        deliveries: list[webhook_pb2.WebhookDelivery] = []
        while not deliveries and time.monotonic() < deadline:
            listed = call(fp.webhooks.ListWebhookDeliveries, webhook_pb2.ListWebhookDeliveriesRequest(webhook_id=hid))
            deliveries = [
                d
                for d in listed.deliveries  # type: ignore[attr-defined]
                if d.state == webhook_pb2.WebhookDelivery.STATE_DEAD_LETTERED
            ]
            time.sleep(0.2)
        assert deliveries, "the refused delivery was dead-lettered"
        again = webhook_pb2.RedeliverWebhookDeliveryRequest(webhook_id=hid, delivery_id=deliveries[0].delivery_id)
        call(fp.webhooks.RedeliverWebhookDelivery, again)
        call(fp.webhooks.DeleteWebhook, webhook_pb2.DeleteWebhookRequest(webhook_id=hid))

        name = f"EVERY_{tag.upper()}"
        call(fp.secrets.PutSecret, secret_pb2.PutSecretRequest(name=name, value="v4lue"))
        assert call(fp.secrets.GetSecret, secret_pb2.GetSecretRequest(name=name)).name == name  # type: ignore[attr-defined]
        call(fp.secrets.ListSecrets, secret_pb2.ListSecretsRequest())
        call(fp.secrets.DeleteSecret, secret_pb2.DeleteSecretRequest(name=name))

        made = call(fp.keys.CreateApiKey, apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(description=tag)))
        key_id = made.api_key.key_id  # type: ignore[attr-defined]
        call(fp.keys.GetApiKey, apikey_pb2.GetApiKeyRequest(key_id=key_id))
        call(fp.keys.ListApiKeys, apikey_pb2.ListApiKeysRequest())
        call(fp.keys.RevokeApiKey, apikey_pb2.RevokeApiKeyRequest(key_id=key_id))
        call(fp.audit.ListAuditEvents, audit_pb2.ListAuditEventsRequest(page_size=5))

        registered = call(
            fp.services.RegisterService,
            registry_pb2.RegisterServiceRequest(
                service=registry_pb2.RegisteredService(
                    service_id=f"svc-{tag}",
                    endpoint="http://127.0.0.1:9/",
                    capabilities=["analytics"],
                    ttl=duration_pb2.Duration(seconds=60),
                )
            ),
        )
        assert registered.tenant  # type: ignore[attr-defined]
        call(fp.services.GetService, registry_pb2.GetServiceRequest(service_id=f"svc-{tag}"))
        listed = call(fp.services.ListServices, registry_pb2.ListServicesRequest(capabilities=["analytics"]))
        assert f"svc-{tag}" in [s.service_id for s in listed.services]  # type: ignore[attr-defined]
        call(fp.services.Heartbeat, registry_pb2.HeartbeatRequest(service_id=f"svc-{tag}"))
        call(fp.services.DeregisterService, registry_pb2.DeregisterServiceRequest(service_id=f"svc-{tag}"))

        profile = resource_pb2.Resource(
            name=f"api-{tag}", http=resource_pb2.HttpProfile(base_url="http://127.0.0.1:9/")
        )
        made_resource = call(fp.resources.CreateResource, resource_pb2.CreateResourceRequest(resource=profile))
        assert made_resource.http.base_url == "http://127.0.0.1:9/"  # type: ignore[attr-defined]
        call(fp.resources.GetResource, resource_pb2.GetResourceRequest(name=f"api-{tag}"))
        listed_resources = call(fp.resources.ListResources, resource_pb2.ListResourcesRequest())
        assert f"api-{tag}" in [r.name for r in listed_resources.resources]  # type: ignore[attr-defined]
        profile.description = "changed"
        updated = call(
            fp.resources.UpdateResource, resource_pb2.UpdateResourceRequest(name=f"api-{tag}", resource=profile)
        )
        assert updated.description == "changed"  # type: ignore[attr-defined]
        call(fp.resources.DeleteResource, resource_pb2.DeleteResourceRequest(name=f"api-{tag}"))

        call(fp.workflows.DeleteWorkflow, workflow_pb2.DeleteWorkflowRequest(workflow_id=wid))
        call(fp.sessions.DeleteSession, session_pb2.DeleteSessionRequest(session_id=sid))
        with pytest.raises(ApiError) as gone:
            fp.sessions.GetSession(session_pb2.GetSessionRequest(session_id=sid))
        assert gone.value.reason == "SESSION_NOT_FOUND"
    receiver.shutdown()
    receiver.server_close()
    every = {method.name for service in api_services() for method in service.methods}
    assert len(every) >= 46 and every <= called, f"not called: {sorted(every - called)}"
