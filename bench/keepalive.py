#!/usr/bin/env python3
"""Keep-alive clients beside crashes and rolling restarts, for the Node
client (clients/node/respawn.js): what fraction of their requests fail.

    python3 bench/keepalive.py [--app plain|express] [--seconds 10] [--runs 3]
        [--crashes 10] [--only crashes|hups] [--client respawn.js] [--respawn BIN]

Four keep-alive connections (wrk -t2 -c4 --timeout 10s) send GET / back to
back to `respawn --workers 2 -- node APP` while, in the first scenario,
another client requests /crash on a connection of its own --crashes times a
second, each on a thread of its own whatever the answers' latency (an
uncaught exception each: the worker sends Suicide, stops, and leaves) and,
in the second, the master is sent three HUPs (each a rolling restart of
both workers, waited for). A failure is what wrk counts as one: a socket
error (a connection reset, or closed with the request unanswered; a wait
over 10 s) or an answer other than 2xx. The /crash requests are not
counted. --client runs another respawn.js (an older one, to compare).

APP is written to a temporary directory: `plain` is a node:http server,
`express` the same routes on Express (`npm install express` into that
directory, from the registry). Its answers keep the connection alive, as
every framework's do. Prints the figures; writes no document.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402
from run import ROOT, STARTED, System, Wrk, get, progress  # noqa: E402

CLIENT = os.path.join(ROOT, "clients", "node", "respawn.js")
EXPRESS = "express@5.3.0"

PLAIN_APP = """
const http = require('node:http');
const respawn = require(%(client)r);
const server = http.createServer((req, res) => {
  if (req.url === '/crash') throw new Error('crash requested');
  res.end(`handle by child ${process.pid}\\n`);
});
respawn.serve(server);
"""

# Express answers a throw in a route with its own 500: the crash must
# escape it, as a throw in a timer callback does.
EXPRESS_APP = """
const http = require('node:http');
const express = require('express');
const respawn = require(%(client)r);
const app = express();
app.get('/', (req, res) => res.send(`handle by child ${process.pid}\\n`));
app.get('/crash', () => setTimeout(() => { throw new Error('crash requested'); }));
respawn.serve(http.createServer(app));
"""


def write_app(directory, kind, client):
    text = (PLAIN_APP if kind == "plain" else EXPRESS_APP) % {"client": client}
    path = os.path.join(directory, "app.js")
    with open(path, "w") as f:
        f.write(text)
    if kind == "express":
        progress(f"installing {EXPRESS} from the registry")
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", EXPRESS],
                       cwd=directory, check=True)
    return path


def system(app, respawn):
    return System("respawn -- node", [respawn], {"RUST_LOG": "info", "RUST_LOG_STYLE": "never"},
                  ["--timeout", "0"], command=["--", shutil.which("node"), app])


def keepalive_load(server, seconds):
    load = subprocess.Popen(["wrk", "-t2", "-c4", f"-d{seconds}s", "--timeout", "10s", server.url()],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    STARTED.append(Wrk(load))
    return load


def figures(load, seconds):
    """wrk's answers, and its failures: socket errors (each a request sent
    and never answered, or a connection refused) and non-2xx answers (which
    wrk also counts among its requests)."""
    out = load.communicate(timeout=seconds + 30)[0]
    answered = int(m.group(1)) if (m := re.search(r"(\d+) requests in", out)) else 0
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in socket.groups()) if socket else 0
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return {"sent": answered + errors, "failed": errors + non2xx,
            "socket errors": socket.group(0) if socket else "none", "non-2xx": non2xx}


def crashes(sys_, seconds, every):
    """Keep-alive load beside a /crash every `every` seconds."""
    server = sys_.start(2)
    try:
        server.ready(2)
        load = keepalive_load(server, seconds)
        # Each on a thread of its own: ten a second whatever the answers'
        # latency (a worker starting, one busy with the keep-alive load).
        answered = []

        def crash():
            try:
                answered.append(get(server.port, "/crash", timeout=15))
            except OSError:
                answered.append(None)

        threads, end = [], time.monotonic() + seconds - 0.5
        while time.monotonic() < end:
            threads.append(threading.Thread(target=crash, daemon=True))
            threads[-1].start()
            time.sleep(every)
        result = figures(load, seconds)
        for thread in threads:
            thread.join(timeout=20)
        result["crashes"] = f"{len(threads)} sent, {answered.count(500)} answered 500"
        return result
    finally:
        server.stop()


def hups(sys_, seconds, count=3):
    """Keep-alive load across `count` rolling restarts (HUP), each waited for."""
    server = sys_.start(2)
    try:
        server.ready(2)
        load = keepalive_load(server, seconds)
        for n in range(count):
            time.sleep(seconds / (count + 1))
            start = len(server.log())
            os.kill(server.pid, signal.SIGHUP)
            server.wait_for(lambda l: "rolling restart done" in l, f"HUP {n + 1} done", start)
        result = figures(load, seconds)
        result["hups"] = count
        return result
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", choices=["plain", "express"], default="plain")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--crashes", type=float, default=10.0, help="crashes a second (10)")
    parser.add_argument("--only", choices=["crashes", "hups"], help="one scenario")
    parser.add_argument("--respawn", default=run.RESPAWN, help="the binary (default: the release build)")
    parser.add_argument("--client", default=CLIENT, help="respawn.js to try (default: clients/node's)")
    args = parser.parse_args()
    for tool in ["wrk", "node"] + (["npm"] if args.app == "express" else []):
        if not shutil.which(tool):
            sys.exit(f"keepalive: {tool} is missing")
    with tempfile.TemporaryDirectory(prefix="respawn-keepalive-") as directory:
        sys_ = system(write_app(directory, args.app, os.path.abspath(args.client)), args.respawn)
        storm = lambda sys_, seconds: crashes(sys_, seconds, 1.0 / args.crashes)  # noqa: E731
        scenarios = [("crashes", f"crashes {args.crashes:g}/s", storm), ("hups", "3 HUPs", hups)]
        for name, scenario in [(n, f) for key, n, f in scenarios if args.only in (None, key)]:
            rates = []
            for r in range(args.runs):
                progress(f"{name}, run {r + 1} of {args.runs}")
                result = scenario(sys_, args.seconds)
                rate = 100.0 * result["failed"] / max(1, result["sent"])
                rates.append(rate)
                print(f"{args.app} {name}: {result} -> {rate:.3f}% failed", flush=True)
            print(f"{args.app} {name}: median {statistics.median(rates):.3f}% failed "
                  f"(runs: {', '.join(f'{r:.3f}%' for r in rates)})", flush=True)


if __name__ == "__main__":
    main()
