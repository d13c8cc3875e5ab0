"""The trivial workflow executed synchronously: flowport over gRPC, flowport as REST through
Envoy (`POST /workflows/trivial/execute`), and the Kailash enterprise gateway it replaces
(`POST /workflows/trivial/execute` on `create_gateway(server_type="enterprise")`).

Every request carries a unique input `n` and every answer is checked for
`n + 1`: Kailash's durability layer answers a byte-identical body from its
cache, and a cache is not an execution. Both REST sides use the same client
(wrk, HTTP/1.1, 32 connections) and authenticate every request with an API
key. CPU per execution is the server processes' CPU (flowport: the servers
and their sandbox workers, Envoy counted apart; Kailash: its one process)
over the run divided by the executions it answered.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness import grpc_load, http_tools, procstat
from benchmarks.harness.latency import LoadResult
from benchmarks.harness.targets import FlowportUp, KailashGateway
from benchmarks.scenarios import Context, Result, check
from benchmarks.scenarios.setup import HEADERS, METADATA, prepare

CONNECTIONS = 32
# The answer's result, whose `n` must be the request's + 1 (a Lua pattern, see harness/wrk.lua).
EXPECT = '"result":%s*{%s*"n":%s*(%d+)'
FLOWPORT_BODY = '{"inputs": {"n": %d}}'
KAILASH_BODY = '{"inputs": {"calc": {"n": %d}}}'


def _rest(url: str, headers: dict[str, str], body: str, connections: int, seconds: float) -> LoadResult:
    return http_tools.wrk(
        url,
        connections=connections,
        duration=seconds,
        method="POST",
        headers={**headers, "content-type": "application/json"},
        body=body,
        expect=EXPECT,
    )


class _Usage:
    """CPU and memory of some processes over one run."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cpu = procstat.tree_cpu_seconds(pids)
        self.rss_before = procstat.tree_rss_bytes(pids)

    def report(self, executions: int) -> dict[str, Any]:
        cpu = procstat.tree_cpu_seconds(self.pids) - self.cpu
        return {
            "cpu_seconds": round(cpu, 3),
            "cpu_ms_per_execution": round(1000 * cpu / executions, 3) if executions else None,
            "rss_before_mib": round(self.rss_before / 2**20, 1),
            "rss_after_mib": round(procstat.tree_rss_bytes(self.pids) / 2**20, 1),
        }


def run(ctx: Context) -> Result:
    seconds = ctx.sizes.seconds
    checks: list[str] = []
    main: dict[str, Any] = {}
    sweep: dict[str, dict[str, Any]] = {"flowport_grpc": {}, "flowport_rest": {}, "kailash_rest": {}}
    with FlowportUp.run(ctx.folder("workflow")) as up:
        prepare(up)
        url = f"http://{up.edge}/workflows/trivial/execute"
        grpc_work = grpc_load.Workload("execute", up.grpc_direct, METADATA, {"workflow_id": "trivial"})
        _rest(url, HEADERS, FLOWPORT_BODY, CONNECTIONS, 1)  # warm-up: sandbox workers, plan cache
        servers, envoy = _Usage(up.server_pids()), _Usage(up.envoy_pids())
        rest = _rest(url, HEADERS, FLOWPORT_BODY, CONNECTIONS, seconds)
        main["flowport_rest"] = {
            **rest.as_json(),
            **servers.report(rest.requests),
            "envoy": envoy.report(rest.requests),
        }
        servers = _Usage(up.server_pids())
        direct = grpc_load.run(grpc_work, concurrency=CONNECTIONS, processes=2, duration=seconds)
        main["flowport_grpc"] = {**direct.as_json(), **servers.report(direct.requests)}
        for connections in ctx.sizes.concurrencies:
            sweep["flowport_rest"][str(connections)] = _rest(
                url, HEADERS, FLOWPORT_BODY, connections, seconds
            ).as_json()
            sweep["flowport_grpc"][str(connections)] = grpc_load.run(
                grpc_work, concurrency=connections, processes=min(2, connections), duration=seconds
            ).as_json()
    if ctx.kailash_python is not None:
        with KailashGateway.run(ctx.kailash_python) as kailash:
            url = f"{kailash.url}/workflows/trivial/execute"
            headers = {"x-api-key": kailash.api_key}
            _rest(url, headers, KAILASH_BODY, CONNECTIONS, 1)
            usage = _Usage([kailash.process.pid])
            peer = _rest(url, headers, KAILASH_BODY, CONNECTIONS, seconds)
            main["kailash_rest"] = {**peer.as_json(), **usage.report(peer.requests)}
            for connections in ctx.sizes.concurrencies:
                sweep["kailash_rest"][str(connections)] = _rest(
                    url, headers, KAILASH_BODY, connections, seconds
                ).as_json()
    for name, result in [*main.items(), *((f"{k} at {c}", r) for k, runs in sweep.items() for c, r in runs.items())]:
        checks.append(
            check(
                result["requests"] > 0 and result["errors"] == 0 and result["incorrect"] == 0,
                f"{name}: every execution answered with its own n + 1",
            )
        )
    ratios: dict[str, float] = {}
    if "kailash_rest" in main:
        ratios["rest_executions_vs_kailash"] = round(
            main["flowport_rest"]["per_second"] / main["kailash_rest"]["per_second"], 2
        )
        ratios["p99_vs_kailash"] = round(main["flowport_rest"]["p99"] / main["kailash_rest"]["p99"], 3)
    return {"at_32_connections": main, "by_concurrency": sweep, "ratios": ratios, "checks": checks}
