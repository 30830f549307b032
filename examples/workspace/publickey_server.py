"""GET /publickey: answers with root's authorised key (the user's own public key)."""

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY_FILE = "/root/.ssh/authorized_keys"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path != "/publickey":
            self.send_error(404)
            return
        with open(KEY_FILE, "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
