"""A local HTTP endpoint that holds each GET until the test opens it.

A workflow whose HTTPRequestNode calls it runs exactly as long as the test
needs, however slow the machine: a test that must see an execution still
running (to watch it, or to keep a slot taken) opens the gate once it has.
"""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

HOLD_AT_MOST = 60.0  # a test that never opens the gate still ends


class Gate(ThreadingHTTPServer):
    """Use as a context manager; `release` opens it (and `release.clear()` closes it again)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _GateHandler)
        self.release = threading.Event()
        self.requests = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/hold"

    def node(self, name: str = "held") -> dict[str, Any]:
        """A node that runs until the gate opens."""
        return {"type": "HTTPRequestNode", "name": name, "config": {"url": self.url, "method": "GET", "timeout": 90}}

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _GateHandler(BaseHTTPRequestHandler):
    server: Gate

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests += 1
        self.server.release.wait(HOLD_AT_MOST)
        with contextlib.suppress(OSError):  # the caller may be gone
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
