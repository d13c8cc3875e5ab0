"""The seed's EventSource code (streamEvents), unchanged but for the gateway's address, in headless
Chromium against a real `flowport up`: a page of the gateway's origin holding its key in the
`flowport_token` cookie sees a workflow's progress bar move to 100."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from ..conftest import ADMIN_HEADERS, ADMIN_KEY, Stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (the README's test command)"),
]

# From the seed, as written; only `localhost:8000` becomes the gateway's address (ADDRESS).
STREAM_EVENTS = """
async function streamEvents(sessionId) {
    const eventSource = new EventSource(
        `http://localhost:8000/events?session_id=${sessionId}`
    );

    eventSource.onmessage = (event) => {
        const data = JSON.parse(event.data);

        // Handle real-time workflow updates
        if (data.type === 'workflow_progress') {
            updateProgressBar(data.workflow_id, data.progress);
        }
    };

    eventSource.onerror = (error) => {
        console.error('SSE connection error:', error);
        // SSE automatically reconnects
    };

    return eventSource;
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        yield launched
        launched.close()


def test_the_seed_progress_bar_moves(browser: Browser, stack: Stack) -> None:
    http = httpx.Client(base_url=stack.http, timeout=60, headers=ADMIN_HEADERS)
    session_id = http.post("/api/sessions", json={"user_id": "browser"}).json()["session_id"]
    name = f"bar_{uuid.uuid4().hex[:8]}"
    nodes = [{"type": "PythonCodeNode", "id": f"n{i}", "parameters": {"code": "result = 1"}} for i in range(4)]
    links = [{"from_node": f"n{i}", "from_output": "result", "to_node": f"n{i + 1}", "to_input": "x"} for i in range(3)]
    assert http.post("/api/workflows", json={"name": name, "nodes": nodes, "connections": links}).status_code == 200

    context = browser.new_context()
    try:
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        # A page of the gateway's own origin (any of its URLs), whose key is in the cookie.
        assert page.goto(f"{stack.http}/healthz") is not None
        page.evaluate(f"document.cookie = 'flowport_token={ADMIN_KEY}; path=/; SameSite=Strict'")
        script = STREAM_EVENTS.replace("localhost:8000", f"127.0.0.1:{stack.settings.http_port}")
        page.evaluate(
            "window.bars = []; window.updateProgressBar = (id, progress) => window.bars.push([id, progress]);"
            + script
            + f"window.opened = new Promise((ready) => streamEvents('{session_id}').then((source) => {{"
            "  source.onopen = () => ready(true); }));"
        )
        page.evaluate("window.opened")  # subscribed: the run below cannot come before the stream
        run = http.post("/api/executions", json={"workflow_id": name, "session_id": session_id, "wait": True})
        assert run.status_code == 200 and run.json()["state"] == "STATE_SUCCEEDED", run.text
        page.wait_for_function("window.bars.length >= 4", timeout=20_000)
        bars = page.evaluate("window.bars")
        assert bars == [[name, 25], [name, 50], [name, 75], [name, 100]]
        assert not problems, problems
    finally:
        context.close()


def test_the_eventsource_example_lists_executions_as_they_happen(browser: Browser, stack: Stack) -> None:
    """clients/examples/eventsource.html as shipped, from the gateway's origin (as a proxy in front of
    both would serve it): each execution's events appear in its list."""
    page_html = (Path(__file__).parents[2] / "clients" / "examples" / "eventsource.html").read_text()
    http = httpx.Client(base_url=stack.http, timeout=60, headers=ADMIN_HEADERS)
    name = f"listed_{uuid.uuid4().hex[:8]}"
    node = {"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = 1"}}
    assert http.post("/api/workflows", json={"name": name, "nodes": [node]}).status_code == 200
    context = browser.new_context()
    try:
        context.add_init_script(f"sessionStorage.setItem('flowport.apiKey', '{ADMIN_KEY}')")
        address = f"{stack.http}/examples/eventsource.html"
        context.route(address, lambda route: route.fulfill(body=page_html, content_type="text/html"))
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(address)
        # Runs until its events show: the first may start before the page's stream has opened.
        for _ in range(20):
            run = http.post("/api/executions", json={"workflow_id": name, "wait": True})
            assert run.status_code == 200 and run.json()["state"] == "STATE_SUCCEEDED", run.text
            items = page.locator("#events li").all_text_contents()
            if any(run.json()["execution_id"] in item and "execution.completed" in item for item in items):
                break
            page.wait_for_timeout(250)
        else:
            raise AssertionError(f"no execution showed in the example's list: {items}")
        assert not problems, problems
    finally:
        context.close()
