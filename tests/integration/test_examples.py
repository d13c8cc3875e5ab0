"""The examples in clients/examples/ run against a real `flowport up` and do what they say."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ADMIN_KEY, Stack

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "clients" / "examples"


def _env(stack: Stack) -> dict[str, str]:
    return {
        **os.environ,
        "FLOWPORT_TARGET": stack.envoy_target,
        "FLOWPORT_URL": stack.http,
        "FLOWPORT_API_KEY": ADMIN_KEY,
    }


def test_the_sync_sdk_example(stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowport.clients.examples.sdk_sync"],
        env=_env(stack),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "STATE_SUCCEEDED {'twice': 42}" in lines[0]
    assert lines[1].startswith("doubler has run ")
    assert lines[2] == "refused: NOT_FOUND WORKFLOW_NOT_FOUND " + lines[2].split("WORKFLOW_NOT_FOUND ", 1)[1]
    assert lines[-1] == "execution.completed" and "execution.started" in lines


def test_the_async_sdk_example(stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowport.clients.examples.sdk_async"],
        env=_env(stack),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "[4, 9, 16, 25, 36, 49]"
    # Watched while it runs: its nodes start and finish one after the other.
    assert lines[1].startswith("state: STATE_") and lines[-1] == "event: execution.completed", lines
    assert lines.count("event: node.completed") == 2, lines


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_curl_example(stack: Stack) -> None:
    done = subprocess.run(
        ["bash", str(EXAMPLES / "curl.sh")], env=_env(stack), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert '"greeting": "hello ada"' in done.stdout or '"greeting":"hello ada"' in done.stdout
    assert '"code":5' in done.stdout.replace(" ", "") and "exe_missing" in done.stdout
