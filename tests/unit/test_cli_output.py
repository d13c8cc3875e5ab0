"""How the CLI shows an execution's outputs and errors in a terminal (clients/cli/output.py),
and how it ends when its reader stops reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from flowport.clients.cli.output import OUTPUT_NODES_SHOWN, describe_status, execution_outputs, render
from flowport.v1 import execution_pb2


def _execution(outputs: dict[str, object], ran: list[str]) -> execution_pb2.Execution:
    execution = execution_pb2.Execution(execution_id="exe_1")
    execution.outputs.update(outputs)
    execution.node_runs.extend(execution_pb2.NodeRun(node_id=node) for node in ran)
    return execution


def test_outputs_are_one_line_per_node_in_the_order_the_nodes_ran() -> None:
    execution = _execution({"a": {"x": 1}, "later": {"y": [1, 2]}, "z": {}}, ran=["later", "a", "z"])
    lines, cut = execution_outputs(execution, width=80)
    assert lines == ["NODE   OUTPUTS", 'later  {"y": [1, 2]}', 'a      {"x": 1}', "z      {}"]
    assert not cut


def test_no_outputs_show_nothing() -> None:
    assert execution_outputs(_execution({}, ran=["a"]), width=80) == ([], False)


def test_a_line_wider_than_the_terminal_is_cut_there_and_marked() -> None:
    lines, cut = execution_outputs(_execution({"node": {"text": "é" * 300}}, ran=["node"]), width=40)
    assert cut and len(lines[1]) == 40 and lines[1].endswith("…") and lines[1].startswith('node  {"text": "éé')


def test_many_nodes_show_the_first_and_say_how_many_more() -> None:
    names = [f"n{i:03d}" for i in range(OUTPUT_NODES_SHOWN + 7)]
    lines, cut = execution_outputs(_execution({n: {"v": 1} for n in names}, ran=names), width=80)
    assert cut and len(lines) == 1 + OUTPUT_NODES_SHOWN + 1 and lines[-1] == "… and 7 more nodes"


def test_a_status_reads_as_code_reason_and_message() -> None:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="USER_CODE_ERROR", metadata={"node_id": "calc"}))
    status = status_pb2.Status(code=code_pb2.ABORTED, message="node 'calc' failed: boom", details=[detail])
    assert describe_status(status) == "ABORTED [USER_CODE_ERROR]: node 'calc' failed: boom"
    assert describe_status(status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled")) == "CANCELLED: cancelled"
    assert describe_status(status_pb2.Status(code=99, message="odd")) == "99: odd"


@pytest.mark.timeout(60)
def test_output_into_a_closed_pipe_ends_quietly_with_141(tmp_path: Path) -> None:
    # `python -m flowport.clients.cli envoy-config | head -1`: far more than a pipe holds, no server needed.
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `head` once it has read its line
    try:
        result = subprocess.run(
            [sys.executable, "-m", "flowport.clients.cli", "envoy-config"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={**os.environ, "FLOWPORT_DATA_DIR": str(tmp_path / "data")},
            timeout=50,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr.decode()) == (141, "")


def test_json_output_is_what_the_rest_api_answers_whole_numbers_and_defaults_included() -> None:
    execution = _execution({"calc": {"result": {"n": 7, "half": 3.5, "big": 2.0**60}}}, ["calc"])
    execution.progress = 100.0
    shown = json.loads(render([execution], "json", single=True))
    assert shown["outputs"]["calc"]["result"] == {"n": 7, "half": 3.5, "big": 2.0**60}
    assert type(shown["outputs"]["calc"]["result"]["n"]) is int and shown["progress"] == 100
    assert shown["session_id"] == "" and shown["state"] == "STATE_UNSPECIFIED", "fields at their defaults are there"


def test_a_tables_durations_read_in_milliseconds_or_seconds() -> None:
    execution = _execution({}, [])
    execution.duration.FromNanoseconds(958_985)
    assert "0.959 ms" in render([execution], "table")
    execution.duration.FromNanoseconds(1_500_000_000)
    assert "1.5 s" in render([execution], "table")


def test_an_unavailable_answer_of_the_server_is_not_a_server_out_of_reach() -> None:
    import grpc

    from flowport.clients.cli.connect import EXIT_API_ERROR, EXIT_UNREACHABLE, explain
    from flowport.clients.errors import ApiError

    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="STORE_UNAVAILABLE", domain="flowport.dev"))
    status = status_pb2.Status(code=14, message="cannot connect to the database: OperationalError", details=[info])
    answered = explain(ApiError(grpc.StatusCode.UNAVAILABLE, status.message, status=status), "127.0.0.1:8080")
    assert answered.code == EXIT_API_ERROR and "is up but cannot serve this now" in str(answered)
    assert "STORE_UNAVAILABLE" in str(answered)
    unreachable = explain(ApiError(grpc.StatusCode.UNAVAILABLE, "failed to connect"), "127.0.0.1:8080")
    assert unreachable.code == EXIT_UNREACHABLE and "cannot reach the server" in str(unreachable)
