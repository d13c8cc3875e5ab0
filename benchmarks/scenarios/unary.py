"""Unary read (`GetSession`): flowport against a bare grpc.aio server, and REST through Envoy
against direct gRPC, all in one run.

- gateway overhead: flowport's GetSession vs a bare grpc.aio server on uvloop
  returning the same message (its serialized bytes), with h2load (C client,
  so the client costs little) and with the Python grpc.aio generator;
- transcoding price: the same call as gRPC straight to the server, as gRPC
  through Envoy, as REST over h2c through Envoy (h2load) and as REST over
  HTTP/1.1 (wrk).

The runs alternate flowport and the baseline, so drift on a shared machine
touches both. h2load cannot see gRPC errors (they are trailers in an HTTP
200), so the server's own error count is compared before and after.
"""

from __future__ import annotations

import grpc

from benchmarks.harness import grpc_load, http_tools, procstat
from benchmarks.harness.latency import LoadResult
from benchmarks.harness.targets import EchoServer, FlowportUp
from benchmarks.scenarios import Context, Result, check
from benchmarks.scenarios.setup import HEADERS, METADATA, prepare, stats
from flowport.v1 import session_pb2, session_pb2_grpc

GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers", **HEADERS}
CLIENTS, STREAMS = 4, 8  # h2load: 32 calls in flight over 4 connections
PATH = "/flowport.v1.SessionService/GetSession"


def _h2load_grpc(target: str, body: bytes, requests: int) -> LoadResult:
    return http_tools.h2load(
        f"http://{target}{PATH}", requests=requests, clients=CLIENTS, streams=STREAMS, headers=GRPC_HEADERS, body=body
    )


def _server_errors(up: FlowportUp) -> tuple[int, int]:
    counters = stats(up).requests
    return counters.total, counters.errors


def run(ctx: Context) -> Result:
    requests = ctx.sizes.unary_requests
    checks: list[str] = []
    runs: dict[str, LoadResult] = {}
    cpu_per_call: dict[str, dict[str, float]] = {}
    with FlowportUp.run(ctx.folder("unary")) as up:
        session = prepare(up)
        with grpc.insecure_channel(up.grpc_direct) as channel:
            reply = session_pb2_grpc.SessionServiceStub(channel).GetSession(
                session_pb2.GetSessionRequest(session_id=session.session_id), metadata=METADATA
            )
        checks.append(check(reply.session_id == session.session_id, "GetSession returns the session asked for"))
        body = http_tools.grpc_frame(session_pb2.GetSessionRequest(session_id=session.session_id).SerializeToString())
        warm = max(200, requests // 10)
        with EchoServer.run(reply.SerializeToString()) as echo:
            _h2load_grpc(up.grpc_direct, body, warm)
            _h2load_grpc(echo.target, body, warm)
            before = _server_errors(up)
            runs["flowport_h2load"] = _h2load_grpc(up.grpc_direct, body, requests)
            runs["bare_h2load"] = _h2load_grpc(echo.target, body, requests)
            flowport_load = grpc_load.Workload(
                "get_session", up.grpc_direct, METADATA, {"session_id": session.session_id}
            )
            echo_load = grpc_load.Workload("get_session", echo.target, METADATA, {"session_id": session.session_id})
            runs["flowport_grpc_aio"] = grpc_load.run(flowport_load, concurrency=32, processes=2, requests=requests)
            runs["bare_grpc_aio"] = grpc_load.run(echo_load, concurrency=32, processes=2, requests=requests)
        # Transcoding: the same call through Envoy, as gRPC and as REST, with
        # the CPU each side spends per call (they share the machine's cores).
        rest_url = f"http://{up.edge}/api/sessions/{session.session_id}"
        edge_runs = {
            "grpc_direct": lambda: _h2load_grpc(up.grpc_direct, body, requests),
            "grpc_via_envoy": lambda: _h2load_grpc(up.edge, body, requests),
            "rest_h2c_via_envoy": lambda: http_tools.h2load(
                rest_url, requests=requests, clients=CLIENTS, streams=STREAMS, headers=HEADERS
            ),
            "rest_http1_via_envoy": lambda: http_tools.wrk(
                rest_url, connections=32, duration=max(1.0, requests / 5000), headers=HEADERS
            ),
        }
        for name, measure in edge_runs.items():
            server_cpu = procstat.tree_cpu_seconds(up.server_pids())
            envoy_cpu = procstat.tree_cpu_seconds(up.envoy_pids())
            runs[name] = measure()
            calls_made = max(1, runs[name].requests)
            cpu_per_call[name] = {
                "server_ms": round(1000 * (procstat.tree_cpu_seconds(up.server_pids()) - server_cpu) / calls_made, 4),
                "envoy_ms": round(1000 * (procstat.tree_cpu_seconds(up.envoy_pids()) - envoy_cpu) / calls_made, 4),
            }
        total, errors = _server_errors(up)
    calls = sum(r.requests for k, r in runs.items() if not k.startswith("bare"))
    checks.append(check(errors == before[1], f"the server counted no errors over {calls} calls"))
    checks.append(check(total - before[0] >= calls, "the server counted every call it answered"))
    for name, result in runs.items():
        checks.append(check(result.errors == 0 and result.incorrect == 0, f"{name}: no failed or wrong answers"))
        checks.append(check(result.requests > 0, f"{name}: answered calls"))
    ratio = {
        "grpc_vs_bare_h2load": runs["flowport_h2load"].per_second / runs["bare_h2load"].per_second,
        "grpc_vs_bare_grpc_aio": runs["flowport_grpc_aio"].per_second / runs["bare_grpc_aio"].per_second,
        "rest_h2c_vs_grpc_direct": runs["rest_h2c_via_envoy"].per_second / runs["grpc_direct"].per_second,
        "rest_http1_vs_grpc_direct": runs["rest_http1_via_envoy"].per_second / runs["grpc_direct"].per_second,
        "grpc_via_envoy_vs_direct": runs["grpc_via_envoy"].per_second / runs["grpc_direct"].per_second,
    }
    return {
        "runs": {name: result.as_json() for name, result in runs.items()},
        "ratios": {name: round(value, 3) for name, value in ratio.items()},
        "cpu_ms_per_call": cpu_per_call,
        "reply_bytes": reply.ByteSize(),
        "checks": checks,
    }
