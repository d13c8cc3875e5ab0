"""Envoy routes that serve the browser console (clients/console/) at /console/.

Each file is a `direct_response` read by Envoy when it loads its config, so
the console needs no web server and no build step; a change to the files
takes effect at the next `flowport up`. The responses carry a strict
Content-Security-Policy (scripts, styles and connections from this origin
only, no framing), `nosniff` and no referrer. The console calls the same
REST API and `/events` stream as any client, with the key the user enters.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

PREFIX = "/console/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def console_dir() -> Path | None:
    """Where the console's files are (found without importing the SDK, which the supervisor does not need)."""
    spec = find_spec("flowport.clients")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "console"
        if (folder / "index.html").is_file():
            return folder
    return None


def static_headers(content_type: str, csp: str = CSP) -> list[dict[str, Any]]:
    """The response headers of a page or file Envoy serves itself (the console's, /docs)."""
    values = {
        "content-type": content_type,
        "content-security-policy": csp,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-cache",
    }
    return [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for k, v in values.items()
    ]


def console_routes(disabled_filters: dict[str, Any]) -> list[dict[str, Any]]:
    """Routes for /console (redirect), /console/ (index.html) and each file; none when the files are missing."""
    folder = console_dir()
    if folder is None:
        return []
    routes: list[dict[str, Any]] = [
        {
            "name": "console:redirect",
            "match": {"path": PREFIX.rstrip("/")},
            "redirect": {"path_redirect": PREFIX},
            "typed_per_filter_config": disabled_filters,
        }
    ]
    files = sorted(p for p in folder.iterdir() if p.suffix in CONTENT_TYPES)
    for path in files:
        paths = [PREFIX + path.name] + ([PREFIX] if path.name == "index.html" else [])
        for match in paths:
            routes.append(
                {
                    "name": f"console:{match}",
                    "match": {"path": match},
                    "direct_response": {"status": 200, "body": {"filename": str(path)}},
                    "response_headers_to_add": static_headers(CONTENT_TYPES[path.suffix]),
                    "typed_per_filter_config": disabled_filters,
                }
            )
    return routes
