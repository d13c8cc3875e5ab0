"""`python -m benchmarks run` at its smallest size: every scenario runs against real
processes (flowport up with Envoy, a bare grpc.aio server, PostgreSQL and Redis) and
checks its answers. Speed is never asserted: the machine is shared.

The Kailash peer is left out here (`--no-kailash`): building its venv from PyPI takes
a minute of a new machine's suite. `python -m benchmarks run --smoke` runs it, and
every benchmark run checks each of its answers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks.report import BEGIN, END

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {"unary", "workflow", "realtime", "memory", "startup", "scale_out"}


# Every scenario starts its own servers: far beyond the suite's default 120 s.
RUN_TIMEOUT = 600


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_every_scenario_runs_and_checks_its_answers(tmp_path: Path) -> None:
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nHand-written notes stay.\n")
    # A process group of its own, killed whole however the run ends, so that the
    # servers it starts (flowport up, Envoy, Kailash) never outlive it; PostgreSQL
    # and Redis detach, and their own guards (tests/backends.py) stop them.
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "run",
            "--smoke",
            "--no-kailash",
            "--out",
            str(tmp_path),
            "--results-md",
            str(results_md),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        _, stderr = run.communicate(timeout=RUN_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
    assert run.returncode == 0, stderr[-4000:]
    [result_file] = tmp_path.glob("smoke-*.json")
    record = orjson.loads(result_file.read_bytes())
    assert set(record["scenarios"]) == SCENARIOS
    for name, outcome in record["scenarios"].items():
        assert "error" not in outcome, f"{name}: {outcome.get('error')}"
        assert outcome["checks"], f"{name} checked nothing"
    assert record["kailash"] == "not run (--no-kailash)"
    machine = record["machine"]
    assert machine["cores"] and machine["cpu_model"] and machine["versions"]["envoy"].count("/") >= 2
    # Each comparison has both sides, measured in this run.
    unary = record["scenarios"]["unary"]["runs"]
    assert unary["flowport_h2load"]["requests"] == unary["bare_h2load"]["requests"] == 300
    workflow = record["scenarios"]["workflow"]["at_32_connections"]
    assert {"flowport_rest", "flowport_grpc"} <= set(workflow) and "kailash_rest" not in workflow
    assert record["scenarios"]["realtime"]["webhooks"]["every_event_once"]
    # The report: hand-written text kept, the generated section and its plots written.
    report = results_md.read_text()
    assert report.startswith("# Results\n\nHand-written notes stay.")
    assert BEGIN in report and END in report and "### Targets" in report
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert plots == ["latency_cdf.png", "workflow_throughput.png"]  # no Kailash, no comparison plot
    assert all((tmp_path / "plots" / p).stat().st_size > 5000 for p in plots)


def test_the_grpc_load_generator_counts_closed_and_open_loop_calls() -> None:
    from benchmarks.harness import grpc_load
    from benchmarks.harness.targets import EchoServer
    from flowport.v1 import session_pb2

    with EchoServer.run(session_pb2.Session(session_id="ses_1").SerializeToString()) as echo:
        right = grpc_load.Workload("get_session", echo.target, params={"session_id": "ses_1"})
        closed = grpc_load.run(right, concurrency=4, processes=2, requests=101)
        assert (closed.requests, closed.errors, closed.incorrect) == (101, 0, 0)
        assert 0 < closed.p50 <= closed.p90 <= closed.p99 <= closed.max
        # Open loop: 100 calls scheduled at 200/s take about half a second, whatever the answers do.
        opened = grpc_load.run(right, concurrency=8, rate=200.0, requests=100)
        assert (opened.requests, opened.errors) == (100, 0) and opened.seconds >= 0.45
        # A wrong answer (another session's id) is counted, not taken for speed.
        wrong = grpc_load.Workload("get_session", echo.target, params={"session_id": "ses_other"})
        assert grpc_load.run(wrong, concurrency=2, requests=10).incorrect == 10
