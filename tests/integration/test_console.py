"""The browser console at /console/, in headless Chromium (Debian's, driven by Playwright)
against a real `flowport up`: a user enters a key, an execution started through the
REST API appears in the live table and finishes there, its timeline shows its node."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from ..conftest import ADMIN_KEY, Stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (the README's test command)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    opened = context.new_page()
    yield opened
    context.close()


def test_the_console_shows_an_execution_live_and_its_timeline(page: Page, stack: Stack, tmp_path: Path) -> None:
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    response = page.goto(f"{stack.http}/console/")
    assert response is not None and response.status == 200
    headers = response.headers
    assert (
        "script-src 'self'" in headers["content-security-policy"]
        and "frame-ancestors 'none'" in headers["content-security-policy"]
    )
    assert headers["x-content-type-options"] == "nosniff"
    page.fill("#api-key", ADMIN_KEY)
    page.click("button[type=submit]")
    # Selectors, not wait_for_function: the console's CSP rightly refuses the eval it would need.
    page.wait_for_selector("#app", state="visible", timeout=10_000)
    # The key is in this tab's session storage, nowhere else.
    assert page.evaluate("sessionStorage.getItem('flowport.apiKey')") == ADMIN_KEY
    assert page.evaluate("localStorage.length") == 0 and page.input_value("#api-key") == ""

    name = f"console_{uuid.uuid4().hex[:8]}"
    code = "import time\ntime.sleep(0.5)\nresult = {'n': n + 1}"
    with httpx.Client(base_url=stack.http, headers={"x-api-key": ADMIN_KEY}, timeout=10) as http:
        workflow = {"name": name, "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": code}}]}
        assert http.post("/api/workflows", json=workflow).status_code == 200
        started = http.post("/api/executions", json={"workflow_id": name, "inputs": {"n": 1}}).json()
    row = f"#executions tbody tr[data-id='{started['execution_id']}']"
    page.wait_for_selector(row, timeout=10_000)
    page.wait_for_selector(f"{row}[data-state='succeeded']", timeout=10_000)
    assert name in page.inner_text(row)
    page.click(row)
    page.wait_for_selector("#timeline .lane", timeout=5_000)
    assert "calc (PythonCodeNode)" in page.inner_text("#timeline")
    page.screenshot(path=str(tmp_path / "console.png"), full_page=True)  # for debugging a failure
    assert problems == [], "no script errors or CSP violations"


def test_a_wrong_key_is_refused_and_the_page_shows_nothing(page: Page, stack: Stack) -> None:
    page.goto(f"{stack.http}/console")  # without the slash: redirected
    assert page.url.endswith("/console/")
    page.fill("#api-key", "fpk_not.a-real-key")
    page.click("button[type=submit]")
    page.wait_for_selector("#status.error:has-text('not accepted')", timeout=10_000)
    assert page.is_hidden("#app")


def test_a_failed_execution_shows_its_code_reason_and_message_as_text(page: Page, stack: Stack) -> None:
    page.goto(f"{stack.http}/console/")
    page.fill("#api-key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("#app", state="visible", timeout=10_000)
    name = f"console_failing_{uuid.uuid4().hex[:8]}"
    # Markup in the message must arrive as text, never as an element.
    code = "raise ValueError('<img id=injected src=x>')"
    with httpx.Client(base_url=stack.http, headers={"x-api-key": ADMIN_KEY}, timeout=10) as http:
        workflow = {"name": name, "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": code}}]}
        assert http.post("/api/workflows", json=workflow).status_code == 200
        started = http.post("/api/executions", json={"workflow_id": name}).json()
    row = f"#executions tbody tr[data-id='{started['execution_id']}']"
    page.wait_for_selector(f"{row}[data-state='failed']", timeout=10_000)
    reason = page.locator(f"{row} td.reason")
    reason.filter(has_text="ABORTED").wait_for(timeout=10_000)
    text = reason.inner_text()
    assert text.startswith("ABORTED [") and "node 'calc' (PythonCodeNode) failed" in text, text
    assert "<img id=injected src=x>" in (reason.get_attribute("title") or "")
    page.click(row)
    page.wait_for_selector("#timeline-error", state="visible", timeout=5_000)
    assert page.inner_text("#timeline-error") == reason.get_attribute("title")
    assert page.locator("#injected").count() == 0
