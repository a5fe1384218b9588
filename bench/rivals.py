"""Beside the tools users would pick instead: respawn with the Node and
Python clients, beside PM2's cluster mode (Node) and gunicorn's sync workers
(Python), in the same scenarios, the same hour, on the same machine.

    python3 bench/anylang.py --only rivals [--print]

bench/anylang.py (make bench-any) runs it after its own table and writes
its section of docs/benchmarks.md ("Beside PM2 and gunicorn"); make bench
carries the section over as the last make bench-any wrote it.

PM2 and gunicorn are installed from their registries (npm, PyPI), at the
pinned versions below, into a temporary directory removed at the end; PM2
runs with its home (PM2_HOME) there too, so that a user's own PM2 is never
touched (a home for each server started). The same application runs under each pair (bench/rivals/app.js,
bench/rivals/app.py): only the supervisor differs. Every supervisor gets 2
workers and its defaults: respawn its crash-loop guard (`--min-uptime 1`,
10 failed starts in 60 s), PM2 its `min_uptime` (1 s) and `max_restarts`
(16), gunicorn its own.

Each scenario starts a fresh server and stops it at the end, whatever
happens; every process started here is stopped at exit (run.py's STARTED).
All traffic goes to 127.0.0.1.
"""

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402
from run import RESPAWN, ROOT, STARTED, fmt, progress  # noqa: E402

TITLE = "## Beside PM2 and gunicorn"
PM2 = "pm2@7.0.4"
GUNICORN = "gunicorn==27.0.1"
APP_JS = os.path.join(HERE, "rivals", "app.js")
APP_PY = os.path.join(HERE, "rivals", "app.py")
WORKERS = 2
STORM_SECONDS = 15
CLIENTS = 2  # GET / clients beside the storms, each request on a new connection
TIMEOUT = 10.0  # seconds a GET / may take before it counts as a hang
NODE_THROWS = ["/throw/sync", "/throw/async", "/throw/timeout", "/throw/rejection"]
RESPAWN_NODE, PM2_COLUMN, RESPAWN_PYTHON, GUNICORN_COLUMN = (
    "respawn -- node", "PM2 cluster", "respawn -- python", "gunicorn")


# ---------------------------------------------------------------- installs


class Installs:
    """PM2 and gunicorn in a temporary directory: `pm2` and `gunicorn` are
    the paths of their programs, or None with `why` saying what failed."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="respawn-bench-rivals-")
        self.pm2 = self.gunicorn = None
        self.why = {}
        if shutil.which("npm") and shutil.which("node"):
            self._install("pm2", ["npm", "install", "--prefix", os.path.join(self.dir, "npm"),
                                  "--no-audit", "--no-fund", "--loglevel=error", PM2],
                          os.path.join(self.dir, "npm", "node_modules", ".bin", "pm2"))
        else:
            self.why["pm2"] = "node or npm not found"
        venv = os.path.join(self.dir, "venv")
        made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], capture_output=True, text=True)
        if made.returncode != 0:
            self.why["gunicorn"] = f"python3 -m venv failed: {made.stderr.strip()[-200:]}"
        else:
            self._install("gunicorn", [sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"),
                                       "install", "--quiet", "--disable-pip-version-check", "--no-input",
                                       "--no-deps", "--only-binary", ":all:", GUNICORN],
                          os.path.join(venv, "bin", "gunicorn"))

    def _install(self, name, argv, program):
        progress(f"rivals: installing {name} ({argv[-1]}) into {self.dir}")
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            self.why[name] = f"{' '.join(argv[:2])}: {err}"
            return
        if done.returncode != 0 or not os.path.exists(program):
            self.why[name] = f"{' '.join(argv[:2])} failed: {(done.stderr or done.stdout).strip()[-300:]}"
            return
        setattr(self, name, program)

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- servers


class Server:
    """A started supervisor with 2 workers on `port`: `manager` is the pid
    of the process that keeps them (respawn's master, PM2's daemon,
    gunicorn's arbiter); its live children are the workers."""

    port = None
    manager = None

    def workers(self):
        return run.live_children(self.manager)

    def gave_up(self):
        """Has the supervisor stopped keeping its workers?"""
        raise NotImplementedError

    def reload(self):
        """Starts replacing every worker (HUP, pm2 reload)."""
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def wait_serving(self):
        """Until WORKERS workers run and GET / is answered."""
        def serving():
            if len(self.workers()) != WORKERS:
                return False
            try:
                return fetch(self.port, "/", 2.0) == "ok"
            except OSError:
                return False
        if not run.wait_until(serving, step=0.05):
            raise RuntimeError(f"{type(self).__name__} never served with {WORKERS} workers")


class RespawnServer(Server):
    """respawn with its defaults, the worker a client's program."""

    def __init__(self, command):
        self.running = run.Running(
            [RESPAWN, "--workers", str(WORKERS), "--listen", f"127.0.0.1:{run.free_port()}", "--", *command],
            dict(os.environ, RUST_LOG="info", RUST_LOG_STYLE="never"))
        self.port, self.manager = self.running.port, self.running.pid
        self.running.ready(WORKERS)
        self.wait_serving()

    def gave_up(self):
        return self.running.proc.poll() is not None

    def reload(self):
        os.kill(self.manager, signal.SIGHUP)

    def stop(self):
        self.running.stop()


class Pm2Server(Server):
    """`pm2 start app.js -i 2` (cluster mode), its daemon in a PM2_HOME of
    the run's own; `pm2 kill` at the end, then SIGKILL for anything left."""

    def __init__(self, installs):
        self.pm2, self.port = installs.pm2, run.free_port()
        # A home of this server's own: a daemon and a log with no past.
        home = tempfile.mkdtemp(prefix="pm2-home-", dir=installs.dir)
        self.env = dict(os.environ, PM2_HOME=home)
        self.log = os.path.join(home, "pm2.log")
        self.pids = set()
        STARTED.append(self)
        self.command(["start", APP_JS, "-i", str(WORKERS), "--name", "rival", "--", "--port", str(self.port)])
        with open(os.path.join(home, "pm2.pid")) as f:
            self.manager = int(f.read().strip())
        self.pids.add(self.manager)
        self.wait_serving()

    def command(self, args, timeout=60):
        return subprocess.run([self.pm2, *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def workers(self):
        found = super().workers()
        self.pids.update(found)
        return found

    def gave_up(self):
        # PM2 marks an instance "errored" when it stops restarting it, and
        # says so in its daemon's log: read that, not `pm2 jlist`, whose
        # Node start would take the cores the servers are measured on.
        try:
            with open(self.log) as f:
                said = "too many unstable restarts" in f.read()
        except OSError:
            said = False
        return said or run.stat(self.manager) is None

    def reload(self):
        # Blocking: pm2 reload returns when its rollout is done.
        threading.Thread(target=self.command, args=(["reload", "rival"],), daemon=True).start()

    def stop(self):
        if self in STARTED:
            STARTED.remove(self)
        try:
            self.command(["kill"], timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class GunicornServer(Server):
    """`gunicorn --workers 2 --bind 127.0.0.1:PORT app:wsgi`: sync workers."""

    def __init__(self, installs):
        self.port = run.free_port()
        self.proc = subprocess.Popen(
            [installs.gunicorn, "--workers", str(WORKERS), "--bind", f"127.0.0.1:{self.port}",
             "--no-control-socket", "--log-level", "warning", "--chdir", os.path.dirname(APP_PY), "app:wsgi"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        STARTED.append(self)
        self.manager = self.proc.pid
        self.wait_serving()

    def gave_up(self):
        return self.proc.poll() is not None

    def reload(self):
        os.kill(self.manager, signal.SIGHUP)

    def stop(self):
        if self in STARTED:
            STARTED.remove(self)
        run.stop_group(self.proc)


def systems(installs):
    """{column: (start function, crash routes) or why it is missing}."""
    # The interpreter running this file, not a `python3` found in PATH: that
    # may be a shim (pyenv's is a shell script) that forks helpers first.
    node, python = shutil.which("node"), sys.executable
    found = {}
    found[RESPAWN_NODE] = ((lambda: RespawnServer([node, APP_JS, "--respawn"])), NODE_THROWS) if node \
        else "node not found"
    found[PM2_COLUMN] = ((lambda: Pm2Server(installs)), NODE_THROWS) if installs.pm2 else installs.why["pm2"]
    found[RESPAWN_PYTHON] = ((lambda: RespawnServer([python, APP_PY])), ["/raise"]) if python \
        else "python3 not found"
    found[GUNICORN_COLUMN] = ((lambda: GunicornServer(installs)), ["/raise"]) if installs.gunicorn \
        else installs.why["gunicorn"]
    return found


# ---------------------------------------------------------------- HTTP


def fetch(port, path, timeout=TIMEOUT):
    """GET on a new connection, `Connection: close`: "ok" for a 200, else
    what went wrong (refused, reset, empty, timeout, or the status)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except socket.timeout:
        return "timeout"
    if not data:
        return "empty"
    status = data.split(b" ", 2)[1:2]
    return "ok" if status == [b"200"] else f"status {status[0].decode() if status else '?'}"


class Clients:
    """CLIENTS threads sending GET / on new connections until stopped."""

    def __init__(self, port, clients=CLIENTS):
        self.port, self.done, self.lock = port, threading.Event(), threading.Lock()
        self.outcomes = {}
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _loop(self):
        while not self.done.is_set():
            outcome = fetch(self.port, "/")
            with self.lock:
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def stop(self):
        self.done.set()
        for t in self.threads:
            t.join(TIMEOUT + 5)
        ok = self.outcomes.get("ok", 0)
        failed = {k: v for k, v in self.outcomes.items() if k != "ok"}
        return ok, failed


def failures(failed):
    """'12 (9 reset, 3 refused)', or '0'."""
    total = sum(failed.values())
    if not total:
        return "0"
    how = ", ".join(f"{n} {kind}" for kind, n in sorted(failed.items(), key=lambda kv: -kv[1]))
    return f"{total} ({how})"


def hit(port, routes, every, seconds):
    """Requests the crash routes in turn, one every `every` s, for `seconds`,
    each from a thread of its own: a request that hangs (a rejection PM2
    only logs) must not slow the storm down. Returns how many were sent."""
    started, n = time.monotonic(), 0
    while time.monotonic() < started + seconds:
        threading.Thread(target=fetch, args=(port, routes[n % len(routes)], 2.0), daemon=True).start()
        n += 1
        time.sleep(max(0.0, started + n * every - time.monotonic()))
    return n


class GiveUpWatch:
    """Checks every half second whether the supervisor gave up; `at` is
    when it was first seen, in seconds from the start, or None."""

    def __init__(self, server):
        self.server, self.at, self.done = server, None, threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        while self.at is None and not self.done.wait(0.5):
            if self.server.gave_up():
                self.at = time.monotonic() - self.started

    def stop(self):
        self.done.set()
        self.thread.join()
        if self.at is None and self.server.gave_up():
            self.at = time.monotonic() - self.started
        return f"after {self.at:.1f} s" if self.at is not None else "no"


# ---------------------------------------------------------------- scenarios


def storm(start, routes, every):
    """GET / from CLIENTS clients while the crash routes come every `every`
    s for STORM_SECONDS; the failed GET / and whether the supervisor gave up."""
    server = start()
    try:
        clients, watch = Clients(server.port), GiveUpWatch(server)
        hits = hit(server.port, routes, every, STORM_SECONDS)
        ok, failed = clients.stop()
        gave_up = watch.stop()
        run.wait_until(lambda: len(server.workers()) == WORKERS, limit=5)
        return {"GET / answered": ok, "GET / failed": failures(failed),
                "crash requests sent": hits, "workers at the end": len(server.workers()),
                "gave up": gave_up}
    finally:
        server.stop()


def reload_under_load(start, _routes):
    """GET / from CLIENTS clients; after 2 s, HUP (pm2 reload); the load
    goes on until every worker is new (the manager's children, in /proc),
    and 2 s more."""
    server = start()
    try:
        old = set(server.workers())
        clients = Clients(server.port)
        time.sleep(2)
        t0 = time.monotonic()
        server.reload()
        renewed = run.wait_until(lambda: (lambda now: len(now) == WORKERS and not now & old)(set(server.workers())),
                                 limit=60, step=0.01)
        took = time.monotonic() - t0
        time.sleep(2)
        ok, failed = clients.stop()
        return {"GET / answered": ok, "GET / failed": failures(failed),
                "every worker new after s": took if renewed else None}
    finally:
        server.stop()


def keepalive_beside_crashes(start, routes):
    """wrk -t2 -c4 (keep-alive) on / for STORM_SECONDS while a crash route
    comes 10 times a second on its own connection."""
    server = start()
    try:
        load = subprocess.Popen(["wrk", "-t2", "-c4", f"-d{STORM_SECONDS}s", f"http://127.0.0.1:{server.port}/"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        STARTED.append(run.Wrk(load))
        watch = GiveUpWatch(server)
        hit(server.port, routes, 0.1, STORM_SECONDS - 0.5)
        out = load.communicate(timeout=STORM_SECONDS + 30)[0]
        figures = run.wrk_figures(out)
        # wrk's errors are its socket errors (a connect refused, a read or
        # write on a reset connection; retried at once, so one outage can
        # count thousands) plus its non-2xx answers; its requests are the
        # answers. An attempt is an answer or a socket error.
        said = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        socket_errors = sum(int(n) for n in said.groups()) if said else 0
        attempts = figures["requests"] + socket_errors
        return {"answered 2xx": figures["requests"] - (figures["errors"] - socket_errors),
                "failed": figures["errors"],
                "failed % of attempts": 100.0 * figures["errors"] / attempts if attempts else None,
                "gave up": watch.stop()}
    finally:
        server.stop()


def memory(start, _routes):
    """2 workers, 100 GET /, 2 s idle: Pss of each worker (the mean) and of
    the manager (respawn's master, PM2's daemon, gunicorn's arbiter)."""
    server = start()
    try:
        for _ in range(100):
            fetch(server.port, "/")
        time.sleep(2)
        workers = server.workers()
        return {"worker Pss MiB": statistics.mean(run.pss_kib(w) for w in workers) / 1024,
                "manager Pss MiB": run.pss_kib(server.manager) / 1024}
    finally:
        server.stop()


SCENARIOS = [
    ("storm of throws", lambda start, routes: storm(start, routes, 0.25)),
    ("storm of hard exits", lambda start, _routes: storm(start, ["/exit"], 0.5)),
    ("reload under load", reload_under_load),
    ("keep-alive beside crashes", keepalive_beside_crashes),
    ("memory, idle", memory),
]


def measure():
    """{"columns": {column: {scenario: figures}}, "missing": {column: why}, ...}."""
    installs = Installs()
    results = {"columns": {}, "missing": {}, "pm2": PM2, "gunicorn": GUNICORN}
    try:
        results["python serves with"] = python_serves_with()
        for column, found in systems(installs).items():
            if isinstance(found, str):
                results["missing"][column] = found
                continue
            start, routes = found
            figures = results["columns"][column] = {}
            for name, scenario in SCENARIOS:
                progress(f"rivals, {name}: {column}")
                try:
                    figures[name] = scenario(start, routes)
                except Exception as err:  # a failed run is reported, not fatal
                    progress(f"rivals, {name}: {column} failed: {err}")
    finally:
        run.stop_everything()
        installs.remove()
    results["load average"] = os.getloadavg()[0]
    return results


def python_serves_with():
    """Which of the Python client's functions bench/rivals/app.py uses."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import respawn; "
             "print('serve_wsgi' if hasattr(respawn, 'serve_wsgi') else 'serve')")
    done = subprocess.run([sys.executable, "-c", probe, os.path.join(ROOT, "clients", "python")],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


COMMAND = "`make bench-any` (`python3 bench/anylang.py`; `--only rivals` runs this section alone)"


def section(results, command=COMMAND):
    def paragraph(text):
        return textwrap.fill(text, 96, break_on_hyphens=False).splitlines() + [""]

    served = ("`respawn.serve_wsgi(wsgi)`" if results["python serves with"] == "serve_wsgi"
              else "a `BaseHTTPRequestHandler` calling it, through `respawn.serve` (this client has no `serve_wsgi`)")
    lines = [TITLE, ""]
    lines += paragraph(
        f"Measured on {time.strftime('%Y-%m-%d')} by {command}, one run of each scenario; the machine's "
        f"load average was {results['load average']:.1f} at the end ({os.cpu_count()} cores). The same "
        "application runs under each pair, so that only the supervisor differs: bench/rivals/app.js under "
        f"`respawn --workers 2 -- node app.js --respawn` (the Node client) and under PM2's cluster mode "
        f"(`pm2 start app.js -i 2`, {results['pm2']}); bench/rivals/app.py, a WSGI application, under "
        f"`respawn --workers 2 -- python3 app.py` ({served}) and under `gunicorn --workers 2` (sync "
        f"workers, {results['gunicorn']}). PM2 and gunicorn are installed from their registries into a "
        "temporary directory for the run. Every supervisor has its defaults: respawn's crash-loop guard, "
        "PM2's `min_uptime` 1 s and `max_restarts` 16, gunicorn's own.")
    lines += paragraph(
        f"*Storms*: {CLIENTS} clients send GET / for {STORM_SECONDS} s, each request on a new connection "
        f"with a {TIMEOUT:.0f} s deadline, while a crash route is requested on its own connection: for "
        "Node a throw four times a second, in turn in the handler, after an await, in a timer and in a "
        "promise nobody awaits, then `process.exit(1)` twice a second; for Python `raise` (which "
        "gunicorn answers 500 itself: no worker dies) and `os._exit(1)`. *Failed* counts the GET / "
        "refused, reset, closed without an answer, past the deadline, or answered other than 200. *Gave "
        "up*: respawn's master or gunicorn's arbiter exited, or PM2 marked an instance errored. *Reload*: "
        "HUP to respawn or gunicorn, `pm2 reload` to PM2, 2 s into the same load; the time until every "
        "worker is new (the supervisor's children, in /proc). *Keep-alive*: `wrk -t2 -c4` on / for "
        f"{STORM_SECONDS} s, its 4 connections kept alive where the server keeps them (respawn's Python "
        "worker and gunicorn's sync workers close each one), while a throw comes 10 times a second; "
        "*failed* is wrk's socket errors (a refused connect, a read or write on a reset connection, each "
        "retried at once, so that one closed port counts thousands) and its non-2xx answers, its share "
        "taken of the attempts (answers and socket errors). "
        "*Memory*: Pss after 100 requests and 2 s idle, the mean of the 2 workers, and the process that "
        "keeps them (respawn's master, PM2's daemon, gunicorn's arbiter).")
    for column, why in results["missing"].items():
        lines += paragraph(f"**{column}: not measured**: {why}.")
    names = list(results["columns"])
    lines += ["| scenario | figure | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for scenario, _ in SCENARIOS:
        keys = []
        for name in names:
            for k in results["columns"][name].get(scenario) or {}:
                if k not in keys:
                    keys.append(k)
        for k in keys:
            lines.append(f"| {scenario} | {k} | "
                         + " | ".join(fmt((results["columns"][n].get(scenario) or {}).get(k)) for n in names)
                         + " |")
    lines.append("")
    return "\n".join(lines).rstrip() + "\n"
