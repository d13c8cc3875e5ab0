"""A webhook receiver that checks every delivery's signature (standard library only).

    FLOWPORT_WEBHOOK_SECRET=change-me-to-16-bytes-or-more \\
        python -m flowport.clients.examples.webhook_receiver --port 9000

Register it (loopback targets need `--webhook-allowlist 127.0.0.1`):

    curl -s -X POST localhost:8080/api/webhooks -d '{"url": "http://127.0.0.1:9000/hook",
         "event_types": ["execution.*"], "secret": "change-me-to-16-bytes-or-more"}'

It answers 204 to an authentic delivery, 401 to anything else, and 204
again without redoing the work for a delivery it has already handled
(flowport delivers at least once; a retry carries the same delivery id).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flowport.clients.webhooks import HEADER, SignatureError, require_signature

MAX_BODY = 1024 * 1024
REMEMBERED = 10_000  # delivery ids kept for deduplication


class Receiver(ThreadingHTTPServer):
    """The server, with the secret and the recently handled delivery ids."""

    def __init__(self, address: tuple[str, int], secret: str) -> None:
        super().__init__(address, Handler)
        self.secret = secret
        self.handled: OrderedDict[str, None] = OrderedDict()
        # Deliveries arrive on several threads; a retry may overlap its first try.
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._answer(413)
            return
        body = self.rfile.read(length)  # the exact bytes: the signature covers them
        try:
            require_signature(self.server.secret, self.headers.get(HEADER), body)
        except SignatureError as exc:
            print(f"refused: {exc}")
            self._answer(401)
            return
        delivery_id = self.headers.get("X-Flowport-Delivery-Id", "")
        with self.server.lock:
            if delivery_id not in self.server.handled:
                self.handle_event(json.loads(body), int(self.headers.get("X-Flowport-Delivery-Attempt", "1")))
                self.server.handled[delivery_id] = None
                if len(self.server.handled) > REMEMBERED:
                    self.server.handled.popitem(last=False)
        self._answer(204)

    def handle_event(self, event: dict[str, Any], attempt: int) -> None:
        """Your work goes here; keep it short, or queue it and answer at once."""
        print(f"event {event['id']} {event['type']} (attempt {attempt}): {json.dumps(event.get('data', {}))}")

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the prints above say what matters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    secret = os.environ.get("FLOWPORT_WEBHOOK_SECRET", "")
    if len(secret.encode()) < 16:
        parser.error("set FLOWPORT_WEBHOOK_SECRET to the webhook's secret (at least 16 bytes)")
    with Receiver((args.host, args.port), secret) as server:
        print(f"listening on http://{args.host}:{args.port}/ (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
