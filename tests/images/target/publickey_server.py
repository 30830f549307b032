"""GET /publickey for the test target (stdlib only, threaded).

Body: the file named by $PUBLICKEY_BODY_FILE (bind-mounted by a test to serve hostile
bodies), else /root/.ssh/id_ed25519.pub; read on every request so a test may change it.
$PUBLICKEY_DELAY (seconds) delays each answer, $PUBLICKEY_STATUS sets its status.
Any other path: 404.
"""

from __future__ import annotations

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

PORT = int(os.environ.get("PUBLICKEY_PORT") or 8080)
BODY_FILE = os.environ.get("PUBLICKEY_BODY_FILE") or "/root/.ssh/id_ed25519.pub"
DELAY = float(os.environ.get("PUBLICKEY_DELAY") or 0)
STATUS = int(os.environ.get("PUBLICKEY_STATUS") or 200)


class Handler(BaseHTTPRequestHandler):
    server_version = "target-publickey/1"

    def _answer(self, send_body: bool) -> None:
        if urlsplit(self.path).path != "/publickey":
            self.send_error(404)
            return
        try:
            with open(BODY_FILE, "rb") as f:
                body = f.read()
        except OSError as exc:
            self.send_error(500, explain=str(exc))
            return
        if DELAY:
            time.sleep(DELAY)
        self.send_response(STATUS)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write("publickey: %s %s\n" % (self.address_string(), fmt % args))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    Server(("0.0.0.0", PORT), Handler).serve_forever()
