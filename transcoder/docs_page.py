"""The `/docs` page: the REST operations of `/openapi.json` as one static HTML page.

Kailash serves FastAPI's docs at `/docs`. flowport's page is written here, rendered
from the OpenAPI document when Envoy's config is (a `direct_response`, like the
console), so it runs no script, loads nothing from another site and costs the
server nothing. Every value from the document is HTML-escaped, and the response
carries a Content-Security-Policy that allows no script at all.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from flowport.transcoder.console_routes import static_headers

DOCS_PATH = "/docs"
METHODS = ("get", "post", "put", "patch", "delete")
# Nothing but the page itself: no script, no style from anywhere, no framing.
CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def docs_html(document: dict[str, Any]) -> str:
    """The page: one table of operations (method, path, summary) per tag, in the document's order."""
    info = document.get("info", {})
    title = f"{info.get('title', 'API')} REST API ({info.get('version', '')})"
    by_tag: dict[str, list[tuple[str, str, str]]] = {}
    for path, item in document.get("paths", {}).items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            tag = (operation.get("tags") or ["Other"])[0]
            summary = operation.get("summary") or operation.get("operationId", "")
            by_tag.setdefault(tag, []).append((method.upper(), path, summary))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>{escape(info.get('description', ''))} The whole document, with request and response "
        'schemas: <a href="/openapi.json">/openapi.json</a>. Calls need an <code>x-api-key</code> '
        "or <code>authorization: Bearer</code> header, except the few public ones (such as "
        "<code>GET /</code>, <code>GET /health</code> and this page) that the README lists.</p>",
    ]
    for tag, operations in by_tag.items():
        parts.append(f'<h2 id="{escape(tag)}">{escape(tag)}</h2>')
        parts.append("<table><thead><tr><th>Method</th><th>Path</th><th>What it does</th></tr></thead><tbody>")
        parts += [
            f"<tr><td>{escape(method)}</td><td><code>{escape(path)}</code></td><td>{escape(summary)}</td></tr>"
            for method, path, summary in operations
        ]
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def docs_route(document: Path, disabled_filters: dict[str, Any]) -> dict[str, Any] | None:
    """The Envoy route answering `GET /docs` with the page; None when the document is missing."""
    if not document.exists():
        return None
    page = docs_html(json.loads(document.read_text(encoding="utf-8")))
    return {
        "name": "docs",
        "match": {"path": DOCS_PATH},
        "direct_response": {"status": 200, "body": {"inline_string": page}},
        "response_headers_to_add": static_headers("text/html; charset=utf-8", CSP),
        "typed_per_filter_config": disabled_filters,
    }
