"""What a node type is: its schemas, its safety, and how it runs.

A node type is a class with class-level metadata (served as JSON Schema by
SchemaService) and an async `run`. Parameters reach `run` Kailash-style: the
node's config, then the execution's inputs, then values from connections,
each overriding the one before. Node types that run user code or call the
network get what they share (HTTP pool, sandbox pool, SQL pools) through
`NodeServices`, never by creating their own per call.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from jsonschema import Draft202012Validator, ValidationError

from flowport.server.errors import SHOWN_CHARS, cut, shown
from flowport.v1 import registry_pb2

# Schema errors one config reports at most.
MAX_CONFIG_PROBLEMS = 100

if TYPE_CHECKING:
    import httpx

    from flowport.server.nodes.sql_pools import SqlPools
    from flowport.server.ratelimit.outbound import OutboundLimiter
    from flowport.server.resources.directory import ResourceDirectory
    from flowport.server.sandbox.pool import SandboxPool
    from flowport.server.tenant_shares import TenantShares

JsonSchema = dict[str, Any]
Violation = tuple[str, str]


# The most of a node's error message kept: it goes into the execution, two events and a webhook
# delivery per webhook, and may quote what the tenant's code or a remote server said.
MAX_MESSAGE_CHARS = 2048

# The most a node's outputs may take, serialized (engine/output_limits.py checks it; a node that
# collects rows or bodies stops at it instead of holding more in memory first).
MAX_OUTPUT_BYTES = 8 * 2**20


class NodeError(Exception):
    """A node attempt failed. `retryable` says whether another attempt may help."""

    def __init__(
        self, message: str, *, reason: str = "NODE_FAILED", retryable: bool = False, retry_after: float | None = None
    ) -> None:
        message = cut(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


def _described(error: ValidationError) -> str:
    """jsonschema's message, with the offending value (which it quotes whole) shortened."""
    text = repr(error.instance)
    if len(text) > SHOWN_CHARS and text in error.message:
        return error.message.replace(text, shown(error.instance))
    return error.message


def _unexpected(error: ValidationError) -> str:
    """Which keys an object may not have, each shortened: jsonschema lists them whole."""
    known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
    extra = sorted(k for k in error.instance if k not in known) if isinstance(error.instance, dict) else []
    if not extra:
        return "additional properties are not allowed"
    listed = ", ".join(shown(k, 60) for k in extra[:5])
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    return f"additional properties are not allowed: {listed}{more}"


class SecretReader(Protocol):
    """Opens a tenant's secrets for a node that references them (server/secrets/vault.py)."""

    async def reveal(self, tenant: str, names: Collection[str]) -> dict[str, str]:
        """The values of those of `names` that `tenant` has; absent names are left out.

        Raises SecretDecryptError when a value exists but cannot be opened.
        """
        ...


class ServiceDirectory(Protocol):
    """A tenant's registered services (the store's service registry tables)."""

    async def list_services(
        self, tenant: str, *, provider: str, after: str | None, limit: int, now_us: int
    ) -> list[registry_pb2.RegisteredService]:
        """Live registrations by id, strictly after `after`."""
        ...


@dataclass
class NodeServices:
    """Resources shared by every node run in this process."""

    http: httpx.AsyncClient | None = None
    # How many of `http`'s requests one tenant may have in flight at once (None: no cap).
    http_shares: TenantShares | None = None
    sandbox: SandboxPool | None = None
    sql: SqlPools | None = None
    # Hosts an HTTP node may reach although they resolve to private ranges.
    http_allowlist: frozenset[str] = frozenset()
    # Where `${secret:NAME}` values come from; None: nodes that reference one fail.
    secrets: SecretReader | None = None
    # The service registry, for MCPServiceDiscoveryNode; None: that node fails.
    registry: ServiceDirectory | None = None
    # Limits on calls to external APIs, per tenant and target (RateLimitedAPINode):
    # in Redis when configured, so they hold across processes; None: that node fails.
    outbound: OutboundLimiter | None = None
    # Named database pools and HTTP profiles (server/resources/); None: nodes naming one fail.
    resources: ResourceDirectory | None = None


@dataclass(frozen=True)
class NodeContext:
    """Where a node attempt runs."""

    tenant: str
    execution_id: str
    node_id: str
    attempt: int
    timeout: float
    services: NodeServices
    started: float = field(default_factory=time.monotonic)

    @property
    def remaining(self) -> float:
        """Seconds left before this attempt's timeout."""
        return max(0.0, self.timeout - (time.monotonic() - self.started))


class NodeType(ABC):
    """Base of every node type. Subclasses set the class attributes and `run`."""

    type_name: ClassVar[str]
    description: ClassVar[str]
    category: ClassVar[str]
    config_schema: ClassVar[JsonSchema] = {"type": "object"}
    # Parameters the node reads; names not listed are refused on connections
    # unless `open_inputs` is set (PythonCodeNode takes any variable).
    inputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {}}
    outputs_schema: ClassVar[JsonSchema] = {"type": "object", "properties": {}}
    # Other names a connection may read an output by, each naming a path into the outputs, e.g.
    # {"result": "response"} or {"rows": "result.rows"}: stored once, under its own name, and a
    # connection to an alias reads it from there (the execution's outputs hold no alias).
    output_aliases: ClassVar[Mapping[str, str]] = {}
    open_inputs: ClassVar[bool] = False
    # Running twice is harmless: may be retried, and resumed after a crash.
    retry_safe: ClassVar[bool] = False
    default_timeout: ClassVar[float] = 30.0
    max_timeout: ClassVar[float] = 300.0
    # Runs even when some inbound connections carry nothing (a branch not
    # taken): MergeNode. Others are skipped in that case.
    runs_on_partial_inputs: ClassVar[bool] = False
    # Top-level config keys whose `${secret:NAME}` references the type resolves
    # when it runs (server/secrets/resolver.py); elsewhere validation refuses them.
    secret_fields: ClassVar[frozenset[str]] = frozenset()
    # Parameters an execution's inputs may not set, not even under the node's id: the workflow's
    # config or a connection decides them (a caller must not hand itself a role, say).
    fixed_params: ClassVar[frozenset[str]] = frozenset()

    _validator: ClassVar[Draft202012Validator | None] = None

    @classmethod
    def output_names(cls) -> list[str]:
        """Outputs a connection may read from, aliases included."""
        return [*cls.outputs_schema.get("properties", {}), *cls.output_aliases]

    @classmethod
    def input_names(cls) -> list[str]:
        """Inputs a connection may write to (any name when `open_inputs`)."""
        return list(cls.inputs_schema.get("properties", {}))

    @classmethod
    def is_retry_safe(cls, config: Mapping[str, Any]) -> bool:
        """Whether a node with this config may run twice (retries, resume after a crash)."""
        return cls.retry_safe

    @classmethod
    def required_inputs(cls, config: Mapping[str, Any]) -> set[str]:
        """Parameters that must be given (by config, connection or execution input).

        By default: the inputs its schema requires and those its config's
        `${name}` references need (`${order.id}` needs `order`), except the
        execution's own variables (`${tenant_id}`, `${session.id}`, ...) and
        `${secret:NAME}`. The plan asks for the rest as execution inputs.
        """
        from flowport.server.nodes.substitution import input_references

        return set(cls.inputs_schema.get("required", [])) | input_references(dict(config))

    @classmethod
    def reads(cls, config: Mapping[str, Any]) -> set[str] | None:
        """Execution inputs this node is offered by name; None offers all of them.

        By default: the inputs its schema requires and the `${name}` references
        in its config. Other inputs reach a node only through a connection or
        an input object keyed by the node's id, so an input named `data` does
        not change every HTTP node's body.
        """
        from flowport.server.nodes.substitution import references

        names = set(cls.inputs_schema.get("required", []))
        names.update(ref.split(".", 1)[0] for ref in references(dict(config)))
        return names

    @classmethod
    def validate_config(cls, config: Mapping[str, Any], path: str) -> list[Violation]:
        """Problems with `config` (at most MAX_CONFIG_PROBLEMS), each with a field path under `path`."""
        if cls._validator is None or cls._validator.schema is not cls.config_schema:
            cls._validator = Draft202012Validator(cls.config_schema)
        problems = []
        # The first errors only: a config of a million wrong values would make a million.
        errors = islice(cls._validator.iter_errors(dict(config)), MAX_CONFIG_PROBLEMS)
        for error in sorted(errors, key=lambda e: list(e.absolute_path)):
            where = path + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            if error.validator == "required":
                missing = error.message.split("'")[1] if "'" in error.message else "?"
                problems.append((f"{where}.{missing}", f"required by {cls.type_name}"))
            elif error.validator == "additionalProperties":
                problems.append((where, f"{_unexpected(error)} ({cls.type_name} does not take it)"))
            else:
                problems.append((where, _described(error)))
        return problems

    def prepare(self, config: Mapping[str, Any]) -> Any:
        """Work done once per workflow version (e.g. compiling code); passed to `run`."""
        return None

    @abstractmethod
    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        """One attempt: return outputs keyed by output name, or raise NodeError."""
