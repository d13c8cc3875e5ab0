"""The /docs page: every REST operation of the OpenAPI document, escaped, on a page that runs no script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowport.transcoder.docs_page import CSP, DOCS_PATH, docs_html, docs_route
from flowport.transcoder.envoy_config import openapi_path

pytestmark = pytest.mark.timeout(30)


def test_the_page_lists_every_operation_of_the_document() -> None:
    document = json.loads(openapi_path().read_text(encoding="utf-8"))
    page = docs_html(document)
    for path, item in document["paths"].items():
        for method in ("get", "post", "put", "patch", "delete"):
            if method in item:
                assert f"<tr><td>{method.upper()}</td><td><code>{path}</code>" in page, (method, path)
    assert "<script" not in page and 'href="/openapi.json"' in page


def test_values_from_the_document_are_escaped() -> None:
    hostile = {
        "info": {"title": "<b>t</b>", "version": "1"},
        "paths": {"/x/{id}": {"get": {"tags": ["<script>"], "summary": "a <img src=x onerror=alert(1)> & b"}}},
    }
    page = docs_html(hostile)
    assert "<script>" not in page and "<img" not in page and "<b>t" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; b" in page


def test_the_route_allows_no_script_and_needs_the_document(tmp_path: Path) -> None:
    route = docs_route(openapi_path(), {})
    assert route is not None and route["match"] == {"path": DOCS_PATH}
    headers = {h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]}
    assert headers["content-security-policy"] == CSP and "script-src" not in CSP and "default-src 'none'" in CSP
    assert headers["content-type"].startswith("text/html")
    assert docs_route(tmp_path / "missing.json", {}) is None
