"""The benchmark harness's pure parts: percentiles, tool output parsing, target verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.harness.http_tools import _count, _finished_seconds, grpc_frame
from benchmarks.harness.latency import LoadResult, percentile
from benchmarks.report import targets

H2LOAD = """finished in 156.67ms, 1914.85 req/s, 120.34KB/s
requests: 300 total, 300 started, 300 done, 296 succeeded, 4 failed, 3 errored, 1 timeout
status codes: 296 2xx, 0 3xx, 0 4xx, 0 5xx
"""


def test_percentiles_use_nearest_rank_and_the_cdf_ends_at_the_maximum() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0 and percentile(values, 0.99) == 100.0 and percentile([], 0.5) == 0.0
    result = LoadResult.from_latencies("t", list(reversed(values)), 2.0, errors=1, incorrect=0, concurrency=4)
    assert (result.requests, result.per_second, result.p50, result.max) == (100, 50.0, 51.0, 100.0)
    assert result.cdf[-1] == (100.0, 1.0) and len(result.cdf) == 100
    assert [p[1] for p in result.cdf] == sorted(p[1] for p in result.cdf)


def test_h2load_output_is_read_in_any_unit() -> None:
    assert _finished_seconds(H2LOAD) == pytest.approx(0.15667)
    assert _finished_seconds("finished in 2.08s, 4807.69 req/s") == pytest.approx(2.08)
    assert _count(H2LOAD, "failed") == 4 and _count(H2LOAD, "succeeded") == 296
    with pytest.raises(RuntimeError, match="no duration"):
        _finished_seconds("garbage")


def test_a_grpc_frame_is_flag_length_message() -> None:
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def _record(**scenarios: Any) -> dict[str, Any]:
    return {"scenarios": scenarios}


def test_targets_say_met_missed_or_not_measured() -> None:
    verdicts = {name: met for name, _, met in targets(_record())}
    assert set(verdicts.values()) == {None}, "nothing measured, nothing met"
    record = _record(
        unary={
            "ratios": {"grpc_vs_bare_h2load": 0.85, "rest_h2c_vs_grpc_direct": 0.9, "rest_http1_vs_grpc_direct": 0.8},
            "cpu_ms_per_call": {
                "grpc_direct": {"server_ms": 0.3, "envoy_ms": 0.0},
                "rest_http1_via_envoy": {"server_ms": 0.3, "envoy_ms": 0.2},
            },
        },
        workflow={
            "ratios": {"rest_executions_vs_kailash": 15.0, "p99_vs_kailash": 0.2},
            "at_32_connections": {
                "flowport_rest": {"cpu_ms_per_execution": 0.5, "envoy": {"cpu_ms_per_execution": 0.1}},
                "flowport_grpc": {"cpu_ms_per_execution": 0.45},
            },
        },
        memory={"growth_mib_per_100k_requests": 1.0},
        startup={"median_fresh_seconds": 1.2, "median_existing_data_seconds": 1.35},
        scale_out={
            "rows": [
                {"config": "sqlite, 1 worker", "scenario": "unary", "per_second": 10.0},
                {"config": "sqlite, 1 worker", "scenario": "executions", "per_second": 100.0},
                {"config": "pg+redis, 1 worker", "scenario": "executions", "per_second": 70.0},
                {"config": "pg+redis, 2 workers", "scenario": "executions", "per_second": 69.0},
            ]
        },
    )
    verdicts = targets(record)
    # REST 0.8x over HTTP/1.1 misses 0.85x; 0.6 ms over 0.3 ms is 2x; 15x meets 12x, not 20x; the
    # slower of the two starts decides; 70 of 100 is 0.7x; a second worker that adds nothing misses.
    assert [m for _, _, m in verdicts] == [True, False, True, True, False, False, True, False, True, False]
    assert "2.0x" in verdicts[2][1] and "1.50x" in verdicts[2][1] and "1.20x" in verdicts[2][1]
