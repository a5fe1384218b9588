"""The Python application of bench/rivals.py: one WSGI application under
gunicorn's sync workers and under respawn, so that only the supervisor
differs.

    gunicorn --workers 2 --bind 127.0.0.1:8080 --chdir bench/rivals app:wsgi
    respawn --workers 2 -- python3 bench/rivals/app.py

GET / answers `handle by child <pid>`; /raise raises in the application
(gunicorn answers 500 and the worker serves on; under respawn what escapes
the application is a crash, handed over); /exit calls os._exit(1).

Under respawn it is served by the Python client's serve_wsgi where the
client has it, else by a request handler that calls the application.
"""

import os
import sys
from http.server import BaseHTTPRequestHandler


def wsgi(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/raise":
        raise RuntimeError("raised in the application")
    if path == "/exit":
        os._exit(1)
    if path != "/":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no route\n"]
    body = b"handle by child %d\n" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class Handler(BaseHTTPRequestHandler):
    """The application behind http.server, for a client without serve_wsgi:
    what the application raises escapes do_GET, as it would escape a WSGI
    server that does not catch it."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        said = []
        body = b"".join(wsgi({"PATH_INFO": self.path.split("?")[0], "REQUEST_METHOD": "GET"},
                             lambda status, headers: said.append((status, headers))))
        status, headers = said[0]
        self.send_response(int(status.split()[0]))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "..", "clients", "python"))
    import respawn

    if hasattr(respawn, "serve_wsgi"):
        sys.exit(respawn.serve_wsgi(wsgi))
    sys.exit(respawn.serve(Handler))
