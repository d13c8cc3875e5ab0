"""The `flowport` resource commands against a real `flowport up`: each command's happy
path and an error path, checking what is printed and the exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from flowport.clients.cli import main

from ..conftest import ADMIN_KEY, Stack, free_port

pytestmark = pytest.mark.integration


def _run(capsys: pytest.CaptureFixture[str], stack: Stack, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--target", stack.envoy_target, "--api-key", ADMIN_KEY])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _workflow(tmp_path: Path, code: str, name: str | None = None) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex}.json"
    name = name or f"cli_{uuid.uuid4().hex[:8]}"
    path.write_text(
        json.dumps({"name": name, "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": code}}]})
    )
    return path


def test_sessions_create_get_list_delete(capsys: pytest.CaptureFixture[str], stack: Stack) -> None:
    code, out, _ = _run(capsys, stack, "sessions", "create", "--user-id", "ada", "--ttl", "600", "-o", "json")
    assert code == 0
    session = json.loads(out)
    sid = session["session_id"]
    assert session["user_id"] == "ada" and sid.startswith("ses_")
    code, out, _ = _run(capsys, stack, "sessions", "get", sid)
    assert code == 0 and out.splitlines()[0].split() == ["SESSION", "USER", "CREATED", "EXPIRES"] and sid in out
    code, out, _ = _run(capsys, stack, "sessions", "list", "--user-id", "ada", "-o", "json")
    assert code == 0 and sid in [s["session_id"] for s in json.loads(out)]
    code, _, err = _run(capsys, stack, "sessions", "delete", sid)
    assert code == 0 and f"deleted session {sid}" in err
    code, out, err = _run(capsys, stack, "sessions", "get", sid)
    assert code == 1 and out == ""
    assert err.startswith("flowport: NOT_FOUND: ") and "[SESSION_NOT_FOUND]" in err and err.count("\n") == 1


def test_workflows_validate_create_get_list_delete(
    capsys: pytest.CaptureFixture[str], stack: Stack, tmp_path: Path
) -> None:
    good = _workflow(tmp_path, "result = {'n': n + 1}")
    code, out, _ = _run(capsys, stack, "workflows", "validate", "-f", str(good))
    assert (code, out.strip()) == (0, f"{good}: valid")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "nodes": [{"type": "NoSuchNode", "name": "x"}]}))
    code, out, _ = _run(capsys, stack, "workflows", "validate", "-f", str(bad))
    assert code == 1 and f"{bad}: nodes[0]" in out
    code, out, _ = _run(capsys, stack, "workflows", "create", "-f", str(good), "-o", "json")
    assert code == 0
    workflow_id = json.loads(out)["workflow_id"]
    code, out, _ = _run(capsys, stack, "workflows", "get", workflow_id)
    assert code == 0 and workflow_id in out
    code, out, _ = _run(capsys, stack, "workflows", "list", "-o", "json")
    assert code == 0 and workflow_id in [w["workflow_id"] for w in json.loads(out)]
    code, _, _ = _run(capsys, stack, "workflows", "delete", workflow_id)
    assert code == 0
    code, _, err = _run(capsys, stack, "workflows", "create", "-f", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err
    (tmp_path / "junk.json").write_text("{not json")
    code, _, err = _run(capsys, stack, "workflows", "create", "-f", str(tmp_path / "junk.json"))
    assert code == 2 and "is not a workflow in JSON" in err


def test_executions_run_wait_get_list_watch_cancel(
    capsys: pytest.CaptureFixture[str], stack: Stack, tmp_path: Path
) -> None:
    flow = _workflow(tmp_path, "result = {'n': n + 1}")
    code, out, err = _run(capsys, stack, "executions", "run", "-f", str(flow), "--input", "n=7", "--wait", "-o", "json")
    assert code == 0, err
    done = json.loads(out)
    assert done["state"] == "STATE_SUCCEEDED" and done["outputs"]["calc"]["result"]["n"] == 8
    assert "waiting" in err and ("STATE_SUCCEEDED" in err or "execution.completed" in err), "progress on stderr"
    eid, workflow_id = done["execution_id"], done["workflow_id"]
    code, out, _ = _run(capsys, stack, "executions", "get", eid)
    assert code == 0 and "succeeded" in out
    code, out, _ = _run(capsys, stack, "executions", "list", "--workflow", workflow_id, "--state", "succeeded")
    assert code == 0 and eid in out
    code, out, err = _run(capsys, stack, "executions", "watch", eid)
    assert code == 0 and "STATE_SUCCEEDED" in err
    code, out, _ = _run(capsys, stack, "executions", "cancel", eid, "-o", "json")
    assert code == 0 and json.loads(out)["state"] == "STATE_SUCCEEDED", "an ended execution stays as it ended"
    # A failing run exits 5; a run without --wait returns at once.
    failing = _workflow(tmp_path, "raise ValueError('no')")
    code, out, _ = _run(capsys, stack, "executions", "run", "-f", str(failing), "--wait", "-o", "json")
    assert code == 5 and json.loads(out)["state"] == "STATE_FAILED"
    code, out, _ = _run(capsys, stack, "executions", "run", "--workflow", workflow_id, "--input", "n=1", "-o", "json")
    assert code == 0 and json.loads(out)["state"] in ("STATE_PENDING", "STATE_RUNNING", "STATE_SUCCEEDED")
    code, _, err = _run(capsys, stack, "executions", "run", "--workflow", workflow_id, "--input", "n")
    assert code == 2 and "is not NAME=VALUE" in err
    code, _, err = _run(capsys, stack, "executions", "run", "--workflow", workflow_id, "--wait")
    assert code == 1 and "INVALID_ARGUMENT" in err and "inputs.n" in err


def test_run_wait_as_a_table_shows_each_nodes_outputs_cut_to_the_terminal(
    capsys: pytest.CaptureFixture[str], stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    flow = _workflow(tmp_path, "result = {'n': n + 1}")
    code, out, _ = _run(capsys, stack, "executions", "run", "-f", str(flow), "--input", "n=7", "--wait")
    assert code == 0
    lines = out.splitlines()
    assert lines[lines.index("NODE  OUTPUTS") + 1] == 'calc  {"result": {"n": 8}}'
    assert "-o json" not in out, "nothing was cut"
    eid = lines[1].split()[0]
    code, out, _ = _run(capsys, stack, "executions", "get", eid)
    assert code == 0 and 'calc  {"result": {"n": 8}}' in out.splitlines()
    # Outputs wider than the terminal are cut there, with a pointer to all of them.
    monkeypatch.setenv("COLUMNS", "60")
    wide = _workflow(tmp_path, "result = {'text': 'x' * 500}")
    code, out, _ = _run(capsys, stack, "executions", "run", "-f", str(wide), "--wait")
    assert code == 0
    lines = out.splitlines()
    shown = lines[lines.index("NODE  OUTPUTS") + 1]
    assert shown.startswith('calc  {"result": {"text": "xxx') and shown.endswith("…") and len(shown) == 60
    assert f"`flowport executions get {lines[1].split()[0]} -o json` prints every output in full" in out
    code, out, _ = _run(capsys, stack, "executions", "run", "-f", str(wide), "--wait", "-o", "json")
    assert code == 0 and json.loads(out)["outputs"]["calc"]["result"]["text"] == "x" * 500


def test_a_failed_run_says_why_while_waiting_and_watching(
    capsys: pytest.CaptureFixture[str], stack: Stack, tmp_path: Path
) -> None:
    # The node fails after the watch has begun (it begins within milliseconds), so its event is seen.
    failing = _workflow(tmp_path, "import time\ntime.sleep(3)\nraise ValueError('no such thing')")
    code, out, err = _run(capsys, stack, "executions", "run", "-f", str(failing), "--wait")
    assert code == 5 and "failed" in out
    progress = [line for line in err.splitlines() if "node.failed calc" in line]
    assert progress and "ValueError: no such thing" in progress[0], err
    eid = out.splitlines()[1].split()[0]
    ended = f"{eid}: STATE_FAILED: ABORTED ["
    last = err.splitlines()[-1]
    assert last.startswith(ended) and "node 'calc' (PythonCodeNode) failed" in last and "no such thing" in last, err
    code, _, err = _run(capsys, stack, "executions", "watch", eid)
    assert code == 5 and err.splitlines()[-1] == last, "watch ends with the same reason"


def test_output_into_a_closed_pipe_ends_quietly_with_141(stack: Stack) -> None:
    flowport = shutil.which("flowport")
    assert flowport is not None, "pip install -e . puts the command on PATH"
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head -2` once it has read its lines
    tail = subprocess.Popen(
        [flowport, "events", "tail", "--target", stack.envoy_target, "--api-key", ADMIN_KEY],
        stdout=write_end,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    from flowport.clients import Client
    from flowport.v1 import session_pb2

    deadline = time.monotonic() + 60
    with Client(stack.envoy_target, api_key=ADMIN_KEY) as client:
        # An event for the tail to print; the first line it writes meets the closed pipe.
        while tail.poll() is None and time.monotonic() < deadline:
            client.sessions.CreateSession(session_pb2.CreateSessionRequest())
            time.sleep(0.5)
    if tail.poll() is None:
        tail.kill()
    _, err = tail.communicate(timeout=30)
    assert (tail.returncode, err.decode()) == (141, "")


def test_events_tail_prints_new_events(capsys: pytest.CaptureFixture[str], stack: Stack) -> None:
    made: list[str] = []
    done = threading.Event()

    def meanwhile() -> None:
        from flowport.clients import Client
        from flowport.v1 import session_pb2

        # A session every half second until the tail has printed one: it starts at the newest
        # event, whenever its stream opens.
        with Client(stack.envoy_target, api_key=ADMIN_KEY) as client:
            request = session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="tail"))
            while not done.wait(0.5) and len(made) < 120:
                made.append(client.sessions.CreateSession(request).session_id)

    maker = threading.Thread(target=meanwhile, daemon=True)
    maker.start()
    try:
        code, out, _ = _run(capsys, stack, "events", "tail", "--type", "session.created", "--count", "1", "-o", "json")
    finally:
        done.set()
        maker.join(30)
    assert code == 0
    event = json.loads(out.splitlines()[0])
    assert event["type"] == "session.created" and event["session_id"] in made


def test_webhooks_create_list_deliveries_delete(capsys: pytest.CaptureFixture[str], stack: Stack) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    code, out, _ = _run(
        capsys, stack, "webhooks", "create", "--url", url, "--event-type", "session.created", "-o", "json"
    )
    assert code == 0
    webhook = json.loads(out)
    assert webhook["url"] == url and webhook["event_types"] == ["session.created"]
    code, out, _ = _run(capsys, stack, "webhooks", "list")
    assert code == 0 and webhook["webhook_id"] in out and "session.created" in out
    code, _, _ = _run(capsys, stack, "webhooks", "deliveries", webhook["webhook_id"])
    assert code == 0
    code, _, _ = _run(capsys, stack, "webhooks", "delete", webhook["webhook_id"])
    assert code == 0
    code, _, err = _run(capsys, stack, "webhooks", "create", "--url", "ftp://example.com/x")
    assert code == 1 and "INVALID_ARGUMENT" in err


def test_unreachable_and_refused_have_their_own_exit_codes(capsys: pytest.CaptureFixture[str], stack: Stack) -> None:
    code = main(["sessions", "list", "--target", f"127.0.0.1:{free_port()}", "--api-key", ADMIN_KEY, "--timeout", "2"])
    assert code == 3 and "cannot reach the server" in capsys.readouterr().err
    code = main(["sessions", "list", "--target", stack.envoy_target, "--api-key", "fpk_wrong.key"])
    assert code == 4 and "did not accept the API key" in capsys.readouterr().err


def test_completion_scripts_are_generated(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "flowport" in script and "executions" in script and "complete" in script


def test_secrets_put_list_delete(capsys: pytest.CaptureFixture[str], stack: Stack, tmp_path: Path) -> None:
    value = tmp_path / "value"
    value.write_text("s3cr3t-value\n")
    name = f"CLI_{uuid.uuid4().hex[:8].upper()}"
    code, out, _ = _run(capsys, stack, "secrets", "put", name, "--value-file", str(value), "-o", "json")
    assert code == 0 and json.loads(out)["name"] == name and "s3cr3t" not in out
    code, out, _ = _run(capsys, stack, "secrets", "list")
    assert code == 0 and name in out and "s3cr3t" not in out
    code, _, _ = _run(capsys, stack, "secrets", "delete", name)
    assert code == 0
    code, _, err = _run(capsys, stack, "secrets", "delete", name)
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = _run(capsys, stack, "secrets", "put", "bad name!", "--value-file", str(value))
    assert code == 1 and "INVALID_ARGUMENT" in err


def test_services_register_list_heartbeat_deregister(capsys: pytest.CaptureFixture[str], stack: Stack) -> None:
    sid = f"svc-{uuid.uuid4().hex[:8]}"
    register = ["services", "register", sid, "--endpoint", "http://127.0.0.1:9/", "--capability", "analytics"]
    code, out, _ = _run(capsys, stack, *register, "--zone", "eu", "--ttl", "60", "-o", "json")
    assert code == 0 and json.loads(out)["compliance_zones"] == ["eu"]
    code, out, _ = _run(capsys, stack, "services", "list", "--capability", "analytics", "--zone", "eu")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["SERVICE", "ENDPOINT"] and sid in out
    code, out, _ = _run(capsys, stack, "services", "list", "--zone", "us", "-o", "json")
    assert code == 0 and sid not in [s["service_id"] for s in json.loads(out)]
    code, out, _ = _run(capsys, stack, "services", "heartbeat", sid, "-o", "json")
    assert code == 0 and "expire_time" in json.loads(out)
    code, _, err = _run(capsys, stack, "services", "deregister", sid)
    assert code == 0 and f"deregistered service {sid}" in err
    code, _, err = _run(capsys, stack, "services", "get", sid)
    assert code == 1 and "[SERVICE_NOT_FOUND]" in err
    code, _, err = _run(capsys, stack, "services", "register", "Bad Id", "--endpoint", "http://127.0.0.1:9/")
    assert code == 1 and "INVALID_ARGUMENT" in err and "service.service_id" in err


def test_resources_create_list_update_delete(capsys: pytest.CaptureFixture[str], stack: Stack, tmp_path: Path) -> None:
    name = f"db-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "resource.json"
    path.write_text(json.dumps({"name": name, "database": {"connection_string": "sqlite:///r.db"}}))
    code, out, _ = _run(capsys, stack, "resources", "create", "-f", str(path), "-o", "json")
    assert code == 0 and json.loads(out)["database"]["pool_size"] == 5
    code, out, _ = _run(capsys, stack, "resources", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["RESOURCE", "KIND", "TARGET"]
    assert any(line.split()[:2] == [name, "database"] for line in out.splitlines())
    path.write_text(json.dumps({"database": {"connection_string": "sqlite:///r.db", "pool_size": 2}}))
    code, out, _ = _run(capsys, stack, "resources", "update", name, "-f", str(path), "-o", "json")
    assert code == 0 and json.loads(out)["database"]["pool_size"] == 2
    code, out, _ = _run(capsys, stack, "resources", "get", name, "-o", "json")
    assert code == 0 and json.loads(out)["name"] == name
    code, _, err = _run(capsys, stack, "resources", "delete", name)
    assert code == 0 and f"deleted resource {name}" in err
    code, _, err = _run(capsys, stack, "resources", "get", name)
    assert code == 1 and "[RESOURCE_NOT_FOUND]" in err
    path.write_text(json.dumps({"name": name, "database": {"connection_string": "postgresql://u:hunter2@db/x"}}))
    code, _, err = _run(capsys, stack, "resources", "create", "-f", str(path))
    assert code == 1 and "resource.database.connection_string" in err and "hunter2" not in err
    path.write_text("{not json")
    code, _, err = _run(capsys, stack, "resources", "create", "-f", str(path))
    assert code == 2 and "is not a resource in JSON" in err
