"""The README's five-minute tour as written: `flowport up --dev` runs its
pipeline.json, whose HTTP node calls the gateway's own /health on loopback;
a plain `flowport up` refuses that call and names the flags that allow it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowport.server.settings import Settings

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, make_settings, start_up, stop_up
from . import tour_script

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

README = Path(__file__).resolve().parents[2] / "README.md"


def _tour() -> tuple[str, str]:
    """The tour's text and the pipeline.json it writes."""
    text = README.read_text(encoding="utf-8")
    tour = text.split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]
    pipeline = re.search(r"cat > pipeline\.json <<'JSON'\n(.*?)\nJSON\n", tour, re.DOTALL)
    assert pipeline is not None, "the tour writes pipeline.json"
    return tour, pipeline.group(1)


def _run_pipeline(settings: Settings) -> dict[str, Any]:
    """Create the tour's workflow (its URL on this stack's port) and run it, waiting, as the tour does."""
    workflow = json.loads(_tour()[1].replace("127.0.0.1:8080", f"127.0.0.1:{settings.http_port}"))
    with httpx.Client(base_url=settings.http_url, headers=ADMIN_HEADERS, timeout=60) as http:
        created = http.post("/api/workflows", json=workflow)
        assert created.status_code == 200, created.text
        ran = http.post("/api/executions", json={"workflow_id": workflow["name"], "wait": True})
        assert ran.status_code == 200, ran.text
        return dict(ran.json())


def test_the_tour_starts_with_dev() -> None:
    tour, pipeline = _tour()
    assert "`flowport up --dev`" in tour.split("```", 1)[0]
    assert '"url": "http://127.0.0.1:8080/health"' in pipeline


def test_up_dev_runs_the_tour_as_written(tmp_path: Path) -> None:
    # No allowlist configured (the tests' default allows loopback): only --dev lets the node through.
    settings = make_settings(tmp_path / "data", http_allowlist="")
    workdir = tmp_path / "reader"
    (workdir / ".flowport").mkdir(parents=True)
    (workdir / ".flowport" / "admin-api-key").write_text(ADMIN_KEY + "\n")
    stack = start_up(settings, timeout=90.0, args=["--dev"])
    try:
        warnings = [line for line in stack.output if "--dev is for local development only" in line]
        assert len(warnings) == 1, "".join(stack.output)
        text = tour_script.tour(README)
        run = tour_script.TourRun(settings, workdir)
        outputs = [run.shell(c) for block in tour_script.blocks(text, "sh") for c in tour_script.commands(block)]
        (python,) = tour_script.blocks(text, "python")
        printed = run.python(python)
    finally:
        stop_up(stack)
    ran = [json.loads(o) for o in outputs if '"state":"STATE_SUCCEEDED"' in o and "process_data" in o]
    assert ran, "the tour's pipeline ran"
    assert ran[0]["outputs"]["process_data"]["result"]["status"] == "healthy"
    assert ran[0]["outputs"]["fetch_data"]["response"]["status_code"] == 200
    assert printed.splitlines()[1:] == ["healthy", "NOT_FOUND SESSION_NOT_FOUND"], printed


def test_the_tour_script_reads_every_command() -> None:
    # The reader's view of the tour: a command per line (continuations joined), the shown answers attached.
    text = tour_script.tour(README)
    found = [c for block in tour_script.blocks(text, "sh") for c in tour_script.commands(block)]
    assert any(c.text.startswith("cat > pipeline.json <<'JSON'") and c.text.endswith("\nJSON") for c in found)
    created = next(c for c in found if '-d \'{"user_id": "ada", "metadata"' in c.text)
    assert "-H 'content-type: application/json'" in created.text and created.shown[0].startswith('{"session_id"')
    assert len(found) >= 20


def test_up_without_dev_refuses_loopback_and_names_the_flags(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", http_allowlist="")
    stack = start_up(settings, timeout=90.0)
    try:
        execution = _run_pipeline(settings)
    finally:
        stop_up(stack)
    assert not any("--dev is for local development only" in line for line in stack.output)
    assert execution["state"] == "STATE_FAILED", execution
    message = execution["error"]["message"]
    assert "127.0.0.1" in message and "not allowlisted (--http-allowlist, or --dev for loopback)" in message
