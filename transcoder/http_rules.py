"""The HTTP rule table: every RPC with its gRPC path and REST bindings, read
from the descriptor set (so it is what Envoy's transcoder will do)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

API_PACKAGE = "flowport.v1"


@dataclass(frozen=True)
class Binding:
    """One REST binding of an RPC: verb, path template and body field."""

    verb: str
    template: str
    body: str

    @property
    def path_params(self) -> list[str]:
        """Field names bound in the path, e.g. ['session_id']."""
        params = []
        rest = self.template
        while "{" in rest:
            start = rest.index("{")
            end = rest.index("}", start)
            params.append(rest[start + 1 : end].split("=", 1)[0])
            rest = rest[end + 1 :]
        return params


@dataclass(frozen=True)
class Method:
    """One RPC of the API."""

    service: str
    name: str
    input_type: str
    output_type: str
    server_streaming: bool
    idempotent: bool
    bindings: tuple[Binding, ...]
    comment: str

    @property
    def grpc_path(self) -> str:
        """The HTTP/2 path of the RPC, e.g. /flowport.v1.SessionService/GetSession."""
        return f"/{API_PACKAGE}.{self.service}/{self.name}"


def descriptor_path() -> Path:
    """The descriptor set shipped with the package (built by transcoder.codegen)."""
    return Path(str(resources.files("flowport.transcoder") / "descriptor.pb"))


@cache
def descriptor_set(path: Path | None = None) -> descriptor_pb2.FileDescriptorSet:
    """The parsed descriptor set (imports and source info included)."""
    return descriptor_pb2.FileDescriptorSet.FromString((path or descriptor_path()).read_bytes())


def api_files(path: Path | None = None) -> list[descriptor_pb2.FileDescriptorProto]:
    """The flowport.v1 files of the descriptor set."""
    return [f for f in descriptor_set(path).file if f.package == API_PACKAGE]


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}


def methods(path: Path | None = None) -> list[Method]:
    """Every RPC of the API, in file and declaration order."""
    found = []
    for file in api_files(path):
        comments = _comments(file)
        for s, service in enumerate(file.service):
            for m, method in enumerate(service.method):
                rule = method.options.Extensions[annotations_pb2.http]
                bindings = []
                for r in (rule, *rule.additional_bindings):
                    verb = r.WhichOneof("pattern")
                    if verb is not None and verb != "custom":
                        bindings.append(Binding(verb, getattr(r, verb), r.body))
                level = method.options.idempotency_level
                found.append(
                    Method(
                        service=service.name,
                        name=method.name,
                        input_type=method.input_type.lstrip("."),
                        output_type=method.output_type.lstrip("."),
                        server_streaming=method.server_streaming,
                        idempotent=level
                        in (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT),
                        bindings=tuple(bindings),
                        comment=comments.get((6, s, 2, m), ""),
                    )
                )
    return found


def services(path: Path | None = None) -> list[str]:
    """Fully qualified names of the API's services."""
    return [f"{API_PACKAGE}.{s.name}" for f in api_files(path) for s in f.service]
