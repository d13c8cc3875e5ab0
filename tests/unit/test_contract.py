"""The API contract, checked from the descriptor set Envoy reads, so a new
RPC, field or enum is covered without touching this file."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest
from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2

from flowport.server.limits import MAX_WAIT
from flowport.server.settings import Settings
from flowport.transcoder import codegen
from flowport.transcoder.envoy_config import SERVICES, render
from flowport.transcoder.http_rules import descriptor_path

SEED_PATHS = {
    ("get", "/"),
    ("get", "/health"),
    ("get", "/api/stats"),
    ("post", "/api/sessions"),
    ("get", "/api/sessions/{session_id}"),
    ("delete", "/api/sessions/{session_id}"),
    ("get", "/api/sessions"),
    ("post", "/api/workflows"),
    ("get", "/api/workflows/{workflow_id}"),
    ("get", "/api/workflows"),
    ("delete", "/api/workflows/{workflow_id}"),
    ("post", "/api/workflows:validate"),
    ("post", "/api/executions"),
    ("get", "/api/executions/{execution_id}"),
    ("get", "/api/executions"),
    ("post", "/api/executions/{execution_id}:cancel"),
    ("post", "/workflows/{workflow_id}/execute"),
    ("get", "/api/executions/{execution_id}:watch"),
    ("get", "/events"),
    ("post", "/api/webhooks"),
    ("get", "/api/webhooks"),
    ("get", "/api/webhooks/{webhook_id}"),
    ("delete", "/api/webhooks/{webhook_id}"),
    ("get", "/api/webhooks/{webhook_id}/deliveries"),
    ("get", "/api/schemas/nodes"),
    ("get", "/api/schemas/nodes/{node_type}"),
    ("get", "/api/schemas/workflows/{workflow_id}"),
}


@pytest.fixture(scope="module")
def api_files() -> list[descriptor_pb2.FileDescriptorProto]:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path().read_bytes())
    return [f for f in descriptor_set.file if f.package == "flowport.v1"]


def _methods(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> Iterator[tuple[str, descriptor_pb2.MethodDescriptorProto]]:
    for f in files:
        for service in f.service:
            for method in service.method:
                yield f"{service.name}.{method.name}", method


def _rules(method: descriptor_pb2.MethodDescriptorProto) -> list[http_pb2.HttpRule]:
    rule = method.options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def _verb_path(rule: http_pb2.HttpRule) -> tuple[str, str]:
    verb = rule.WhichOneof("pattern")
    assert verb is not None
    return verb, getattr(rule, verb)


def test_every_service_of_the_design_exists_and_envoy_transcodes_it(
    api_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    services = {f"flowport.v1.{s.name}" for f in api_files for s in f.service}
    assert services == set(SERVICES)


def test_every_rpc_has_an_http_binding_and_every_seed_path_is_bound(
    api_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    bound: set[tuple[str, str]] = set()
    for name, method in _methods(api_files):
        rules = _rules(method)
        assert rules[0].WhichOneof("pattern"), f"{name} has no google.api.http binding"
        bound.update(_verb_path(r) for r in rules)
    missing = SEED_PATHS - bound
    assert not missing, f"seed paths without an RPC: {sorted(missing)}"


def _shape(template: str) -> tuple[tuple[str | None, ...], str]:
    """A path template as its segments (None: a variable, which takes one) and its custom verb."""
    path, verb = template, ""
    last = template.rsplit("/", 1)[-1]
    if ":" in last and "}" not in last.rsplit(":", 1)[1]:
        path, verb = template.rsplit(":", 1)
    segments = path.split("/")[1:]
    assert not any("=" in s or "*" in s for s in segments), f"{template}: extend _shape for wildcards"
    return tuple(None if s.startswith("{") else s for s in segments), verb


def _overlap(a: str, b: str) -> bool:
    (one, verb), (two, other_verb) = _shape(a), _shape(b)
    return (
        verb == other_verb
        and len(one) == len(two)
        and all(x is None or y is None or x == y for x, y in zip(one, two, strict=True))
    )


def test_no_rest_route_takes_another_routes_requests(api_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    # Envoy's transcoder picks a binding by its path pattern, so a template with a variable where
    # another has a literal (POST /{workflow_id}/execute) must not match that other's requests.
    bound = [(*_verb_path(r), name) for name, method in _methods(api_files) for r in _rules(method)]
    for i, (verb, path, name) in enumerate(bound):
        for other_verb, other_path, other_name in bound[i + 1 :]:
            clash = verb == other_verb and _overlap(path, other_path)
            assert not clash, f"{verb.upper()} {path} ({name}) and {other_path} ({other_name}) match the same paths"
    # Envoy's own exact-path routes (the console, /ws, /openapi.json) come before the transcoder.
    config = render(Settings.load({}, environ={}))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    exact = [r["match"]["path"] for r in manager["route_config"]["virtual_hosts"][0]["routes"] if "path" in r["match"]]
    own = [p for p in exact if not p.startswith("/flowport.v1.")]
    assert "/ws" in own and "/openapi.json" in own
    for path in own:
        taken = [f"{v.upper()} {t}" for v, t, _ in bound if _overlap(t, path)]
        assert not taken, f"Envoy's route {path} hides {taken}"


def test_streaming_rpcs_are_exactly_the_ones_envoy_gives_no_timeout(
    api_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    streaming = {f"/flowport.v1.{n.replace('.', '/')}" for n, m in _methods(api_files) if m.server_streaming}
    config = render(Settings.load({}, environ={}))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    untimed = {r["match"]["path"] for r in routes if "path" in r["match"] and r.get("route", {}).get("timeout") == "0s"}
    # Besides the streaming RPCs, the WebSocket upgrade (/ws), a stream too.
    assert untimed == streaming | {"/ws"}


def test_a_waiting_create_execution_outlives_its_longest_wait_at_envoy() -> None:
    config = render(Settings.load({}, environ={}))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    create = next(r for r in routes if r["match"].get("path") == "/flowport.v1.ExecutionService/CreateExecution")
    assert float(create["route"]["timeout"].rstrip("s")) > MAX_WAIT


def test_every_message_field_and_enum_value_is_commented(api_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    for f in api_files:
        commented = {tuple(loc.path) for loc in f.source_code_info.location if loc.leading_comments.strip()}

        # Descriptor paths: 4 message_type, 2 field, 3 nested_type, 4 enum_type,
        # 2 value; 6 service, 2 method.
        def walk(
            prefix: tuple[int, ...], message: descriptor_pb2.DescriptorProto, name: str
        ) -> Iterator[tuple[tuple[int, ...], str]]:
            yield prefix, name
            for i, field in enumerate(message.field):
                yield (*prefix, 2, i), f"{name}.{field.name}"
            for i, nested in enumerate(message.nested_type):
                if not nested.options.map_entry:
                    yield from walk((*prefix, 3, i), nested, f"{name}.{nested.name}")
            for i, enum in enumerate(message.enum_type):
                yield (*prefix, 4, i), f"{name}.{enum.name}"
                for j, value in enumerate(enum.value):
                    yield (*prefix, 4, i, 2, j), f"{name}.{enum.name}.{value.name}"

        for i, message in enumerate(f.message_type):
            for path, name in walk((4, i), message, message.name):
                assert path in commented, f"{f.name}: {name} has no comment"
        for i, service in enumerate(f.service):
            assert (6, i) in commented, f"{f.name}: service {service.name} has no comment"
            for j, method in enumerate(service.method):
                assert (6, i, 2, j) in commented, f"{f.name}: {service.name}.{method.name} has no comment"


def test_enums_start_with_unspecified(api_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    def enums(messages: list[descriptor_pb2.DescriptorProto]) -> Iterator[descriptor_pb2.EnumDescriptorProto]:
        for m in messages:
            yield from m.enum_type
            yield from enums(list(m.nested_type))

    for f in api_files:
        for enum in [*f.enum_type, *enums(list(f.message_type))]:
            assert enum.value[0].number == 0 and enum.value[0].name.endswith("_UNSPECIFIED"), enum.name


def test_mutating_rpcs_take_a_request_id_and_lists_paginate(
    api_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    messages = {f".flowport.v1.{m.name}": m for f in api_files for m in f.message_type}
    for name, method in _methods(api_files):
        request = messages[method.input_type]
        fields = {fld.name for fld in request.field}
        verbs = {_verb_path(r)[0] for r in _rules(method)}
        if verbs & {"post", "delete", "put", "patch"} and not name.endswith("ValidateWorkflow"):
            assert "request_id" in fields, f"{name} mutates but has no request_id"
        if method.name.startswith("List"):
            assert {"page_size", "page_token"} <= fields, f"{name} does not paginate"
            response = messages[method.output_type]
            assert "next_page_token" in {fld.name for fld in response.field}, name


def test_request_fields_declare_their_behaviour(api_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    for f in api_files:
        for message in f.message_type:
            for field in message.field:
                behaviours = field.options.Extensions[field_behavior_pb2.field_behavior]
                if message.name.endswith("Request"):
                    assert behaviours, f"{message.name}.{field.name} has no google.api.field_behavior"


def test_generated_code_and_descriptor_set_are_up_to_date() -> None:
    stale = codegen.stale_files()
    assert stale == [], f"run `python -m flowport.transcoder.codegen`; stale: {stale}"


def test_buf_lint_passes_offline() -> None:
    buf = shutil.which("buf")
    assert buf is not None, "buf comes with the dev extra (buf-bin)"
    result = subprocess.run(
        [
            buf,
            "lint",
            f"{descriptor_path()}#format=binpb",
            "--path",
            "flowport/v1",
            "--config",
            str(codegen.REPO_ROOT / "buf.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
