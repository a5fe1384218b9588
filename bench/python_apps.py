#!/usr/bin/env python3
"""Python applications under respawn: the figures of docs/protocol.md
("Python applications").

    python3 bench/python_apps.py [--seconds 30] [--runs 1] [--only exits|keep-alive]

exits: Flask under respawn (respawn.serve_wsgi) beside Flask under
gunicorn's sync workers, 2 workers each, with a route that calls
os._exit(1) hit twice a second while 2 clients GET / back to back, each
on a new connection: how many GET / fail, and whether the supervisor gives
up. --runs N alternates the order of the two.

keep-alive: wrk -t2 -c4 (4 connections kept alive for as long as the
server lets them) against a plain WSGI application under respawn, beside
uncaught exceptions at 5 and at 10 a second (each GET /crash on a
connection of its own, paced, not waiting for the last), then across 3
HUPs: wrk's socket errors (a request lost: reset, closed without an
answer) and its timeouts (an answer slower than 2 s, still an answer).

Makes a virtual environment in a temporary directory and installs into it,
from the registry, Flask 3.1 and gunicorn, and the client from
clients/python as a package. Needs wrk (make bench installs it).
RESPAWN_BIN overrides the binary (default target/release/respawn, from
`cargo build --release -p respawn-master --features demo --bin respawn`).
Each server runs in a process group of its own, killed with SIGKILL at the
end however the run ends. About 3 minutes with the defaults, plus the
install. Each row ends with the host's 1-minute load average: on a shared
machine, counts of answers say as much about the neighbours as about the
server.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("RESPAWN_BIN") or os.path.join(ROOT, "target", "release", "respawn")
FLASK, GUNICORN = "Flask==3.1.*", "gunicorn==27.*"
EXITS_PER_SECOND = 2

FLASK_APP = '''
import os, sys
from flask import Flask

app = Flask(__name__)

@app.get("/")
def index():
    return f"handle by child {os.getpid()}\\n"

@app.get("/exit")
def leave():
    os._exit(1)

if __name__ == "__main__":
    import respawn
    sys.exit(respawn.serve_wsgi(app))
'''

WSGI_APP = '''
import os, sys
import respawn

def app(environ, start_response):
    if environ["PATH_INFO"] == "/crash":
        raise RuntimeError("crash requested by GET /crash")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"handle by child %d\\n" % os.getpid()]

sys.exit(respawn.serve_wsgi(app))
'''


def progress(text):
    print(f"[python_apps {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def load():
    return f"{os.getloadavg()[0]:.1f}"


def get(port, path, timeout=10.0):
    """The status of GET path on a new connection, or what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while True:
                more = conn.recv(65536)
                if not more:
                    break
                answer += more
    except OSError as err:
        return type(err).__name__
    if not answer.startswith(b"HTTP/1.1 "):
        return "no answer" if not answer else "not HTTP"
    return int(answer[9:12])


class Server:
    """A supervisor in a process group of its own, on a port of its own
    (the workers of a master just killed hold the last one until their
    PDEATHSIG), its output in a file; killed with the group at the end of
    the `with`. `argv` makes the command line for the port."""

    def __init__(self, name, argv, cwd):
        self.name, self.port = name, free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv(self.port),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
            env={**os.environ, "RUST_LOG": "info", "RUST_LOG_STYLE": "never"},
        )

    def __enter__(self):
        deadline = time.monotonic() + 60
        while get(self.port, "/", timeout=2) != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.__exit__()
                last = "\n".join(self.lines("")[-20:])
                raise SystemExit(f"{self.name} never answered GET / on port {self.port}:\n{last}")
            time.sleep(0.05)
        return self

    def __exit__(self, *_):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def lines(self, needle):
        self.log.seek(0)
        return [line for line in self.log.read().decode(errors="replace").splitlines() if needle in line]


def exits(server, seconds, clients=2):
    """GET / back to back from `clients`, GET /exit twice a second: (200s,
    failures by kind, exits sent, seconds until the supervisor exited or
    None)."""
    done = threading.Event()
    results, lock = [], threading.Lock()

    def client():
        ok, failed = 0, {}
        while not done.is_set():
            status = get(server.port, "/")
            if status == 200:
                ok += 1
            else:
                failed[status] = failed.get(status, 0) + 1
        with lock:
            results.append((ok, failed))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    sent, gave_up = 0, None
    while time.monotonic() - started < seconds:
        tick = time.monotonic()
        get(server.port, "/exit", timeout=2)
        sent += 1
        if server.proc.poll() is not None:
            gave_up = time.monotonic() - started
            break
        time.sleep(max(0.0, 1 / EXITS_PER_SECOND - (time.monotonic() - tick)))  # the pace
    done.set()
    for thread in threads:
        thread.join()
    failed = {}
    for _, kinds in results:
        for kind, count in kinds.items():
            failed[kind] = failed.get(kind, 0) + count
    return sum(r[0] for r in results), failed, sent, gave_up


def wrk(port, seconds):
    """wrk -t2 -c4 for `seconds`: (requests, socket errors by kind)."""
    out = subprocess.run(
        ["wrk", "-t2", "-c4", f"-d{round(seconds)}s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    kinds = dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()))) if errors else {}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        kinds["non-2xx"] = int(non_2xx.group(1))
    return requests, kinds


def pace_crashes(port, rate, seconds):
    """GET /crash `rate` times a second for `seconds`, each on a thread of
    its own (a crash that waits for a worker does not slow the next);
    returns {status or error: count}."""
    codes, lock, threads = {}, threading.Lock(), []

    def crash():
        status = get(port, "/crash", timeout=30)
        with lock:
            codes[status] = codes.get(status, 0) + 1

    started, sent = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        thread = threading.Thread(target=crash)
        thread.start()
        threads.append(thread)
        sent += 1
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    for thread in threads:
        thread.join()
    return codes


def shown(kinds):
    return ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items(), key=str) if count) or "none"


def respawn(port, python, app):
    return [BINARY, "--workers", "2", "--listen", f"127.0.0.1:{port}", "--", python, app]


def run_exits(tmp, python, venv, seconds, runs):
    app = os.path.join(tmp, "flask_app.py")
    with open(app, "w") as f:
        f.write(FLASK_APP)
    gunicorn = os.path.join(venv, "bin", "gunicorn")
    systems = [
        ("respawn (serve_wsgi)", lambda port: respawn(port, python, app)),
        ("gunicorn (sync)", lambda port: [gunicorn, "--workers", "2", "--bind", f"127.0.0.1:{port}", "flask_app:app"]),
    ]
    print(
        f"\n| Flask, 2 workers, GET /exit twice a second, {seconds:g} s | GET / failed | GET /exit sent "
        f"| workers died in their first request | gave up | host load |"
    )
    print("|---|---|---|---|---|---|")
    for run in range(runs):
        for name, argv in systems if run % 2 == 0 else systems[::-1]:
            with Server(name, argv, tmp) as server:
                progress(f"{name}: GET / from 2 clients, GET /exit twice a second, {seconds:g} s")
                ok, failed, sent, gave_up = exits(server, seconds)
                why = server.lines("giving up")
                # respawn backs a slot off (0.1 s doubling) after a worker
                # that died in its first request; gunicorn does not say.
                first = len(server.lines(" during its first request; slot ")) if name.startswith("respawn") else "-"
            total = ok + sum(failed.values())
            given = f"after {gave_up:.1f} s: {why[-1] if why else ''}" if gave_up is not None else "no"
            print(
                f"| {name} | {sum(failed.values())} of {total:,} ({shown(failed)}) | {sent} | {first} "
                f"| {given} | {load()} |",
                flush=True,
            )


def run_keep_alive(tmp, seconds):
    if not shutil.which("wrk"):
        print("\nkeep-alive: wrk is not installed (apt-get install wrk)")
        return
    app = os.path.join(tmp, "wsgi_app.py")
    with open(app, "w") as f:
        f.write(WSGI_APP)
    shutil.copy(os.path.join(ROOT, "clients", "python", "respawn.py"), tmp)

    def argv(port):
        return respawn(port, sys.executable, app)

    print(
        f"\n| wrk -t2 -c4, WSGI app under respawn, 2 workers, {seconds:g} s | requests "
        f"| lost (wrk's read, write, connect errors) | slower than 2 s | GET /crash answered | host load |"
    )
    print("|---|---|---|---|---|---|")
    for rate in (5, 10):
        with Server("respawn", argv, tmp) as server:
            progress(f"keep-alive: wrk -c4 beside GET /crash {rate} a second, {seconds:g} s")
            crashes = {}
            pacer = threading.Thread(target=lambda: crashes.update(pace_crashes(server.port, rate, seconds)))
            pacer.start()
            requests, kinds = wrk(server.port, seconds)
            pacer.join()
        lost = sum(kinds.get(k, 0) for k in ("connect", "read", "write"))
        slow = kinds.get("timeout", 0)
        print(f"| crashes at {rate} a second | {requests:,} | {lost} | {slow} | {shown(crashes)} | {load()} |", flush=True)
    with Server("respawn", argv, tmp) as server:
        progress(f"keep-alive: wrk -c4 across 3 HUPs, {seconds:g} s")

        def hups():
            for _ in range(3):
                time.sleep(seconds / 4)
                os.kill(server.proc.pid, signal.SIGHUP)

        hupper = threading.Thread(target=hups)
        hupper.start()
        requests, kinds = wrk(server.port, seconds)
        hupper.join()
        done = len(server.lines("rolling restart done"))
    lost = sum(kinds.get(k, 0) for k in ("connect", "read", "write"))
    slow = kinds.get("timeout", 0)
    print(f"| 3 HUPs ({done} rolling restarts done) | {requests:,} | {lost} | {slow} | | {load()} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--runs", type=int, default=1, help="exits: each run reverses the order of the last")
    parser.add_argument("--only", choices=["exits", "keep-alive"])
    args = parser.parse_args()
    if not os.path.exists(BINARY):
        raise SystemExit(f"{BINARY} is missing: cargo build --release -p respawn-master --features demo --bin respawn")
    with tempfile.TemporaryDirectory(prefix="python-apps-") as tmp:
        if args.only != "keep-alive":
            venv = os.path.join(tmp, "venv")
            python = os.path.join(venv, "bin", "python")
            progress(f"installing {FLASK}, {GUNICORN} and clients/python into {venv}")
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                 "--disable-pip-version-check", FLASK, GUNICORN, os.path.join(ROOT, "clients", "python")],
                check=True,
            )
            run_exits(tmp, python, venv, args.seconds, args.runs)
        if args.only != "exits":
            run_keep_alive(tmp, args.seconds)


if __name__ == "__main__":
    main()
