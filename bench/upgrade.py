#!/usr/bin/env python3
"""The upgrade under load (USR2), and beside it a plain stop-and-start.

    python3 bench/upgrade.py [--runs 5] [--clients 8] [--threads 1] [--ports LOW-HIGH]
                             [--out FILE | --update-docs | --print]

Writes its section ("Upgrade under load (USR2) and a plain restart") to
target/bench/upgrade.md, so that a run leaves the tree as it was;
`--update-docs` writes it into docs/benchmarks.md instead, in place,
leaving the rest of the file as make bench wrote it (make bench-upgrade
UPDATE_DOCS=1); `--out FILE` into FILE (in place of the section, if FILE
has one); `--print` prints it. make bench (bench/run.py) writes the same
section, from the same `section` function, beside the other figures of
its run. The masters listen on free ports the kernel picks, or on the
free ones of `--ports LOW-HIGH` (make bench-upgrade PORTS=20000-20099).

Each run deploys the release binary at a path of its own (a hard link, as
tests/tests/upgrade.rs does), starts `respawn --workers 4` from it, and
puts it under load: client processes send `GET /version` in a loop, each
request on a new connection, and record its start, end and outcome (the
old answer, the new one, or what went wrong: refused, reset, timeout...).
Then a new build is deployed the way a deploy does it: a wrapper script
that runs the same binary with RESPAWN_DEMO_TAG=v2 is renamed over the
path, so that `/version` answers `respawn 0.1.0 v2`. Then, under the same
load:

- upgrade: USR2 to the master; the load goes on until the master has logged
  `master re-executed as PATH (pid N kept)` and one more second has passed.
- plain restart: TERM to the master, wait for it to exit, start a new one
  from the path on the same port at once, as a restart script (or systemd
  without socket activation) does; the load goes on until every new worker
  is ready and one more second has passed.

All times are CLOCK_MONOTONIC, which the client processes share with this
one. Every process started here is in a session of its own and is killed
at the end, however the run ends; the client processes also stop when the
pipe to their stdin closes, so they cannot outlive this one.
"""

import argparse
import datetime
import errno
import gc
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

# make bench's harness beside this file: its server handle (process group,
# log read as it comes, stopped on exit) and its helpers, not copies.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import PATIENCE, RESPAWN, ROOT, STARTED, Running, free_port, progress, wait_until  # noqa: E402

# Where the section goes unless --update-docs or --out says otherwise:
# beside the binary measured, so that a run leaves the tree as it was.
RESULTS = os.path.join(ROOT, "target", "bench", "upgrade.md")
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")

TITLE = "## Upgrade under load (USR2) and a plain restart"
WORKERS = 4
# Client processes of one thread each: threads of one process would wait
# for each other's turn with the GIL, and the wait would count as latency.
CLIENTS = 8
THREADS = 1  # each with one request at a time
WARM_UP = 2.0  # seconds of load before the signal: the "before" latencies
AFTER = 1.0  # seconds of load after the upgrade or restart is done
RETRY = 0.001  # a client waits this long after a failed request
TIMEOUT = 5.0  # seconds a request may take before it counts as a timeout
TAG = "v2"
ENV = {"RUST_LOG": "info", "RUST_LOG_STYLE": "never"}

# ---------------------------------------------------------------- clients

REQUEST = b"GET /version HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def request(port, old, new):
    """One GET /version on a new connection: 'old', 'new', or what went
    wrong, as one word."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(("127.0.0.1", port))
            s.sendall(REQUEST)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as err:
        return errno.errorcode.get(err.errno, "oserror").lower()
    if not data:
        return "closed-without-answer"
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        return "status-" + head[9:12].decode(errors="replace")
    body = body.decode(errors="replace").strip()
    return {old: "old", new: "new"}.get(body, "unexpected-body")


def client(port, threads, old, new):
    """A client process: `threads` threads in a request loop until stdin
    says stop (or closes); then one line per request on stdout: start, end,
    outcome."""
    # The loop makes no reference cycles; a collection would only stop
    # every thread at once, a few ms each time the records grow.
    gc.disable()
    done = threading.Event()
    records = [[] for _ in range(threads)]

    def loop(mine):
        while not done.is_set():
            start = time.monotonic()
            outcome = request(port, old, new)
            mine.append((start, time.monotonic(), outcome))
            if outcome not in ("old", "new"):
                time.sleep(RETRY)  # not a busy loop of refusals

    pool = [threading.Thread(target=loop, args=(r,)) for r in records]
    for t in pool:
        t.start()
    sys.stdin.readline()
    done.set()
    for t in pool:
        t.join()
    out = sys.stdout
    for mine in records:
        out.writelines(f"{a:.6f} {b:.6f} {o}\n" for a, b, o in mine)
    out.flush()


class Load:
    """`clients` client processes of `threads` threads against `port`;
    `stop` returns every request as (start, end, outcome), sorted by end."""

    def __init__(self, port, old, new, clients, threads):
        self.began = time.monotonic()
        self.procs = [
            subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client", str(port), str(threads),
                              old, new], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
            for _ in range(clients)
        ]
        self.records = []
        STARTED.append(self)

    def stop(self):
        if self not in STARTED:
            return self.records  # stopped already
        STARTED.remove(self)
        self.ended = time.monotonic()
        for p in self.procs:
            try:
                p.stdin.write("stop\n")
                p.stdin.flush()  # communicate closes it
            except BrokenPipeError:
                pass
        records = []
        for p in self.procs:
            try:
                out, _ = p.communicate(timeout=TIMEOUT + PATIENCE)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            for line in out.splitlines():
                a, b, outcome = line.split(" ", 2)
                records.append((float(a), float(b), outcome))
        records.sort(key=lambda r: r[1])
        self.records = records
        return records


# ---------------------------------------------------------------- deploys


class Deploy:
    """A directory holding the program respawn is started from: at first a
    hard link to the release binary, then a new build renamed over it."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="respawn-bench-upgrade-")
        self.path = os.path.join(self.dir, "respawn")
        try:
            os.link(RESPAWN, self.path)
        except OSError:
            shutil.copy2(RESPAWN, self.path)

    def new_build(self, tag):
        """The same binary, tagged: what `/version` calls a new build.
        Renamed into place, as a deploy does."""
        staged = self.path + ".new"
        with open(staged, "w") as f:
            f.write(f"#!/bin/sh\nRESPAWN_DEMO_TAG={tag} exec '{RESPAWN}' \"$@\"\n")
        os.chmod(staged, 0o755)
        os.rename(staged, self.path)

    def start(self, port):
        return Running([self.path, "--workers", str(WORKERS), "--listen", f"127.0.0.1:{port}"],
                       dict(os.environ, **ENV))

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def version():
    out = subprocess.run([RESPAWN, "--version"], capture_output=True, text=True, timeout=PATIENCE).stdout
    return out.strip()


def log_line(server, what, matches, mark=0):
    """The arrival time of the first log line from index `mark` on that
    `matches`."""
    if not wait_until(lambda: any(matches(l) for _, l in server.log()[mark:])):
        raise RuntimeError(f"no log line for {what} within {PATIENCE} s")
    return next(t for t, l in server.log()[mark:] if matches(l))


def last_ready(server):
    """The arrival time of the last `worker PID ready` line: all ready."""
    return max(t for t, l in server.log() if re.search(r"worker \d+ ready$", l))


# ---------------------------------------------------------------- figures


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def longest_gap(records, since, until):
    """The longest time between two answers (of either build) within
    [since, until]: how long the clients, all together, got nothing."""
    ends = [since] + [b for _, b, o in records if o in ("old", "new") and since <= b <= until] + [until]
    return max(b - a for a, b in zip(ends, ends[1:]))


def common(records, load, signalled, done):
    """The figures both scenarios report. The window is from the signal to
    `done` (the master re-executed, or the new master's workers ready); a
    request is in it if it was under way at any moment of it."""
    failures = {}
    for _, _, o in records:
        if o not in ("old", "new"):
            failures[o] = failures.get(o, 0) + 1
    inside = [b - a for a, b, _ in records if b >= signalled and a <= done]
    # The first half second is left out: the client processes are still
    # starting, and their startup slows the first requests.
    settled = load.began + 0.5
    outside = sorted(b - a for a, b, o in records if a > settled and (b < signalled or a > done))
    old_ends = [b for _, b, o in records if o == "old"]
    new_ends = [b for _, b, o in records if o == "new"]
    return {
        "requests": len(records),
        "rate": len(records) / (load.ended - load.began),
        "failed": sum(failures.values()),
        "failures": failures,
        "done": done - signalled,
        "last old": (max(old_ends) - signalled) if old_ends else None,
        "first new": (min(new_ends) - signalled) if new_ends else None,
        "longest in window": max(inside) if inside else None,
        "median outside": statistics.median(outside) if outside else None,
        "p99 outside": percentile(outside, 0.99),
        "max outside": outside[-1] if outside else None,
        "gap": longest_gap(records, signalled - 0.5, done + AFTER / 2),
        "gap before": longest_gap(records, settled, signalled - 0.5),
    }


# ---------------------------------------------------------------- ports

# The ports the masters listen on: any free one the kernel picks, unless
# --ports gives a range (a firewall that opens a few, or other servers to
# keep clear of). bench/anylang.py takes it too.
PORTS = None
_next_port = 0


def port_range(text):
    """--ports LOW-HIGH, as a range of ports."""
    try:
        low, high = (int(part) for part in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW-HIGH (20000-20099)") from None
    if not 1 <= low <= high <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 1 to 65535, the lower first")
    return range(low, high + 1)


def pick_port():
    """A port nothing is bound to: the next free one of PORTS in turn, or
    any free one if PORTS is None."""
    global _next_port
    if PORTS is None:
        return free_port()
    for _ in range(len(PORTS)):
        port = PORTS[_next_port % len(PORTS)]
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken, or in TIME_WAIT: the next one
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def upgrade_run(old, new, clients, threads):
    """USR2 under load: the clients must see no failure."""
    deploy = Deploy()
    server = load = None
    try:
        server = deploy.start(pick_port())
        server.ready(WORKERS)
        load = Load(server.port, old, new, clients, threads)
        time.sleep(WARM_UP)  # load before the signal, to compare latencies with
        deploy.new_build(TAG)
        mark = len(server.log())
        signalled = time.monotonic()
        os.kill(server.pid, signal.SIGUSR2)
        reexecuted = log_line(server, "the master re-executing", lambda l: "master re-executed as " in l, mark)
        time.sleep(AFTER)
        records = load.stop()
        return common(records, load, signalled, reexecuted)
    finally:
        if load:
            load.stop()
        if server:
            server.stop()
        deploy.remove()


def restart_run(old, new, clients, threads):
    """TERM, wait for the master to exit, start a new one on the same port
    at once: the clients see the gap between the two."""
    deploy = Deploy()
    server = load = None
    try:
        port = pick_port()
        server = deploy.start(port)
        server.ready(WORKERS)
        load = Load(port, old, new, clients, threads)
        time.sleep(WARM_UP)
        deploy.new_build(TAG)
        signalled = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        server.proc.wait(timeout=PATIENCE)
        exited = time.monotonic()
        server.stop()  # the rest of its group, if anything is left
        server = deploy.start(port)  # returns once it said where it listens
        listening = log_line(server, "its address", lambda l: "listening on " in l)
        server.ready(WORKERS)
        ready = last_ready(server)
        time.sleep(AFTER)
        records = load.stop()
        figures = common(records, load, signalled, ready)
        figures["old master gone"] = exited - signalled
        figures["new master listening"] = listening - signalled
        return figures
    finally:
        if load:
            load.stop()
        if server:
            server.stop()
        deploy.remove()


def measure(runs=5, clients=CLIENTS, threads=THREADS):
    """Both scenarios, `runs` times each, in turn: {"upgrade": [figures],
    "restart": [figures], "old": ..., "new": ..., ...}."""
    if not os.access(RESPAWN, os.X_OK):
        raise RuntimeError(f"no binary at {RESPAWN}: run `cargo build --release -p respawn-master "
                           "--features demo --bin respawn` (make bench-upgrade does)")
    old = version()
    new = f"{old} {TAG}"
    load_average = os.getloadavg()[0]
    results = {"load average": load_average, "upgrade": [], "restart": [], "old": old, "new": new, "errors": [],
               "clients": clients, "threads": threads}
    for run in range(runs):
        for name, scenario in (("upgrade", upgrade_run), ("restart", restart_run)):
            progress(f"upgrade: {name}, run {run + 1} of {runs}")
            try:
                results[name].append(scenario(old, new, clients, threads))
            except Exception as err:  # a failed run is reported, not fatal
                progress(f"upgrade: {name} run {run + 1} failed: {err}")
                results["errors"].append(f"{name} run {run + 1}: {err}")
    return results


# ---------------------------------------------------------------- report


def ms(seconds):
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.1f}" if seconds < 0.1 else f"{seconds * 1000:,.0f}"


def outcomes(failures):
    return ", ".join(f"{n:,} {kind}" for kind, n in sorted(failures.items(), key=lambda kv: -kv[1])) or "none"


def spread(values):
    """min / median / max, in ms."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{ms(min(values))} / {ms(statistics.median(values))} / {ms(max(values))}"


ALONE = "`make bench-upgrade UPDATE_DOCS=1` (`python3 bench/upgrade.py --update-docs`), which rewrites this section alone"


def section(results, command=ALONE):
    """The markdown section, from the figures `measure` returned; `command`
    says what measured them."""
    up, re_ = results["upgrade"], results["restart"]
    def paragraph(text):
        return textwrap.fill(text, 96, break_on_hyphens=False).splitlines() + [""]

    lines = [TITLE, ""]
    lines += paragraph(
        f"Measured on {datetime.date.today().isoformat()} by {command}; the machine's load average was "
        f"{results['load average']:.1f} when it began ({os.cpu_count()} cores: others' work adds to the "
        f"latencies). `respawn --workers {WORKERS}` on 127.0.0.1, started from a hard link to the release "
        f"binary. {results['clients']} client processes ({results['threads']} thread"
        f"{'s' if results['threads'] != 1 else ''} each) send `GET /version` "
        "in a loop, each request on a new connection, and record its start, end and outcome; after a "
        f"failure a client waits {RETRY * 1000:.0f} ms before the next request. After {WARM_UP:.0f} s of "
        "load a new build is renamed over the path (a script running the same binary with "
        f"`RESPAWN_DEMO_TAG={TAG}`, so that `/version` answers `{results['new']}` instead of "
        f"`{results['old']}`), then:")
    lines += [
        "- **upgrade**: USR2 to the master; the load goes on until the master logs",
        f"  `master re-executed as PATH (pid N kept)`, and {AFTER:.0f} s more.",
        "- **plain restart**: TERM to the master, wait for it to exit, then start a new one from the",
        "  path on the same port at once, as a restart script or systemd without socket activation",
        f"  does; the load goes on until its {WORKERS} workers are ready, and {AFTER:.0f} s more.",
        "",
    ]
    lines += paragraph(
        "The window is from the signal to the re-executed line (upgrade) or to the new workers ready "
        "(restart); a request is in it if it was under way at any moment of it. *Last old answer* is "
        "when the last answer from the old build ended, from the signal: from then on every answer is "
        "new. *Longest gap* is the longest time, from 0.5 s before the signal to 0.5 s after the window, "
        "in which no client got an answer; *before* is the same over the load before that (less its "
        "first 0.5 s, while the clients start). Latencies outside are those of the requests before and "
        "after the window (less the same 0.5 s). A refused connection found no listener (between the "
        "two masters); a reset one was in the old listener's queue when it closed. Times in ms.")
    lines += paragraph(
        "For comparison, issue 10 measured with another client at 10,000 to 12,000 requests/s: nginx's "
        "binary upgrade and gunicorn's USR2 lost no request; a plain restart lost 5 (nginx, 20 ms "
        "without an answer), 179 (gunicorn, 338 ms) and 5 to 7 (respawn before USR2, 12 to 17 ms).")
    if up:
        lines += [
            "| upgrade run | requests | req/s | failed | USR2 → re-executed | USR2 → last old answer | "
            "longest in window | longest gap (before) | outside: median / p99 / max |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for i, f in enumerate(up, 1):
            lines.append(
                f"| {i} | {f['requests']:,} | {f['rate']:,.0f} | {f['failed']} | {ms(f['done'])} | "
                f"{ms(f['last old'])} | {ms(f['longest in window'])} | {ms(f['gap'])} ({ms(f['gap before'])}) | "
                f"{ms(f['median outside'])} / {ms(f['p99 outside'])} / {ms(f['max outside'])} |"
            )
        lines.append("")
    if re_:
        lines += [
            "| restart run | requests | req/s | failed | TERM → old master gone | "
            "TERM → new one listening | TERM → first new answer | longest gap (before) | longest in window |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for i, f in enumerate(re_, 1):
            lines.append(
                f"| {i} | {f['requests']:,} | {f['rate']:,.0f} | {f['failed']:,} ({outcomes(f['failures'])}) | "
                f"{ms(f['old master gone'])} | "
                f"{ms(f['new master listening'])} | {ms(f['first new'])} | {ms(f['gap'])} ({ms(f['gap before'])}) | "
                f"{ms(f['longest in window'])} |"
            )
        lines.append("")
    if up or re_:
        lines += ["| figure (min / median / max) | upgrade (USR2) | plain restart |", "|---|---|---|"]
        lines.append(f"| failed requests | {count_spread(up, 'failed')} | {count_spread(re_, 'failed')} |")
        lines.append(f"| failures, all runs | {outcomes(total_failures(up))} | {outcomes(total_failures(re_))} |")
        lines.append(f"| longest gap without an answer, ms | {spread(f['gap'] for f in up)} | "
                     f"{spread(f['gap'] for f in re_)} |")
        lines.append(f"| same, before the signal, ms | {spread(f['gap before'] for f in up)} | "
                     f"{spread(f['gap before'] for f in re_)} |")
        lines.append(f"| signal → last old answer, ms (every answer new from then on) | "
                     f"{spread(f['last old'] for f in up)} | {spread(f['last old'] for f in re_)} |")
        lines.append(f"| signal → first new answer, ms | {spread(f['first new'] for f in up)} | "
                     f"{spread(f['first new'] for f in re_)} |")
        lines.append(f"| longest request in the window, ms | {spread(f['longest in window'] for f in up)} | "
                     f"{spread(f['longest in window'] for f in re_)} |")
        lines.append(f"| longest request outside the window, ms | {spread(f['max outside'] for f in up)} | "
                     f"{spread(f['max outside'] for f in re_)} |")
        lines.append(f"| p99 outside the window, ms | {spread(f['p99 outside'] for f in up)} | "
                     f"{spread(f['p99 outside'] for f in re_)} |")
        lines.append(f"| client rate, req/s | {rate_spread(up)} | {rate_spread(re_)} |")
        lines.append("")
    for err in results["errors"]:
        lines.append(f"**A run failed**: {err}")
    if results["errors"]:
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def count_spread(runs, key):
    values = [f[key] for f in runs]
    if not values:
        return "n/a"
    return f"{min(values):,} / {statistics.median(values):,.0f} / {max(values):,}"


def rate_spread(runs):
    values = [f["rate"] for f in runs]
    if not values:
        return "n/a"
    return f"{min(values):,.0f} / {statistics.median(values):,.0f} / {max(values):,.0f}"


def total_failures(runs):
    total = {}
    for f in runs:
        for kind, n in f["failures"].items():
            total[kind] = total.get(kind, 0) + n
    return total


def write_section(path, text, title=TITLE):
    """Puts `text` in place of the section titled `title` in the file at
    `path`, or, if there is none yet, before the notes on method (## How
    each figure is taken), where make bench puts it; the rest is kept.
    bench/anylang.py writes its section with it too. A file that is not
    there yet is made, holding the section alone."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return
    with open(path) as f:
        doc = f.read()
    if title + "\n" in doc:
        start = doc.index(title + "\n")
        end = doc.find("\n## ", start + len(title))
        end = len(doc) if end < 0 else end + 1
    else:
        start = end = doc.find("## How each figure is taken")
        if start < 0:
            start = end = len(doc)
    with open(path, "w") as f:
        f.write(doc[:start] + text + ("\n" if end < len(doc) else "") + doc[end:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each scenario")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=RESULTS,
                       help="the file to write the section to, in place of its own if it has one "
                            "(default: target/bench/upgrade.md)")
    where.add_argument("--update-docs", action="store_true",
                       help="write the section into docs/benchmarks.md, in place")
    where.add_argument("--print", action="store_true", help="print the section; write nothing")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="client processes")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads in each client process")
    parser.add_argument("--ports", type=port_range, metavar="LOW-HIGH",
                        help="listen on free ports of this range (default: any free port)")
    parser.add_argument("--client", nargs=4, metavar=("PORT", "THREADS", "OLD", "NEW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        port, threads, old, new = args.client
        client(int(port), int(threads), old, new)
        return 0
    global PORTS
    PORTS = args.ports
    if args.update_docs:
        args.out = DOCS
    try:
        results = measure(args.runs, args.clients, args.threads)
    except RuntimeError as err:
        sys.exit(f"upgrade: {err}")
    text = section(results)
    if args.print:
        sys.stdout.write(text)
    else:
        write_section(args.out, text)
        progress(f"upgrade: wrote its section of {args.out}")
    failed = sum(f["failed"] for f in results["upgrade"])
    return 1 if failed or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
