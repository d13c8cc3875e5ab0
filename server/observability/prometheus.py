"""Prometheus metrics, served as text on a loopback port of their own (`--metrics-port`).

The metrics (all prefixed `flowport_`):

| metric | type | labels |
|---|---|---|
| `rpc_requests_total` | counter | `method`, `code` |
| `rpc_duration_seconds` | histogram (unary calls) | `method`, `code` |
| `streams_open` | gauge | `method`, `transport` (`grpc`, `sse`, `ndjson`) |
| `executions_total` | counter (ended) | `state` |
| `executions_running` | gauge | |
| `execution_duration_seconds` | histogram | `tenant`, `workflow` (a tenant's first 100, then `_other`), `state` |
| `webhook_deliveries_total` | counter | `outcome` (`delivered`, `retried`, `dead_lettered`, `dropped`, `lost`) |
| `webhook_deliveries_pending` | gauge | |
| `sandbox_workers_busy`, `sandbox_workers` | gauge | |
| `store_operation_duration_seconds` | histogram | `operation` (`read`, `write`) |
| `auth_failures_total` | counter | |
| `rate_limited_total` | counter (answered OVER_LIMIT by this server) | |

With `flowport up --workers N` every worker writes its values to files in
one directory (prometheus_client's multi-process mode, `PROMETHEUS_MULTIPROC_DIR`,
set by the supervisor) and the first worker serves the sums; gauges add up
the live processes. Envoy's own metrics stay at its admin port
(`/stats/prometheus`).

Label children are cached per label tuple: a call pays a dict lookup, an
increment and a histogram observation.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
EXECUTION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
# Workflows of one tenant whose executions get series of their own; the rest share OTHER_WORKFLOWS,
# so a tenant making ever new workflow ids cannot grow /metrics (and this process) without bound.
WORKFLOWS_PER_TENANT: Final = 100
OTHER_WORKFLOWS: Final = "_other"


def multiprocess() -> bool:
    """Whether this process writes its values for a multi-process exposition."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Prometheus:
    """One process's metrics, in a registry of their own (or none, in multi-process mode)."""

    def __init__(self) -> None:
        shared = multiprocess()
        # In multi-process mode values live in files and the exposition reads
        # the files, so the metrics are registered nowhere.
        self.registry: CollectorRegistry | None = None if shared else CollectorRegistry()
        reg = self.registry
        self.rpc_requests = Counter(
            "flowport_rpc_requests_total", "RPCs handled, by method and status code.", ["method", "code"], registry=reg
        )
        self.rpc_duration = Histogram(
            "flowport_rpc_duration_seconds",
            "Handling time of unary RPCs.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.streams_open = Gauge(
            "flowport_streams_open",
            "Server streams open now, by method and transport.",
            ["method", "transport"],
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.executions = Counter(
            "flowport_executions_total", "Executions that ended, by final state.", ["state"], registry=reg
        )
        self.executions_running = Gauge(
            "flowport_executions_running", "Executions running now.", multiprocess_mode="livesum", registry=reg
        )
        self.execution_duration = Histogram(
            "flowport_execution_duration_seconds",
            "Execution time from start to end, by tenant, workflow and final state.",
            ["tenant", "workflow", "state"],
            buckets=EXECUTION_BUCKETS,
            registry=reg,
        )
        self.webhook_deliveries = Counter(
            "flowport_webhook_deliveries_total",
            "Webhook delivery attempts by outcome (delivered, retried, dead_lettered), and deliveries dropped or lost.",
            ["outcome"],
            registry=reg,
        )
        self.webhook_pending = Gauge(
            "flowport_webhook_deliveries_pending",
            "Webhook deliveries this process holds, waiting for an attempt or being attempted.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.sandbox_busy = Gauge(
            "flowport_sandbox_workers_busy",
            "Sandbox workers running code now.",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.sandbox_workers = Gauge(
            "flowport_sandbox_workers", "Sandbox workers in the pool.", multiprocess_mode="livesum", registry=reg
        )
        self.store_duration = Histogram(
            "flowport_store_operation_duration_seconds",
            "Time of store reads and writes (a write may commit a group of them).",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.auth_failures = Counter(
            "flowport_auth_failures_total", "Calls refused for failed authentication.", registry=reg
        )
        self.rate_limited = Counter(
            "flowport_rate_limited_total",
            "Requests this server's rate limit service answered OVER_LIMIT.",
            registry=reg,
        )
        # Labelled children by label values: labels() costs more than the count itself.
        self._rpc: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._executions: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        # Workflows labelled apart, per tenant (the rest are OTHER_WORKFLOWS).
        self._workflows: dict[str, set[str]] = {}
        self._server: Any = None

    def rpc(self, method: str, code: str, seconds: float | None) -> None:
        """Count one finished call (`seconds` for unary calls)."""
        children = self._rpc.get((method, code))
        if children is None:
            children = self._rpc[(method, code)] = (
                self.rpc_requests.labels(method, code),
                self.rpc_duration.labels(method, code),
            )
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)

    def execution_ended(self, tenant: str, workflow_id: str, outcome: str, seconds: float) -> None:
        """Count one execution that ended (`outcome`: succeeded, failed or cancelled)."""
        named = self._workflows.setdefault(tenant, set())
        if workflow_id not in named:
            if len(named) >= WORKFLOWS_PER_TENANT:
                workflow_id = OTHER_WORKFLOWS
            else:
                named.add(workflow_id)
        children = self._executions.get((tenant, workflow_id, outcome))
        if children is None:
            # As many as the histogram's own children: one per tenant, workflow and outcome seen.
            children = self._executions[(tenant, workflow_id, outcome)] = (
                self.executions.labels(outcome),
                self.execution_duration.labels(tenant, workflow_id, outcome),
            )
        children[0].inc()
        children[1].observe(seconds)

    def _exposed(self) -> CollectorRegistry:
        """What /metrics shows: this process's registry, or every worker's files summed."""
        registry = self.registry
        if registry is None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry

    def exposition(self) -> bytes:
        """The text /metrics answers (GatewayService.GetMetrics serves it through Envoy)."""
        return generate_latest(self._exposed())

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: any free port) in a thread; returns the port."""
        registry = self._exposed()
        server, _thread = start_http_server(port, addr=host, registry=registry)
        self._server = server
        bound: int = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
