#!/usr/bin/env python3
"""The figures of docs/robustness.md: each fault of issue 8, reproduced on
loopback against the release binary, and what respawn does about it now.

    python3 bench/robustness.py [--only NAME[,NAME]] [--list]

Prints a markdown table (fault | figure | how measured) on stdout, progress
on stderr. Names: log, nproc, nofile, retiring, signals, mature, start, hup,
slow. RESPAWN_BIN overrides the binary (default target/release/respawn, from
`cargo build --release -p respawn-master --features demo --bin respawn`).

Each scenario starts its master in a session of its own and kills the whole
process group with SIGKILL when it ends, however it ends; every wait has a
deadline; the master's stderr is read as it comes by a thread (except in
"log", where nobody reading it is the fault). "nproc" runs the master as uid
42101 and needs root to get there. The whole run takes about 2 minutes.
"""

import argparse
import datetime
import os
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

# The make bench harness beside this file: its /proc reader (state, ppid,
# CPU ticks) and free-port picker, rather than copies of them.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import free_port, stat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("RESPAWN_BIN") or os.path.join(ROOT, "target", "release", "respawn")
PATIENCE = 30.0  # seconds any one wait may take
UNPRIVILEGED = 42101  # uid and gid of the master in "nproc"


def progress(text):
    print(f"[robustness {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Failed(Exception):
    """A scenario could not take its figure; the row says why."""


def wait_until(condition, limit=PATIENCE, step=0.005):
    """Polls `condition` until it returns something true or `limit` passes;
    returns its last value."""
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def live_children(parent):
    """The pids whose parent is `parent` and that are not zombies."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st and st[1] == parent and st[0] != "Z":
                found.add(int(name))
    return found


def exactly(parent, n, limit=PATIENCE):
    """The live children of `parent` once there are exactly n; None if
    there never are within `limit`."""
    return wait_until(lambda: (lambda found: found if len(found) == n else None)(live_children(parent)), limit)


def alive(pid):
    st = stat(pid)
    return st is not None and st[0] != "Z"


def get(port, path="/", timeout=10.0):
    """GET on a new connection, read until close; the status code (an
    exception if there is no HTTP answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    if not m:
        raise Failed(f"GET {path}: not HTTP: {answer[:80]!r}")
    return int(m.group(1))


LINE = re.compile(r"^\[(\S+)Z\s+(\w+)\s*\] (.*)$")


def log_time(line):
    """The timestamp of a log line, in seconds (env_logger's milliseconds)."""
    m = LINE.match(line)
    if not m:
        return None
    stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f")
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


def message(line):
    m = LINE.match(line)
    return m.group(3) if m else line


class Master:
    """`respawn ARGS --listen 127.0.0.1:PORT`, in a new session. With `read`,
    a thread collects stderr as (arrival time, line); without, stderr is a
    pipe nobody reads until `start_reading`. `stop` kills the whole group."""

    def __init__(self, args, read=True, rust_log="debug", preexec=None):
        self.port = free_port()
        env = dict(os.environ, RUST_LOG=rust_log, RUST_LOG_STYLE="never")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [BINARY, *args, "--listen", f"127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.pid = self.proc.pid
        self.lines = []
        self.changed = threading.Condition()
        self.reader = None
        if read:
            self.start_reading()

    def start_reading(self):
        def read():
            for raw in self.proc.stderr:
                with self.changed:
                    self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
                    self.changed.notify_all()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def stop(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            progress(f"master {self.pid} survived SIGKILL to its group for {PATIENCE} s")
        if self.reader:
            self.reader.join(timeout=5)
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()

    def wait_line(self, what, matches, after=0, limit=PATIENCE):
        """The first line from index `after` on that `matches`, as (index,
        arrival time, line); Failed after `limit`."""
        deadline = time.monotonic() + limit
        with self.changed:
            while True:
                for i in range(after, len(self.lines)):
                    if matches(self.lines[i][1]):
                        return i, self.lines[i][0], self.lines[i][1]
                after = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self.reader.is_alive():
                    raise Failed(f"no line for {what} within {limit:.0f} s")
                self.changed.wait(min(left, 0.5))

    def count(self, needle):
        with self.changed:
            return sum(needle in line for _, line in self.lines)

    def mark(self):
        with self.changed:
            return len(self.lines)

    def wait_workers(self, n, limit=PATIENCE):
        """The master's live children once there are exactly n."""
        found = exactly(self.pid, n, limit)
        if not found:
            raise Failed(f"never exactly {n} workers: {sorted(live_children(self.pid))}")
        return found

    def wait_ready(self, n):
        """The workers, once n have said ready and exactly n are alive."""
        ready = re.compile(r"\] worker \d+ ready$")
        with self.changed:
            if not self.changed.wait_for(lambda: sum(bool(ready.search(l)) for _, l in self.lines) >= n, PATIENCE):
                raise Failed(f"never {n} workers ready")
        return self.wait_workers(n)


def ms(seconds):
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


# Each scenario returns (fault, figure, how measured).


def scenario_log():
    rounds = 1000
    with Master(["--workers", "2"], read=False) as m:
        if not wait_until(lambda: _answers(m.port)):
            raise Failed("the master never answered GET /")
        failed, statuses = 0, {}
        began = time.monotonic()
        deadline = began + 300
        done = 0
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            for path, want in (("/crash", 500), ("/", 200)):
                try:
                    status = get(m.port, path)
                except (OSError, Failed) as err:
                    status = type(err).__name__
                if status != want:
                    failed += 1
                    statuses[(path, status)] = statuses.get((path, status), 0) + 1
            done += 1
        wall = time.monotonic() - began
        workers = len(exactly(m.pid, 2, limit=10) or live_children(m.pid))
        # Now read the pipe: the lines kept, then the count of those dropped.
        m.start_reading()
        report = re.compile(r"^respawn: (\d+) log lines? dropped: stderr was not being read$")
        try:
            m.wait_line("the dropped count", report.match, limit=3)
        except Failed:
            pass  # it goes out with the next line: the SIGWINCH below
        # A line that changes nothing marks the end of what was held back.
        # Resent if the master took it while its queue was still full.
        mark = m.mark()
        end = time.monotonic() + PATIENCE
        while True:
            os.kill(m.pid, signal.SIGWINCH)
            try:
                m.wait_line("a line after the backlog", lambda l: "received SIGWINCH" in l, after=mark, limit=2)
                break
            except Failed:
                if time.monotonic() > end:
                    raise
        with m.changed:
            lines = [line for _, line in m.lines]

    def total(pattern):
        return sum(int(x.group(1)) for line in lines if (x := re.match(pattern, line)))

    dropped = total(report.pattern)
    worker_reported = total(r"^worker \d+: (\d+) log lines? dropped")
    reports = sum(bool(report.match(line)) for line in lines)
    # Lines the workers logged, one per request and one per panic: those
    # missing were lost in a full pipe.
    serving = sum(" serving GET " in line for line in lines)
    panics = sum(" panicked at " in line for line in lines)
    worker_lost = 3 * rounds - serving - panics
    if done < rounds:
        raise Failed(f"only {done} of {rounds} rounds within 300 s; {failed} failed {statuses}")
    if not reports:
        raise Failed(f"no `respawn: N log lines dropped` line in the {len(lines):,} read")
    figure = (
        f"{failed} of {2 * rounds:,} requests failed, {workers} workers after, "
        f"{rounds:,} rounds in {wall:.1f} s; then the log resumed with "
        f"`respawn: {dropped:,} log lines dropped: stderr was not being read`"
        + (f" ({reports} such lines)" if reports > 1 else "")
        + f"; {len(lines):,} lines read. Of the workers' 3,000 `serving` and `panicked` lines, "
        f"{worker_lost:,} were lost, {worker_reported:,} of them reported by a `worker PID: N log lines dropped` line"
    )
    if statuses:
        figure += f"; failures: {statuses}"
    how = (
        "`--workers 2`, `RUST_LOG=debug`, stderr a pipe nobody reads; "
        f"{rounds:,} rounds of `GET /crash` then `GET /`, each on a new connection; "
        "then the pipe is read up to a SIGWINCH line sent after the rounds"
    )
    return "A log pipe nobody reads (8.1)", figure, how


def _answers(port):
    try:
        return get(port, "/", timeout=2) == 200
    except (OSError, Failed):
        return False


def scenario_nproc():
    if os.geteuid() != 0:
        raise Failed("needs root, to run the master as uid 42101")

    def drop_privileges():
        os.setgroups([])
        os.setgid(UNPRIVILEGED)
        os.setuid(UNPRIVILEGED)
        resource.setrlimit(resource.RLIMIT_NPROC, (3, 3))

    with Master(["--workers", "2"], preexec=drop_privileges) as m:
        m.wait_ready(2)
        crashes = 0
        while not m.count("fork failed"):
            if crashes >= 100:
                raise Failed("no fork failed in 100 crashes")
            get(m.port, "/crash")
            crashes += 1
        i, _, failed = m.wait_line("the failed fork", lambda l: "fork failed" in l)
        _, _, again = m.wait_line("the recovery", lambda l: "forking works again" in l, after=i)
        workers = len(m.wait_workers(2))
        up = alive(m.pid)
        status = get(m.port, "/")
        gave_up = m.count("giving up")
    gap = log_time(again) - log_time(failed)
    said = re.search(r"fork failed: (.*?); \d+ of \d+ workers running, (retrying in [\d.]+ s)", message(failed))
    figure = (
        f"fork failed after {crashes} crash{'es' if crashes != 1 else ''}; `forking works again` {ms(gap)} later "
        f"(the line said {said.group(2) if said else '?'}; log timestamps are in ms); "
        f"master {'up' if up else 'DOWN'} with {workers} workers, `GET /` {status}"
        f"{'' if not gave_up else ', GAVE UP'}"
    )
    how = (
        f"master as uid {UNPRIVILEGED} with RLIMIT_NPROC 3, `--workers 2`; `GET /crash` until a line says "
        "`fork failed`; the gap between its timestamp and that of `forking works again`. "
        f"The line names the limit: `{said.group(1) if said else message(failed)}`"
    )
    return "A failed fork at run time (8.2, RLIMIT_NPROC)", figure, how


def scenario_nofile():
    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))

    with Master(["--workers", "2"], preexec=low_nofile) as m:
        m.wait_ready(2)
        wanted = 2
        while True:
            if wanted > 40:
                raise Failed("TTIN never refused")
            mark = m.mark()
            os.kill(m.pid, signal.SIGTTIN)
            _, _, line = m.wait_line(
                "the TTIN's answer",
                lambda l: re.search(r"received SIGTTIN, (\d+ workers? wanted|but )", l),
                after=mark,
            )
            if "received SIGTTIN, but" in line:
                refusal = message(line)
                break
            wanted = int(re.search(r"received SIGTTIN, (\d+) worker", line).group(1))
        workers = len(m.wait_workers(wanted))
        up = alive(m.pid)
    figure = f"at most {wanted} workers ({workers} running after the refusal, master {'up' if up else 'DOWN'}); `{refusal}`"
    how = "RLIMIT_NOFILE 32 (as root), `--workers 2`; TTIN one at a time, each awaited by its line, until one is refused"
    return "TTIN past the open-file limit (8.2, RLIMIT_NOFILE)", figure, how


def scenario_retiring():
    held_count = 300
    with Master(["--workers", "2", "--max-requests", "1"]) as m:
        m.wait_ready(2)
        most = 0
        held = []
        try:
            for _ in range(held_count):
                conn = socket.create_connection(("127.0.0.1", m.port), timeout=10)
                conn.sendall(b"GET / HTTP/1.1\r\n")
                held.append(conn)
                most = max(most, len(live_children(m.pid)))
            # Watch while they are held: longer than the demo's 5 s head
            # deadline, so that retiring workers leave and are replaced.
            watch_until = time.monotonic() + 7
            scans = 0
            while time.monotonic() < watch_until:
                most = max(most, len(live_children(m.pid)))
                scans += 1
                time.sleep(0.002)
            forks_held = m.count(" spawned") - 2
            bound_line = m.count("the next replacement waits for a retiring one to leave")
        finally:
            for conn in held:
                conn.close()
        closed = time.monotonic()
        try:
            status = get(m.port, "/", timeout=60)
        except (OSError, Failed):
            status = None
        answered = time.monotonic() - closed
        up = alive(m.pid)
    figure = (
        f"at most {most} live children (bound 2 x 2 + 1 = 5; 302 before the fix); "
        f"{forks_held} forks while held; `GET /` "
        + (f"200 {answered:.1f} s after the connections closed" if status else "NOT answered within 60 s")
        + ("" if up else "; master DOWN")
    )
    how = (
        f"`--workers 2 --max-requests 1`; {held_count} connections each send `GET / HTTP/1.1\\r\\n` and stay "
        f"open for 7 s; the master's live children counted from /proc/*/stat ({scans:,} scans); "
        f"the bound's line was logged {bound_line} time(s)"
    )
    return "Retiring workers piled up by clients (8.3)", figure, how


# Signals respawn acts on, that cannot be caught, that keep job control's meaning
# (TSTP, CONT), or that must stay fatal.
# USR2 (12) is the upgrade's signal since the upgrade landed: not a stray.
NOT_STRAY = {9, 19, 18, 20, 4, 5, 6, 7, 8, 11, 31, 1, 2, 3, 12, 15, 17, 21, 22}


def scenario_signals():
    with Master(["--workers", "2"]) as m:
        before = m.wait_ready(2)
        sent = 0
        for signo in (s for s in range(1, 65) if s not in NOT_STRAY):
            lines = m.count("; ignored")
            os.kill(m.pid, signo)
            if not wait_until(lambda: m.count("; ignored") > lines, limit=10):
                raise Failed(f"no `; ignored` line for signal {signo}")
            sent += 1
        ignored = m.count("; ignored")
        up = alive(m.pid)
        after = live_children(m.pid)
        status = get(m.port, "/")
    figure = (
        f"{sent} signals sent, {ignored} `; ignored` lines; master {'alive' if up else 'DEAD'}, "
        f"workers {'unchanged' if after == before else 'CHANGED'}, `GET /` {status}"
    )
    how = (
        "`--workers 2`; every signal 1 to 64 but KILL, STOP, TSTP, CONT, the fault signals (ILL TRAP ABRT BUS FPE SEGV SYS) "
        "and those respawn acts on (HUP INT QUIT USR2 TERM CHLD TTIN TTOU), one at a time, each awaited by its line"
    )
    return "Stray signals (8.4)", figure, how


def scenario_mature():
    kills = 12
    spawned_line = re.compile(r"\] worker (\d+) spawned$")
    with Master(["--workers", "2"]) as m:
        m.wait_ready(2)
        gaps = []
        began = time.monotonic()
        for _ in range(kills):

            def births():
                with m.changed:
                    return {int(x.group(1)): t for t, l in m.lines if (x := spawned_line.search(l))}

            # The oldest live worker, once it has lived 1.2 s (past the 1 s
            # minimum uptime): its `spawned` line came after its fork.
            def old_enough():
                live = live_children(m.pid)
                born = {pid: t for pid, t in births().items() if pid in live}
                if len(born) < 2:
                    return None
                pid = min(born, key=born.get)
                return pid if time.monotonic() - born[pid] >= 1.2 else None

            victim = wait_until(old_enough)
            if not victim:
                raise Failed("no worker lived 1.2 s")
            mark = m.mark()
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            m.wait_line(
                "the replacement",
                lambda l: l.endswith(f"worker {victim} exited (signal 9), replacing"),
                after=mark,
            )
            i, _, line = m.wait_line("the new worker", spawned_line.search, after=mark)
            new = spawned_line.search(line).group(1)
            _, ready_at, _ = m.wait_line("its ready", lambda l: l.endswith(f"worker {new} ready"), after=i)
            gaps.append(ready_at - killed)
        span = time.monotonic() - began
        m.wait_workers(2)
        gave_up = m.count("giving up")
        up = alive(m.pid)
        status = get(m.port, "/")
    figure = (
        f"{kills} kills in {span:.1f} s; gave up: {'YES' if gave_up or not up else 'no'}; "
        f"kill to the replacement's `ready`: median {ms(statistics.median(gaps))} (max {ms(max(gaps))}); `GET /` {status}"
    )
    how = (
        "default flags (10 restarts in 60 s), `--workers 2`; SIGKILL the oldest worker once it has lived 1.2 s; "
        "time from the kill to the arrival of the replacement's `ready` line"
    )
    return "Mature workers killed from outside (8.6)", figure, how


def scenario_start():
    args = ["--workers", "1", "--demo-hang-start", "--start-timeout", "1", "--max-restarts", "2", "--graceful-timeout", "1"]
    with Master(args) as m:
        i, _, first = m.wait_line("the first spawn", lambda l: re.search(r"\] worker \d+ spawned$", l))
        pid = re.search(r"worker (\d+) spawned", first).group(1)
        _, _, killed = m.wait_line(
            "the start deadline",
            lambda l: l.endswith(f"worker {pid} did not say ready within 1 s; killing it"),
            after=i,
        )
        try:
            code = m.proc.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            raise Failed(f"still running {PATIENCE:.0f} s after the start")
        total = time.monotonic() - m.started
        m.reader.join(timeout=5)
        deadlines = m.count("did not say ready within 1 s; killing it")
        gave_up = next((message(l) for _, l in m.lines if "giving up" in l), "no `giving up` line")
    gap = log_time(killed) - log_time(first)
    figure = (
        f"first worker killed {ms(gap)} after `spawned`; exit code {code} after {total:.1f} s "
        f"({deadlines} workers killed at the deadline)"
    )
    how = f"`{' '.join(args)}`; log timestamps of the first worker's two lines; the give-up line: `{gave_up}`"
    return "A worker stuck before Ready (8.7)", figure, how


def scenario_hup():
    sleeps = 3
    with Master(["--workers", "3", "--graceful-timeout", "30"]) as m:
        old = m.wait_ready(3)
        answers = []

        def client():
            try:
                answers.append(get(m.port, "/sleep/8000", timeout=PATIENCE))
            except (OSError, Failed) as err:
                answers.append(type(err).__name__)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(sleeps)]
        for c in clients:
            c.start()
        if not wait_until(lambda: m.count("serving GET /sleep/8000") == sleeps):
            raise Failed("the 3 sleeps were never all being served")
        mark = m.mark()
        hup = time.monotonic()
        os.kill(m.pid, signal.SIGHUP)
        _, done_at, _ = m.wait_line(
            "the end of the rollout",
            lambda l: l.endswith("rolling restart done: every worker is new"),
            after=mark,
        )
        busy_at_done = sleeps - len(answers)
        new = live_children(m.pid) - old
        for c in clients:
            c.join(timeout=PATIENCE)
        finished = time.monotonic() - hup
    oks = sum(a == 200 for a in answers)
    figure = (
        f"`rolling restart done` {ms(done_at - hup)} after the HUP (before the fix: (N-1) x graceful timeout), "
        f"{len(new)} new workers beside {busy_at_done} busy old ones; {oks} of {sleeps} sleeps answered 200 "
        f"({finished:.1f} s after the HUP)"
    )
    how = (
        "`--workers 3 --graceful-timeout 30`; 3 clients `GET /sleep/8000`, HUP once the 3 `serving` lines are out; "
        "time from the HUP to the arrival of the `rolling restart done` line"
    )
    return "HUP with busy workers (8.8)", figure, how


def trickler(port, results, every=1.0, limit=15.0):
    """Sends `GET /`, then one byte a second until an answer or close."""
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /")
            until = time.monotonic() + limit
            while time.monotonic() < until:
                readable, _, _ = select.select([conn], [], [], every)
                if readable:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                elif answer:
                    break
                else:
                    conn.sendall(b"x")
    except OSError as err:
        answer = answer or type(err).__name__.encode()
    results.append(answer.split(b"\r\n", 1)[0].decode(errors="replace"))


def scenario_slow():
    with Master(["--workers", "2"]) as m:
        m.wait_ready(2)
        silent = [socket.create_connection(("127.0.0.1", m.port), timeout=10) for _ in range(10)]
        try:
            asked = time.monotonic()
            silent_status = get(m.port, "/")
            silent_wait = time.monotonic() - asked
        finally:
            for conn in silent:
                conn.close()
    with Master(["--workers", "2"]) as m:
        m.wait_ready(2)
        results = []
        threads = [threading.Thread(target=trickler, args=(m.port, results), daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        # Both tricklers' first bytes are out before the GET's: the listen
        # queue is FIFO, so each idle worker takes one of them first.
        if not wait_until(lambda: _established(m.port) >= 2, limit=10):
            raise Failed("the tricklers never connected")
        asked = time.monotonic()
        trickle_status = get(m.port, "/", timeout=PATIENCE)
        trickle_wait = time.monotonic() - asked
        for t in threads:
            t.join(timeout=PATIENCE)
        drops = m.count("dropped a slow connection from")
    figure = (
        f"(a) 10 silent connections: `GET /` {silent_status} in {ms(silent_wait)} (50.9 s before the fix); "
        f"(b) 2 trickling heads: `GET /` {trickle_status} in {trickle_wait:.2f} s (head deadline 5 s); "
        f"tricklers got {sorted(results)}, {drops} `dropped a slow connection` lines"
    )
    how = (
        "`--workers 2`; (a) 10 connections that send nothing, then one timed `GET /`; "
        "(b) on a new master, 2 connections that send `GET /` then one byte a second, then one timed `GET /`"
    )
    return "Slow clients (8.9)", figure, how


def _established(port):
    """Client sockets connected to `port` on loopback, from /proc/net/tcp."""
    count = 0
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            fields = row.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":
                count += 1
    return count


SCENARIOS = {
    "log": scenario_log,
    "nproc": scenario_nproc,
    "nofile": scenario_nofile,
    "retiring": scenario_retiring,
    "signals": scenario_signals,
    "mature": scenario_mature,
    "start": scenario_start,
    "hup": scenario_hup,
    "slow": scenario_slow,
}


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--list", action="store_true", help="print the scenario names")
    opts = parser.parse_args()
    if opts.list:
        print("\n".join(SCENARIOS))
        return 0
    names = list(SCENARIOS)
    if opts.only:
        names = [n.strip() for n in opts.only.split(",")]
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario {', '.join(unknown)}; --list names them")
    if not os.access(BINARY, os.X_OK):
        sys.exit(
            f"robustness: no binary at {BINARY}; run `cargo build --release -p respawn-master "
            "--features demo --bin respawn` or set RESPAWN_BIN"
        )
    rows, failures = [], 0
    began = time.monotonic()
    for name in names:
        progress(f"{name}...")
        t0 = time.monotonic()
        try:
            rows.append(SCENARIOS[name]())
        except (Failed, OSError, subprocess.SubprocessError) as err:
            failures += 1
            rows.append((name, f"FAILED: {err}", ""))
        progress(f"{name}: {time.monotonic() - t0:.1f} s")
    print("| fault | figure | how measured |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(cell(c) for c in row) + " |")
    progress(f"done in {time.monotonic() - began:.0f} s, {failures} scenario(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
