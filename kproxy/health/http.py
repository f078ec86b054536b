"""What kproxy's small HTTP servers share: threads per request, no access log, JSON answers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietServer(ThreadingHTTPServer):
    """A threaded HTTP server that can be restarted on its port at once."""

    daemon_threads = True
    allow_reuse_address = True

    def start(self, name: str) -> None:
        threading.Thread(target=self.serve_forever, daemon=True, name=name).start()


class JsonHandler(BaseHTTPRequestHandler):
    def send_json(self, code: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return  # load balancers and kubelet probe every few seconds: no log line per probe
