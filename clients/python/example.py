"""The demo's routes on http.server, supervised by respawn:

    respawn --workers 4 -- python3 clients/python/example.py

GET / answers `handle by child <pid>`, /crash raises inside the handler
(respawn.py answers 500 and the worker is replaced), /sleep/<ms> answers
after ms (0 to 60000), /hang spins forever (what respawn's --timeout is
for), /version says which code answers. Texts as the Rust demo's.
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler

import respawn

MAX_SLEEP_MS = 60_000


class Example(BaseHTTPRequestHandler):
    # Answers say HTTP/1.1, as the Rust demo's; respawn.py closes the
    # connection after each (and says so in a Connection header).
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/":
            return self.answer(200, f"handle by child {os.getpid()}\n")
        if path == "/version":
            return self.answer(200, version())
        if path == "/crash":
            raise RuntimeError("crash requested by GET /crash")
        if path == "/hang":
            while True:
                pass
        if path.startswith("/sleep/"):
            ms = path[len("/sleep/"):]
            if not ms.isascii() or not ms.isdigit() or int(ms) > MAX_SLEEP_MS:
                return self.answer(400, f"/sleep takes milliseconds, 0 to {MAX_SLEEP_MS}\n")
            time.sleep(int(ms) / 1000)
            return self.answer(200, f"slept {int(ms)} ms in child {os.getpid()}\n")
        return self.answer(404, f"no route for {path}\n")

    do_HEAD = do_GET

    def not_allowed(self):
        self.answer(405, f"method {self.command} not allowed: the demo serves GET\n")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = not_allowed

    def answer(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # no line per request, as the Rust demo (at its default level)


def version():
    """RESPAWN_DEMO_TAG, if set, is added: a wrapper that sets it makes a
    second build out of the same file, to watch a HUP roll it out."""
    tag = os.environ.get("RESPAWN_DEMO_TAG")
    return f"example python {sys.version.split()[0]}{' ' + tag if tag else ''}\n"


if __name__ == "__main__":
    sys.exit(respawn.serve(Example))
