#!/usr/bin/env python3
"""make bench: what a supervisor is for, measured for respawn and for a
Node.js cluster server (bench/baseline/server.js), in one run.

    python3 bench/run.py [--runs 3] [--only NAME[,NAME]] [--out docs/benchmarks.md]

--only takes scenario names ("start", "herd", "idle cost", ...; --list
prints them) and writes only those rows, to --out: point it elsewhere
(--out /tmp/b.md) to try one measurement without touching the docs.

Each scenario runs --runs times per system; the table holds medians. Every
process started here is in a process group of its own and is killed at the
end of its scenario, whatever happens; every wait has a deadline. All
traffic goes to 127.0.0.1. Needs wrk (make bench installs it), node for the
baseline column (without it the column says so), and a release build of
respawn (make bench builds it).
"""

import argparse
import atexit
import calendar
import math
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESPAWN = os.path.join(ROOT, "target", "release", "respawn")
BASELINE = os.path.join(ROOT, "bench", "baseline", "server.js")
LIMIT_SRC = os.path.join(ROOT, "bench", "fork_limit.c")
LIMIT = os.path.join(ROOT, "target", "release", "fork_limit")
PATIENCE = 30.0  # seconds any one wait may take

# Everything started here, so that an error, Ctrl-C or a TERM leaves nothing.
STARTED = []


def stop_everything(*_):
    for thing in list(STARTED):
        thing.stop()


def exit_on_signal(signum, _frame):
    raise SystemExit(f"bench: stopped by signal {signum}")


atexit.register(stop_everything)
signal.signal(signal.SIGTERM, exit_on_signal)


def progress(text):
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_until(condition, limit=PATIENCE, step=0.002):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


# ---------------------------------------------------------------- /proc


def stat(pid):
    """(state, ppid, utime+stime) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[11]) + int(fields[12])


def children(parent):
    """{pid: state} of the children of parent."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = stat(int(name))
            if s and s[1] == parent:
                found[int(name)] = s[0]
    return found


def live_children(parent):
    return sorted(pid for pid, state in children(parent).items() if state != "Z")


def status_field(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def context_switches(pid):
    return status_field(pid, "voluntary_ctxt_switches") + status_field(pid, "nonvoluntary_ctxt_switches")


def private_kib(pid):
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def pss_kib(pid):
    """Proportional set size: each page the process maps, divided by the
    number of processes that map it. Unlike VmRSS it does not charge one
    process the whole of libc, which every process on the host shares."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def memory_parts(pid):
    """The master's PSS in kB by what holds it, from /proc/PID/smaps: its
    binary (text, read-only data, data), and of that the part only this
    process maps (Private_Clean: pages no worker touched, such as the code
    only the master runs); its heap, its stack, the shared libraries (libc,
    libgcc_s, ld.so, vdso), other anonymous memory, and the scoreboard; and
    apart, its private dirty memory: what only it wrote, the part of its
    private memory that no page cache holds (heap, stack, data)."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    parts = {"binary": 0, "binary, only the master's": 0, "heap": 0, "stack": 0,
             "libraries": 0, "other anonymous": 0, "scoreboard": 0, "private dirty": 0}
    where = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
                name = " ".join(fields[5:])
                if name == exe:
                    where = "binary"
                elif name == "[heap]":
                    where = "heap"
                elif name == "[stack]":
                    where = "stack"
                elif "scoreboard" in name:
                    where = "scoreboard"
                elif name.startswith("/") or name in ("[vdso]", "[vvar]"):
                    where = "libraries"
                else:
                    where = "other anonymous"
            elif fields[0] == "Pss:":
                parts[where] += int(fields[1])
            elif fields[0] == "Private_Clean:" and where == "binary":
                parts["binary, only the master's"] += int(fields[1])
            elif fields[0] == "Private_Dirty:":
                parts["private dirty"] += int(fields[1])
    return parts


def socket_inodes(pid):
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def tcp_states():
    """{inode: (state, local port)} of every TCP socket on the host."""
    states = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    states[parts[9]] = (parts[3], int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return states


def unix_inodes():
    with open("/proc/net/unix") as f:
        next(f)
        return {line.split()[6] for line in f if len(line.split()) > 6}


def held_connections(pid, listener):
    """Connections process pid holds now: its socket fds, less the listener
    and unix sockets (Node's channel to its primary). The fds are read first
    and at once; a connection that closes while the rest is read still
    counts, as it was held at that moment."""
    held = socket_inodes(pid) - {listener}
    return len(held - unix_inodes())


# ---------------------------------------------------------------- systems


class Running:
    """A started server: its process group, its log, its port."""

    def __init__(self, argv, env):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
                                     start_new_session=True)
        self.pid = self.proc.pid
        STARTED.append(self)
        self.lines = []  # (monotonic time, line)
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(lambda l: "listening on " in l, "its address")
        self.port = int(re.search(r":(\d+)\s*$", line).group(1))

    def _read(self):
        for line in self.proc.stderr:
            with self.lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    def log(self):
        with self.lock:
            return list(self.lines)

    def wait_for(self, matches, what, start=0):
        found = []

        def seen():
            found[:] = [(t, l) for t, l in self.log()[start:] if matches(l)]
            return bool(found)

        if not wait_until(seen):
            self.stop()
            raise RuntimeError(f"no log line for {what} within {PATIENCE} s")
        return found[0][1]

    def workers(self):
        return live_children(self.pid)

    def ready(self, n):
        """Waits until n live workers, each of which logged ready."""
        def settled():
            pids = self.workers()
            text = "\n".join(l for _, l in self.log())
            return len(pids) == n and all(f"worker {p} ready" in text for p in pids)
        if not wait_until(settled):
            raise RuntimeError(f"{n} workers never ready (have {len(self.workers())})")
        return self.workers()

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        if self in STARTED:
            STARTED.remove(self)
        stop_group(self.proc)


def stop_group(proc):
    """TERM, then KILL for the whole group: nothing is left running."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class System:
    def __init__(self, name, argv, env=None, extra=(), kill_flags=(), command=()):
        self.name, self.argv, self.env, self.extra = name, argv, env, list(extra)
        # For the scenarios that kill workers on purpose, many times a second.
        self.kill_flags = list(kill_flags)
        # `-- CMD ARGS`, after every flag: the workers' program, if not the demo.
        self.command = list(command)

    def start(self, workers, *flags):
        env = dict(os.environ, **(self.env or {}))
        # A fixed port, not 0: when its last worker dies, Node's cluster
        # closes the listener, and a replacement listening on port 0 would
        # get a new port, so clients of the old one are refused for good.
        return Running(self.argv + ["--workers", str(workers), "--listen", f"127.0.0.1:{free_port()}"]
                       + self.extra + list(flags) + self.command, env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def respawn_system():
    # --timeout 0: the idle figure is about the master's own wakeups.
    # Killing workers every few milliseconds is what the crash-loop guard is
    # for: these scenarios measure the respawn path itself, so they turn the
    # guard off. With --min-uptime 0 every worker that said Ready dies
    # mature: no backoff, and no count toward giving up. The report says so.
    return System("respawn", [RESPAWN], {"RUST_LOG": "info", "RUST_LOG_STYLE": "never"},
                  ["--timeout", "0"], ["--min-uptime", "0"])


def baseline_system():
    node = shutil.which("node")
    return System("node cluster", [node, BASELINE]) if node else None


def build_limit():
    """bench/fork_limit.c, the least a prefork supervisor does on its crash
    path, in C: compiled (cc -O2) into target/release when missing or older
    than its source. None without a C compiler: its figures then say n/a."""
    if os.path.exists(LIMIT) and os.path.getmtime(LIMIT) >= os.path.getmtime(LIMIT_SRC):
        return LIMIT
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        progress("no C compiler (cc): the C limit's figures will say n/a")
        return None
    os.makedirs(os.path.dirname(LIMIT), exist_ok=True)
    subprocess.run([cc, "-O2", "-o", LIMIT, LIMIT_SRC], check=True)
    return LIMIT


def limit_system():
    path = build_limit()
    return System("C limit", [path]) if path else None


# ---------------------------------------------------------------- HTTP


def get(port, path="/", timeout=5.0, late=0.0):
    """GET on a new connection: the status, or an exception. With `late`,
    the request is sent that many seconds after the connection is made, as
    a client on a real network would."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if late:
            time.sleep(late)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def wrk(url, connections, seconds, *extra):
    """Runs wrk; returns its figures."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", *extra, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    figures = wrk_figures(out)
    figures["rps"], figures["p99_ms"] = 0.0, None
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        figures["rps"] = float(m.group(1))
    if m := re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        figures["p99_ms"] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return figures


# ---------------------------------------------------------------- scenarios


def throughput(system, keepalive):
    server = system.start(2)
    try:
        server.ready(2)
        wrk(server.url(), 64, 1, *([] if keepalive else ["-H", "Connection: close"]))  # warm up
        f = wrk(server.url(), 64, 10, *([] if keepalive else ["-H", "Connection: close"]))
        return {"req/s": f["rps"], "errors": f["errors"], "timeouts": f["timeouts"], "p99 ms": f["p99_ms"]}
    finally:
        server.stop()


def gap_once(server):
    """SIGKILL to the only worker; once it is dead (its pidfd readable), GET
    / on new connections (retrying on refusal or reset) until one is
    answered 200. Returns ms from the kill to that answer."""
    victim = server.ready(1)[0]
    pidfd = os.pidfd_open(victim)
    t0 = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    select.select([pidfd], [], [], PATIENCE)
    os.close(pidfd)
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        try:
            if get(server.port, "/", timeout=2) == 200:
                break
        except OSError:
            time.sleep(0.0005)  # refused or reset: the next try
    return (time.perf_counter() - t0) * 1000


def respawn_gap(system, kills=50):
    """Kill the only worker; once it is dead, GET / on a new connection.
    respawn runs beside the C limit (bench/fork_limit.c: signalfd, waitpid,
    fork, Ready, accept, nothing else), killed in turn, kill for kill, so
    that both meet the same machine: their ratio survives a busy host
    better than either time does."""
    started = [(system, system.start(1, *system.kill_flags))]
    limit = limit_system() if system.name == "respawn" else None
    try:
        if limit:
            started.append((limit, limit.start(1)))
        gaps = {s.name: [] for s, _ in started}
        for _, server in started:
            server.ready(1)
        for _ in range(kills):
            for s, server in started:
                gaps[s.name].append(gap_once(server))
        mine = sorted(gaps[system.name])
        p50 = statistics.median(mine)
        result = {"p50 ms": p50, "p90 ms": mine[int(len(mine) * 0.9) - 1], "max ms": mine[-1]}
        if limit:
            c = statistics.median(gaps[limit.name])
            result.update({"C limit p50 ms": c, "p50 / C limit": p50 / c})
        return result
    finally:
        for _, server in started:
            server.stop()


def storm(system, kind, seconds=15, every=0.25, *flags):
    """wrk -c32 on / while a worker is SIGKILLed (kind 'kill') or /crash is
    requested (kind 'crash') every 250 ms."""
    server = system.start(2, *flags)
    held = 0
    try:
        server.ready(2)
        listener = next(inode for inode, state in tcp_states().items() if state == ("0A", server.port))
        load = subprocess.Popen(["wrk", "-t2", "-c32", f"-d{seconds}s", server.url()],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        STARTED.append(Wrk(load))
        end = time.monotonic() + seconds - 0.5
        time.sleep(0.5)
        rng = random.Random(7)
        while time.monotonic() < end:
            if kind == "kill":
                pids = server.workers()
                if pids:
                    victim = rng.choice(pids)
                    # Stopped first, so that what it holds is what it
                    # holds at the kill: at 20,000 requests a second a
                    # running worker accepts again between the read and
                    # the kill, and that loss was counted as beyond held.
                    try:
                        os.kill(victim, signal.SIGSTOP)
                        # kill(2) returns before the victim stops.
                        wait_until(lambda: (stat(victim) or ("T",))[0] in "Tt", limit=1, step=0.0001)
                        held += held_connections(victim, listener)
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            else:
                try:
                    get(server.port, "/crash", timeout=5)
                except OSError:
                    pass
            time.sleep(every)
        out = load.communicate(timeout=seconds + 30)[0]
        f = wrk_figures(out)
        wait_until(lambda: len(server.workers()) == 2 and not zombies(server), limit=5)
        result = {"errors": f["errors"], "requests": f["requests"], "final count": len(server.workers()),
                  "zombies": len(zombies(server))}
        if kind == "kill":
            result["held at kills"] = held
            # The loss the design allows: what the killed workers held.
            result["errors beyond held"] = max(0, f["errors"] - held)
        return result
    finally:
        server.stop()


class Wrk:
    """A wrk in the background, so that stop_everything can end it."""

    def __init__(self, proc):
        self.proc = proc

    def stop(self):
        if self in STARTED:
            STARTED.remove(self)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wrk_figures(out):
    """Requests, errors (socket errors and non-2xx answers) and timeouts."""
    f = {"errors": 0, "requests": 0, "timeouts": 0}
    if m := re.search(r"(\d+) requests in", out):
        f["requests"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        f["errors"] += sum(int(x) for x in m.groups())
        f["timeouts"] = int(m.group(4))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        f["errors"] += int(m.group(1))
    return f


def zombies(server):
    return [pid for pid, state in children(server.pid).items() if state == "Z"]


def idle_cost(system, workers=8):
    server = system.start(workers)
    try:
        pids = server.ready(workers)
        for _ in range(100):
            get(server.port)
        time.sleep(1)  # let the last request's wakeups settle before the window
        before = context_switches(server.pid)
        time.sleep(10)  # the idle window measured
        after = context_switches(server.pid)
        result = {"master wakeups/s": (after - before) / 10,
                  "master VmRSS MiB": status_field(server.pid, "VmRSS") / 1024,
                  "master PSS MiB": pss_kib(server.pid) / 1024,
                  "master private MiB": private_kib(server.pid) / 1024,
                  "worker PSS MiB": max(pss_kib(w) for w in pids) / 1024,
                  "worker private MiB": max(private_kib(w) for w in pids) / 1024}
        for part, kb in memory_parts(server.pid).items():
            result[f"master kB: {part}" if part == "private dirty" else f"master PSS kB: {part}"] = kb
        return result
    finally:
        server.stop()


def scale(system):
    result = {}
    for n in (256, 2):
        server = system.start(n, *system.kill_flags)
        try:
            server.ready(n)
            victim = server.workers()[0]
            listener = next(inode for inode, state in tcp_states().items() if state == ("0A", server.port))
            mark = len(server.log())
            t0 = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            if system.name == "respawn":
                # The replacement holds the listener from its fork on: look
                # at the fds of each pid the master says it spawned.
                def replaced():
                    spawned = (re.search(r"worker (\d+) spawned", l) for _, l in server.log()[mark:])
                    return any(m and listener in socket_inodes(int(m.group(1))) for m in spawned)
            else:
                # Node's round-robin workers do not hold the listener: its
                # replacement is up when it says so.
                def replaced():
                    return any(" ready" in l for _, l in server.log()[mark:])
            wait_until(replaced, step=0.0002)
            result[f"replace 1 of {n} ms"] = (time.perf_counter() - t0) * 1000
        finally:
            server.stop()
    result["256 / 2"] = result["replace 1 of 256 ms"] / result["replace 1 of 2 ms"]
    return result


READY = re.compile(rb"worker (\d+) ready")
SPAWNED = re.compile(rb"worker \d+ spawned")
# The time a log line was written, as respawn's log (and the C limit's)
# begin: `[2026-12-06T06:39:40.275Z INFO ] ...`, `[...40.275123Z] ...`.
STAMP = re.compile(rb"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")


def stamp(line):
    """Seconds since the epoch at which `line` was logged, by its own
    timestamp; None if it has none."""
    m = STAMP.match(line)
    if not m:
        return None
    whole = calendar.timegm(time.strptime(m.group(1).decode(), "%Y-%m-%dT%H:%M:%S"))
    return whole + float(m.group(2) or 0)


def nofile_limits(workers):
    """The RLIMIT_NOFILE (soft, hard) to give a master of `workers` workers:
    it holds one pipe per worker besides its own few fds (stdio, epoll,
    signalfd, listener), so 2,048 workers need about 2,060. A login shell or
    CI often has a soft limit of 1,024: raise it for the child only, up to
    the hard limit, never lower it. Raising the hard limit takes
    CAP_SYS_RESOURCE, which even root may lack (in a container): then say so."""
    need = workers + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft, hard
    if hard != resource.RLIM_INFINITY and hard < need:
        raise RuntimeError(f"{workers} workers need about {need} fds in the master, and the "
                           f"hard limit (ulimit -Hn) is {hard}: raise it before make bench")
    return need, hard


class Starting:
    """A server started with `workers` workers, its log read in a thread as
    it comes (a pipe left unread would make the master drop its log lines) to
    note when the last spawned line and the last worker's ready line arrive.
    Times are from just before the fork."""

    def __init__(self, system, workers):
        limits = nofile_limits(workers)
        argv = (system.argv + ["--workers", str(workers), "--listen", f"127.0.0.1:{free_port()}"]
                + system.extra)
        self.workers = workers
        self.ready = set()
        self.last_spawned = None
        self.all_ready = None
        # By the log's own timestamps: the first spawned line, the last
        # spawned line, the line of the Nth distinct worker ready.
        self.logged = {"first spawned": None, "last spawned": None, "all ready": None}
        self.tail = []
        self.done = threading.Event()
        self.started = time.monotonic()
        # preexec_fn only calls setrlimit with values computed above: nothing
        # in the child takes a lock that another thread of the harness holds.
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, bufsize=0,
                                     env=dict(os.environ, **(system.env or {})), start_new_session=True,
                                     preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits))
        STARTED.append(self)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        fd, pending = self.proc.stderr.fileno(), b""
        while chunk := os.read(fd, 1 << 16):
            now = time.monotonic()
            *lines, pending = (pending + chunk).split(b"\n")
            if self.done.is_set():
                continue  # drained to the end, so that stopping is never blocked
            self.tail = (self.tail + lines)[-5:]
            for line in lines:
                if SPAWNED.search(line):
                    self.last_spawned = now - self.started
                    if self.logged["first spawned"] is None:
                        self.logged["first spawned"] = stamp(line)
                    self.logged["last spawned"] = stamp(line)
                elif m := READY.search(line):
                    self.ready.add(m.group(1))
                    if len(self.ready) == self.workers:
                        self.all_ready = now - self.started
                        self.logged["all ready"] = stamp(line)
                        self.done.set()
        self.done.set()  # the server ended: the waiter need not wait on

    def logged_times(self):
        """(first spawned → all ready, first spawned → last spawned), in
        seconds, by the log's own timestamps; None where a line had none."""
        first, last, ready = (self.logged[k] for k in ("first spawned", "last spawned", "all ready"))
        if first is None or ready is None:
            return None, None
        return ready - first, (None if last is None else last - first)

    def wait(self, limit=PATIENCE):
        """Seconds from the start to the last worker ready."""
        self.done.wait(limit)
        if self.all_ready is None:
            last = " / ".join(l.decode(errors="replace") for l in self.tail)
            raise RuntimeError(f"{len(self.ready)} of {self.workers} workers ready after "
                               f"{time.monotonic() - self.started:.1f} s; last lines: {last}")
        return self.all_ready

    def stop(self):
        if self in STARTED:
            STARTED.remove(self)
        stop_group(self.proc)


SMALL, BIG = 512, 4096


def start(system, repetitions=3):
    """From the first `spawned` line to the line of the last of N workers
    `ready`, by the master's own log timestamps, for 512 and 4,096 workers,
    taken in turn `repetitions` times; each figure is a median. The C limit
    (bench/fork_limit.c, one pipe per worker as respawn) is started the same
    way in the same run: the kernel's share of what grows with N. The
    baseline starts 256 once (about 12 s), measured from its start, and
    never more: at about 40 MiB a Node worker, 4,096 would take 160 GiB."""
    if system.name != "respawn":
        server = Starting(system, 256)
        try:
            # 256 Node workers take 12 s on an idle machine, twice that
            # when others build on it.
            return {"start 256 s": server.wait(4 * PATIENCE)}
        finally:
            server.stop()
    sizes = (SMALL, BIG)
    try:
        nofile_limits(BIG)
    except RuntimeError as err:
        progress(f"start: {err}; measuring {SMALL} workers only")
        sizes = (SMALL,)
    systems = [system] + [s for s in [limit_system()] if s]
    ready = {(s.name, n): [] for s in systems for n in sizes}
    forked = []
    for _ in range(repetitions):
        for s in systems:
            for n in sizes:
                server = Starting(s, n)
                try:
                    server.wait(4 * PATIENCE)
                    took, forks = server.logged_times()
                    ready[(s.name, n)].append(took)
                    if s is system and n == BIG:
                        forked.append(forks)
                finally:
                    server.stop()

    def median(key):
        values = ready.get(key) or []
        return statistics.median(values) if values and None not in values else None

    small, big = median((system.name, SMALL)), median((system.name, BIG))
    c_small, c_big = median(("C limit", SMALL)), median(("C limit", BIG))
    return {f"start {SMALL} s": small, f"start {BIG} s": big,
            f"{BIG} / {SMALL}": big / small if big and small else None,
            f"{BIG}: last fork s": statistics.median(forked) if forked and None not in forked else None,
            f"C limit {SMALL} s": c_small, f"C limit {BIG} s": c_big,
            f"C limit {BIG} / {SMALL}": c_big / c_small if c_big and c_small else None}


# The baseline's start takes 12 to 40 s: one run of it is enough, and keeps
# make bench within 10 minutes.
start.baseline_runs = 1


LATE = 0.005  # seconds from connect to request in the herd's second figure
LATE_KEY = f"same, request {LATE * 1000:.0f} ms after connect"


def herd(system, requests=200, late=LATE):
    """8 idle workers, sequential requests on new connections: the workers'
    voluntary context switches, summed, per request. First with the request
    sent at once (on loopback it usually lands before the worker is back
    from accept), then sent `late` after the connection is made: a worker
    woken by the connection alone sleeps again in read(2), so that costs two
    wakes a request, unless the listener defers the connection to accept(2)
    until its first bytes arrive (TCP_DEFER_ACCEPT): then one."""
    server = system.start(8)
    try:
        workers = server.ready(8)
        for _ in range(20):
            get(server.port)

        def wakeups(delay):
            before = sum(status_field(w, "voluntary_ctxt_switches") for w in workers)
            for _ in range(requests):
                get(server.port, late=delay)
            after = sum(status_field(w, "voluntary_ctxt_switches") for w in workers)
            return (after - before) / requests

        return {"worker wakeups/request": wakeups(0.0),
                LATE_KEY: wakeups(late)}
    finally:
        server.stop()


SCENARIOS = [
    ("throughput, close", lambda s: throughput(s, keepalive=False)),
    ("throughput, keep-alive client", lambda s: throughput(s, keepalive=True)),
    ("respawn gap", respawn_gap),
    ("kill storm", lambda s: storm(s, "kill", 15, 0.25, *s.kill_flags)),
    ("crash storm", lambda s: storm(s, "crash", 15, 0.25)),
    ("idle cost", idle_cost),
    ("start", start),
    ("scale", scale),
    ("herd", herd),
]

TARGETS = {
    ("throughput, close", "req/s"): ("≥ 2.5× the baseline", lambda r, b: None if b is None else r >= 2.5 * b),
    ("throughput, keep-alive client", "errors"): ("0", lambda r, b: r == 0),
    ("throughput, keep-alive client", "timeouts"): ("0", lambda r, b: r == 0),
    ("respawn gap", "p50 ms"): ("< 1 ms", lambda r, b: r < 1.0),
    ("respawn gap", "p50 / C limit"): ("≤ 2", lambda r, b: r <= 2.0),
    ("kill storm", "final count"): ("exactly 2", lambda r, b: r == 2),
    ("kill storm", "zombies"): ("0", lambda r, b: r == 0),
    ("kill storm", "errors beyond held"): ("0", lambda r, b: r == 0),
    ("crash storm", "errors"): ("0", lambda r, b: r == 0),
    ("crash storm", "final count"): ("exactly 2", lambda r, b: r == 2),
    ("idle cost", "master wakeups/s"): ("0", lambda r, b: r == 0),
    ("idle cost", "master PSS MiB"): ("≤ 0.5 (512 kB)", lambda r, b: r <= 0.5),
    ("idle cost", "master private MiB"): ("≤ 0.125 (128 kB)", lambda r, b: r <= 0.125),
    ("idle cost", "worker private MiB"): ("≤ 0.5", lambda r, b: r <= 0.5),
    ("start", f"start {SMALL} s"): ("< 0.25 s", lambda r, b: r < 0.25),
    ("start", f"{BIG} / {SMALL}"): ("≤ 9 (linear is 8)", lambda r, b: r <= 9.0),
    ("scale", "256 / 2"): ("≤ 2", lambda r, b: r <= 2.0),
    ("herd", "worker wakeups/request"): ("≤ 1.1", lambda r, b: r <= 1.1),
    ("herd", LATE_KEY): ("≤ 1.1 (TCP_DEFER_ACCEPT)", lambda r, b: r <= 1.1),
}


# ---------------------------------------------------------------- report


def medians(runs):
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) if all(r[k] is not None for r in runs) else None
            for k in keys}


def spread(runs):
    """{figure: (lowest, highest)} over the runs, where every run has it."""
    return {k: (min(r[k] for r in runs), max(r[k] for r in runs))
            for k in runs[0] if all(isinstance(r.get(k), (int, float)) for r in runs)}


# respawn's spread over the runs, by scenario: the table's column beside its medians.
SPREADS = {}


def fmt(value):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def version(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"

    return {
        "cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "rustc": version(["rustc", "--version"]),
        "respawn": version([RESPAWN, "--version"]),
        "node": version(["node", "--version"]),
        "wrk": version(["wrk", "-v"]).split(" Copyright")[0] or "wrk",
    }


def write_svg(path, results):
    """Respawn gap (p50, p90) and crash-storm errors, side by side."""
    systems = list(results)
    colours = {"respawn": "#2b6cb0", "node cluster": "#c05621"}
    panels = [
        ("respawn gap: kill the only worker, GET / (ms, log scale)", "respawn gap", ["p50 ms", "p90 ms", "max ms"], True),
        ("crash storm: failed requests to / in 15 s", "crash storm", ["errors"], False),
    ]
    width, height, top, bottom = 920, 340, 60, 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for i, (title, scenario, keys, log) in enumerate(panels):
        x0, pw = 40 + i * (width // 2), width // 2 - 80
        parts.append(f'<text x="{x0}" y="24" font-size="13" font-weight="bold">{title}</text>')
        values = [(s, k, (results[s].get(scenario) or {}).get(k)) for k in keys for s in systems]
        top_value = max([v for _, _, v in values if v] + [1])
        scaled = (lambda v: math.log10(max(v, 0.01)) + 2) if log else (lambda v: v)
        ymax = scaled(top_value) * 1.15 or 1
        plot_h = height - top - bottom
        slot = pw / max(len(values), 1)
        for j, (s, k, v) in enumerate(values):
            x = x0 + j * slot + slot * 0.15
            h = 0 if v is None else max(scaled(v), 0) / ymax * plot_h
            y = height - bottom - h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                         f'fill="{colours.get(s, "#555")}"/>')
            parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{y - 4:.1f}" text-anchor="middle">{fmt(v)}</text>')
            parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{height - bottom + 16:.1f}" '
                         f'text-anchor="middle">{k.replace(" ms", "")}</text>')
        parts.append(f'<line x1="{x0}" y1="{height - bottom}" x2="{x0 + pw}" y2="{height - bottom}" stroke="black"/>')
    for j, s in enumerate(systems):
        parts.append(f'<rect x="{40 + j * 160}" y="{height - 22}" width="12" height="12" fill="{colours.get(s, "#555")}"/>')
        parts.append(f'<text x="{58 + j * 160}" y="{height - 12}">{s}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def write_report(path, info, results, runs, elapsed, missing_baseline, sections=()):
    systems = list(results)
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python3 bench/run.py`); do not edit by hand. Each figure is the",
        f"median of {runs} runs. respawn runs its demo binary (`target/release/respawn --timeout 0`);",
        "the baseline is an idiomatic Node.js cluster server with the same routes",
        "(`bench/baseline/server.js`). All traffic is on 127.0.0.1, and wrk shares the machine's",
        "cores with the servers, so throughput figures are noisy and low. In the scenarios that",
        "kill workers many times a second (respawn gap, kill storm, scale) respawn runs with",
        "`--min-uptime 0`: they measure the respawn path, and its crash-loop guard would otherwise",
        "(rightly) back off. (Deaths after Ready and past the minimum uptime never count toward giving up.)",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), Linux {info['kernel']}. "
        f"{info['rustc']}; {info['respawn']}; node {info['node']}; {info['wrk']}. "
        f"The whole run took {elapsed / 60:.1f} minutes; the machine's load average (1 minute) was "
        f"{info['load at start']:.1f} when it began and {os.getloadavg()[0]:.1f} when it ended (2 cores: "
        "others' work adds to the times, much less to the ratios). The column *respawn, runs* gives the "
        "lowest and the highest of respawn's runs.",
        "",
    ]
    if missing_baseline:
        lines += ["**node was not found**: the baseline column is empty.", ""]
    lines += [
        "| scenario | figure | " + systems[0] + " | respawn, runs | " + " | ".join(systems[1:])
        + " | respawn / baseline | target | holds |",
        "|---|---|" + "---|" * (len(systems) + 1) + "---|---|---|",
    ]
    for scenario, _ in SCENARIOS:
        keys = []
        for s in systems:
            for k in (results[s].get(scenario) or {}):
                if k not in keys:
                    keys.append(k)
        for k in keys:
            values = [(results[s].get(scenario) or {}).get(k) for s in systems]
            r = values[0]
            b = values[1] if len(values) > 1 else None
            ratio = f"{r / b:.2f}" if isinstance(r, (int, float)) and isinstance(b, (int, float)) and b else ""
            target, check = TARGETS.get((scenario, k), ("", None))
            verdict = check(r, b) if check and r is not None else None
            holds = {True: "yes", False: "**no**", None: ""}[verdict]
            low_high = SPREADS.get((systems[0], scenario), {}).get(k)
            runs_text = f"{fmt(low_high[0])} – {fmt(low_high[1])}" if low_high else ""
            lines.append(f"| {scenario} | {k} | {fmt(values[0])} | {runs_text} | "
                         + "".join(f"{fmt(v)} | " for v in values[1:]) + f"{ratio} | {target} | {holds} |")
    lines += ["", "![respawn gap and crash-storm errors](benchmarks.svg)", ""]
    lines += list(sections)  # the upgrade's (bench/upgrade.py), when measured
    lines += [open(os.path.join(ROOT, "bench", "notes.md")).read()] if os.path.exists(
        os.path.join(ROOT, "bench", "notes.md")) else []
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def kept_section(path, title):
    """The section of the file at `path` whose title begins with `title`,
    as it is, or None: one make bench does not measure but must not drop."""
    try:
        with open(path) as f:
            doc = f.read()
    except OSError:
        return None
    start = doc.find("\n" + title)
    if start < 0:
        return None
    end = doc.find("\n## ", start + 1)
    return (doc[start + 1:] if end < 0 else doc[start + 1:end]).rstrip() + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    parser.add_argument("--list", action="store_true", help="print the scenario names and exit")
    parser.add_argument("--no-baseline", action="store_true", help="measure respawn only")
    args = parser.parse_args()
    if args.list:
        print("\n".join([name for name, _ in SCENARIOS] + ["upgrade", "any language", "gap steps"]))
        return
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    if unknown := only - {name for name, _ in SCENARIOS} - {"upgrade", "any language", "gap steps"}:
        sys.exit(f"bench: no scenario named {', '.join(sorted(unknown))} (--list names them)")
    if not os.path.exists(RESPAWN):
        sys.exit(f"bench: {RESPAWN} is missing: run 'make bench', which builds it")
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is missing: run 'make bench', which installs it")
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    systems = [respawn_system()]
    baseline = None if args.no_baseline else baseline_system()
    if baseline:
        systems.append(baseline)
    elif not args.no_baseline:
        progress("node not found: the baseline column will say so")
    results = {s.name: {} for s in systems}
    if not baseline and not args.no_baseline:
        results["node cluster (missing)"] = {}
    chosen = [(n, f) for n, f in SCENARIOS if not only or n in only]
    for i, (name, scenario) in enumerate(chosen, 1):
        for system in systems:
            runs = []
            count = args.runs if system is systems[0] else min(args.runs, getattr(scenario, "baseline_runs", args.runs))
            for run in range(count):
                progress(f"{i}/{len(chosen)} {name}: {system.name}, run {run + 1} of {count}")
                try:
                    runs.append(scenario(system))
                except Exception as err:  # a failed run is reported, not fatal
                    progress(f"{name}: {system.name} run {run + 1} failed: {err}")
            if runs:
                results[system.name][name] = medians(runs)
                SPREADS[(system.name, name)] = spread(runs)
    sections = []
    if not only or "upgrade" in only:
        # bench/upgrade.py imports this file as `run`: the same module, not
        # a second copy with its own list of started processes.
        sys.modules.setdefault("run", sys.modules[__name__])
        import upgrade
        progress("upgrade under load and a plain restart (bench/upgrade.py)")
        sections.append(upgrade.section(upgrade.measure(args.runs), "`make bench`, beside the figures above"))
    if not only or "any language" in only:
        # The Rust demo's and the cluster's figures of this run, reused.
        sys.modules.setdefault("run", sys.modules[__name__])
        import anylang
        progress("any language: Node and Python workers under respawn (bench/anylang.py)")
        sections.append(anylang.section(anylang.measure(args.runs, results), "`make bench`, beside the figures above"))
    if not only or "gap steps" in only:
        sys.modules.setdefault("run", sys.modules[__name__])
        import gap_trace
        why_not = gap_trace.perf_works()
        measured = None
        if not why_not:
            progress("the replacement step by step, under perf (bench/gap_trace.py)")
            try:
                measured = gap_trace.measure()
            except Exception as err:  # reported in its section, not fatal
                why_not = f"bench/gap_trace.py failed: {err}"
        sections.append(gap_trace.section(measured, why_not))
    # bench/upgrade_scale.py's section (make bench-upgrade-scale) takes
    # minutes of its own: kept as the last such run wrote it.
    if kept := kept_section(args.out, "## Upgrade at scale"):
        sections.append(kept)
    # bench/rivals.py's section (make bench-any: PM2 and gunicorn, installed
    # from their registries for the run), likewise.
    if kept := kept_section(args.out, "## Beside PM2 and gunicorn"):
        sections.append(kept)
    elapsed = time.monotonic() - started
    write_report(args.out, dict(machine(), **{"load at start": load_at_start}), results, args.runs, elapsed,
                 baseline is None and not args.no_baseline, sections)
    write_svg(os.path.join(os.path.dirname(args.out), "benchmarks.svg"), results)
    progress(f"wrote {args.out} in {elapsed / 60:.1f} minutes")


if __name__ == "__main__":
    main()
