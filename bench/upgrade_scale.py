#!/usr/bin/env python3
"""An upgrade (USR2) of 4,096 workers under load, and what the master hands
down to its next image.

    python3 bench/upgrade_scale.py [--workers 4096] [--clients 4] [--out FILE | --print]

Writes its section of docs/benchmarks.md ("Upgrade at scale (USR2, 4,096
workers)") in place, leaving the rest of the file as it was; make bench
carries the section over unmeasured (it takes 4 to 5 minutes). With
another --workers, give --out elsewhere or --print: the section's title
names 4,096.

Issue 16 moved the master's state from an environment string (the kernel
refuses one over 128 KiB: about 3,000 workers) to a sealed memfd
(master/src/handdown.rs). This puts that to the test at respawn's most
workers. It raises this process's soft RLIMIT_NOFILE to the hard limit,
which the master inherits (a pipe per worker, 2N + 1 at most while they
are replaced); starts `respawn --workers N --control SOCK` from a hard link
to the release binary (upgrade.py's Deploy) and waits for every worker's
`ready` line; puts it under load (upgrade.py's client processes, `GET
/version` on a new connection each); renames a new build over the path
(upgrade.py's tagged wrapper script, so that the answers tell the builds
apart); sends SIGUSR2 and waits for the new image's `N workers adopted`
line. `ctl upgrade` would answer `not done within 90 s` for a rollout this
long: the signal and the log are what an operator has then.

The figures come from the master's own log timestamps where they can: the
rollout (its `upgrading to` line to its `every worker runs` line), each
worker's step (between consecutive `ready` lines of new workers) and the
re-execution's gap (the old image's last line, `every worker runs`, to the
new image's `adopted` line). The state's size is read from the memfd
itself when the harness catches it: it spins on /proc/PID/environ over the
last steps of the rollout, and once the new image's environment names
RESPAWN_MASTER_STATE=FD, opens /proc/PID/fd/FD (its own reference, so the
master's close does not matter). The new image closes it within
milliseconds; when the harness is too late, the size is computed as
handdown.rs's `encode` would write it, and the section says which.

Every process started here is in a session of its own and is killed at the
end, however the run ends (run.py's STARTED list: an exception, Ctrl-C or
TERM included).
"""

import argparse
import contextlib
import datetime
import fcntl
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time

# make bench's harness and the upgrade benchmark beside this file: the
# server handle, the clients, the deploy and the section writer, not copies.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import PATIENCE, RESPAWN, ROOT, STARTED, Running, free_port, live_children, progress, status_field  # noqa: E402
from upgrade import ENV, TAG, Deploy, Load, outcomes, percentile, version, write_section  # noqa: E402

TITLE = "## Upgrade at scale (USR2, 4,096 workers)"
WORKERS = 4096
CLIENTS = 4  # client processes of one thread each, as upgrade.py's
WARM_UP = 5.0  # seconds of load before the signal
AFTER = 2.0  # seconds of load after the new image adopted its workers
# Deadlines that grow with N: on this 2-core machine, under load and beside
# others' builds, 4,096 workers started in about a minute and were replaced
# one at a time in 20 to 45 ms each.
START_PER_WORKER = 0.05
STEP_PER_WORKER = 0.25
# The last steps of the rollout: over the last 50 the harness reads the log
# every 5 ms, over the last 3 it spins on the master's environment to catch
# the state's memfd (a step takes 20 ms or more).
NEAR_END = 50
SPIN_FROM_LAST = 3
MASTER_VAR = b"RESPAWN_MASTER_STATE="
ENV_STRING_LIMIT = 32 * 4096  # MAX_ARG_STRLEN: one argument or variable, its NUL included
# One worker in the old format on a host up for long: a 7-digit pid (pid_max
# 4,194,304), the last slot, a 5-digit pipe, generation 10, 10 days old.
LONG_LIVED = "4194303/8192/16383/10/ready/1/864000000/-/0;"

LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s+(\w+)\s*\] (.*)$")
READY = re.compile(r"^worker (\d+) ready$")


# ---------------------------------------------------------------- limits


def raise_nofile(workers):
    """Raises this process's soft RLIMIT_NOFILE as far as the hard limit
    allows (the master and its workers inherit it): the master holds a pipe
    per live worker, and during a rollout up to 2N + 1 are alive, beside its
    own few fds. Returns (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:  # what an unlimited hard limit means
            ceiling = int(f.read())
    if soft == resource.RLIM_INFINITY or soft >= ceiling:
        return soft, soft, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
    need = 2 * workers + 1 + 64
    if ceiling < need:
        raise RuntimeError(f"{workers} workers need about {need} fds in the master during a rollout, and "
                           f"the hard limit (ulimit -Hn) is {hard}: raise it, or give fewer --workers")
    return soft, ceiling, hard


def master_nofile(pid):
    """The master's own "Max open files" (soft, hard), from /proc."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    return "?", "?"


# ---------------------------------------------------------------- the log


def parse(line):
    """(seconds since the epoch, level, message) of a log line of the
    master's, or None for anything else."""
    m = LOG_LINE.match(line)
    if not m:
        return None
    at = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
    return at.timestamp(), m.group(2), m.group(3)


class Log:
    """The master's log lines from index `mark` of the server's on, each
    parsed once (a rollout of 4,096 workers logs some 25,000 lines)."""

    def __init__(self, server, mark=0):
        self.server, self.seen, self.parsed = server, mark, []

    def lines(self):
        fresh = self.server.log()[self.seen:]
        self.seen += len(fresh)
        self.parsed += [p for p in (parse(line) for _, line in fresh) if p]
        return self.parsed


def first(found, what, matches):
    """The first parsed line of `found` whose message `matches`."""
    for entry in found:
        if matches(entry[2]):
            return entry
    raise RuntimeError(f"no log line for {what}")


def wait_for_lines(log, what, done, limit, step=0.25, every=10.0):
    """Waits until `done(the parsed lines)` is true, looking every `step`
    seconds and saying how far it got every `every` seconds."""
    deadline = time.monotonic() + limit
    said = time.monotonic()
    while True:
        found = log.lines()
        if done(found):
            return found
        if log.server.proc.poll() is not None:
            raise RuntimeError(f"the master exited ({log.server.proc.returncode}) while waiting for {what}")
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"no {what} within {limit:.0f} s; last line: {found[-1][2] if found else 'none'}")
        if now - said >= every:
            said = now
            progress(f"upgrade-scale: waiting for {what}: {len(ready_pids(found)):,} ready lines so far")
        time.sleep(step)


def ready_pids(found):
    return [int(m.group(1)) for e in found if (m := READY.match(e[2]))]


# ---------------------------------------------------------------- control


def ctl(sock, command):
    out = subprocess.run([RESPAWN, "ctl", sock, command], capture_output=True, text=True, timeout=PATIENCE)
    if out.returncode != 0:
        raise RuntimeError(f"respawn ctl {command}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def metric(text, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    if not m:
        raise RuntimeError(f"no {name} in the metrics")
    return float(m.group(1))


# ---------------------------------------------------------------- the state


def lowest_free_fds(pid, count):
    """The `count` lowest fd numbers the process has free: where its next
    memfd_create lands."""
    try:
        used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return []
    free, fd = [], 0
    while len(free) < count:
        if fd not in used:
            free.append(fd)
        fd += 1
    return free


def open_state(pid, fd):
    """Our own reference to the process's fd `fd` if it is the state's
    memfd, else None."""
    try:
        if "respawn-master-state" not in os.readlink(f"/proc/{pid}/fd/{fd}"):
            return None
        return os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    except OSError:
        return None


def read_sealed(fd, limit=PATIENCE):
    """The whole text of the memfd `fd` once it is sealed against writes
    (the master seals it after writing it all), or None."""
    deadline = time.monotonic() + limit
    try:
        while not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.0001)
        chunks = []
        while chunk := os.pread(fd, 1 << 20, sum(len(c) for c in chunks)):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


@contextlib.contextmanager
def scheduled_first():
    """This thread at nice -10 for the while (root may; others keep their
    nice): the memfd lives a few ms, and a busy machine's scheduler would
    otherwise often run the spin too late to see it."""
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, -10)
    except OSError:
        pass
    try:
        yield
    finally:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, before)
        except OSError:
            pass


def catch_state(pid, give_up):
    """The text of the state the master hands down, and when it was read
    (CLOCK_MONOTONIC ns), or None if the harness missed it. The old image
    creates the memfd at its lowest free fd, writes, seals, and executes the
    new one, which reads the file and closes it within milliseconds: so this
    spins on the old image's lowest free fds (listed again every 10 ms) and
    on the new image's environment (RESPAWN_MASTER_STATE=FD), and takes its
    own reference to the file as soon as it shows."""
    with scheduled_first():
        return spin(pid, give_up)


def spin(pid, give_up):
    listed = 0.0
    checked = time.monotonic()
    candidates = []
    while True:
        now = time.monotonic()
        if now - listed > 0.01:
            candidates, listed = lowest_free_fds(pid, 4), now
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            env = b""  # in the middle of the exec
        named = [var[len(MASTER_VAR):].decode() for var in env.split(b"\0") if var.startswith(MASTER_VAR)]
        for fd in named + candidates:
            if (ours := open_state(pid, fd)) is not None:
                text = read_sealed(ours)
                return (text, time.monotonic_ns()) if text else None
        if named:
            return None  # the new image runs and its memfd is closed: too late
        if now - checked > 0.05:
            checked = now
            if give_up():
                return None


def state_like(pids, fds, generation, now_ns):
    """The state as handdown.rs's `encode` writes it (version 2), for the
    new workers `pids` with pipes at `fds` and nothing else pending: what
    the memfd held, to the byte but for the digits of values the harness
    cannot see (the fds, the birth instants)."""
    lines = ["respawn-master-state 2", "image 1", f"target {len(pids)}", f"generation {generation}",
             f"since {generation}", "mask 0", f"scoreboard {fds[0]} {2 * WORKERS + 1}", f"control {fds[1]}",
             f"started {now_ns}", "counters 0 0 0 0 0 0", "reloading 0", "announced 1"]
    lines += [f"worker {pid} {slot} {fd} 1 {generation} ready 1 {now_ns} - 0 0"
              for slot, (pid, fd) in enumerate(zip(pids, fds[2:]))]
    return "\n".join(lines + ["end"]) + "\n"


def old_format_bytes(text, now_ns):
    """The environment string the master wrote before issue 16 for the same
    state (git show d5382a9^:master/src/upgrade.rs, `MasterState::encode`):
    `RESPAWN_MASTER_STATE=v1 target=N generation=G mask=M scoreboard=FD:ROWS
    control=FD workers=` then `pid/slot/pipe/generation/state/ready/age_ms/
    kill_ms/killed` for each worker, joined by `;`, and the NUL. Returns
    (its bytes, its bytes per worker, the bytes before the first worker)."""
    fields = {}
    entries_ = []
    for line in text.splitlines():
        key, *words = line.split(" ")
        if key == "worker":
            pid, slot, pipe, _image, generation, state, ready, spawned, kill, killed, _hung = words
            age_ms = max(0, now_ns - int(spawned)) // 1_000_000
            kill_ms = "-" if kill == "-" else str(max(0, int(kill) - now_ns) // 1_000_000)
            entries_.append(f"{pid}/{slot}/{pipe}/{generation}/{state}/{ready}/{age_ms}/{kill_ms}/{killed}")
        else:
            fields[key] = words
    scoreboard = ":".join(fields["scoreboard"]) if "scoreboard" in fields else "-"
    control = fields["control"][0] if "control" in fields else "-"
    head = (f"{MASTER_VAR.decode()}v1 target={fields['target'][0]} generation={fields['generation'][0]} "
            f"mask={fields['mask'][0]} scoreboard={scoreboard} control={control} workers=")
    body = ";".join(entries_)
    return len(head) + len(body) + 1, (len(body) + 1) / max(len(entries_), 1), len(head)


def source_constant(path, name):
    """A `const NAME: usize = ...;` of the Rust source at `path`, evaluated
    (digits, `<<`, `*`, `+` only), so that the arithmetic follows the code."""
    with open(os.path.join(ROOT, path)) as f:
        m = re.search(rf"const {name}: usize = ([0-9_ <*+]+);", f.read())
    if not m:
        raise RuntimeError(f"no const {name} in {path}")
    return eval(m.group(1).replace("_", ""), {"__builtins__": {}})  # digits and operators only, matched above


# ---------------------------------------------------------------- the run


def measure(workers=WORKERS, clients=CLIENTS):
    if not os.access(RESPAWN, os.X_OK):
        raise RuntimeError(f"no binary at {RESPAWN}: run `cargo build --release -p respawn-master "
                           "--features demo --bin respawn` (make bench-upgrade-scale does)")
    r = {"workers": workers, "clients": clients, "load average": os.getloadavg()[0],
         "cores": os.cpu_count(), "kernel": platform.release()}
    r["nofile before"], r["nofile soft"], r["nofile hard"] = raise_nofile(workers)
    old = version()
    r["old"], r["new"] = old, f"{old} {TAG}"
    deploy = Deploy()
    server = load = None
    run_began = time.monotonic()
    try:
        sock = os.path.join(deploy.dir, "control.sock")
        progress(f"upgrade-scale: starting {workers:,} workers")
        began = time.monotonic()
        server = Running([deploy.path, "--workers", str(workers), "--listen", f"127.0.0.1:{free_port()}",
                          "--control", sock], dict(os.environ, **ENV))
        asked = [time.monotonic()]

        def all_ready(found):
            # The master drops log lines rather than block on a pipe read
            # too slowly: then its metrics say when all are ready.
            if len(ready_pids(found)) >= workers:
                return True
            if time.monotonic() - asked[0] < 5:
                return False
            asked[0] = time.monotonic()
            return metric(ctl(sock, "metrics"), 'respawn_workers{state="ready"}') >= workers

        wait_for_lines(Log(server), f"{workers:,} workers ready", all_ready, PATIENCE + workers * START_PER_WORKER)
        r["start"] = time.monotonic() - began
        alive = live_children(server.pid)
        if len(alive) != workers:
            raise RuntimeError(f"{len(alive)} workers alive once {workers} said ready")
        r["master nofile"] = master_nofile(server.pid)

        load = Load(server.port, r["old"], r["new"], clients, 1)
        time.sleep(WARM_UP)  # the load settles before the signal
        deploy.new_build(TAG)
        before = ctl(sock, "metrics")
        r["requests_total before"] = metric(before, "respawn_requests_total")
        r["uptime before"] = metric(before, "respawn_master_uptime_seconds")
        r["rss before"] = status_field(server.pid, "VmRSS")
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{server.pid}/fd"))
        log = Log(server, len(server.log()))
        signalled = time.monotonic()
        os.kill(server.pid, signal.SIGUSR2)
        progress(f"upgrade-scale: SIGUSR2 sent; the rollout replaces {workers:,} workers one at a time")

        def adopted(found):
            return any("workers adopted" in e[2] for e in found)

        limit = PATIENCE + workers * STEP_PER_WORKER

        def near(left):
            return lambda found: adopted(found) or len(ready_pids(found)) >= workers - left

        wait_for_lines(log, "the last steps of the rollout", near(NEAR_END), limit)
        wait_for_lines(log, "the last steps of the rollout", near(SPIN_FROM_LAST), limit, step=0.005)
        caught = catch_state(server.pid, lambda: adopted(log.lines()))
        found = wait_for_lines(log, "the new image's `adopted` line", adopted, limit)
        reexecuted = time.monotonic()
        time.sleep(AFTER)  # the new image serves under the same load
        after = ctl(sock, "metrics")
        r["requests_total after"] = metric(after, "respawn_requests_total")
        r["uptime after"] = metric(after, "respawn_master_uptime_seconds")
        r["rss after"] = status_field(server.pid, "VmRSS")
        r["between metrics"] = time.monotonic() - signalled  # about; the uptime's growth should match
        r["alive after"] = len(live_children(server.pid))
        r["dropped"] = sum(1 for _, line in server.log() if "log lines dropped" in line)
        records = load.stop()
    finally:
        if load:
            load.stop()
        if server:
            server.stop()
        deploy.remove()

    r["elapsed"] = time.monotonic() - run_began
    # The master's own account, from its log's timestamps.
    began_line = first(found, "the upgrade's start", lambda m: "upgrading to " in m)
    runs_line = first(found, "`every worker runs`", lambda m: m.startswith("upgrade: every worker runs"))
    adopted_line = first(found, "`workers adopted`", lambda m: "workers adopted" in m)
    r["rollout"] = runs_line[0] - began_line[0]
    if m := re.search(r", ([\d.]+) s after it began", runs_line[2]):
        r["rollout said"] = float(m.group(1))
    readies = [e[0] for e in found if READY.match(e[2]) and e[0] <= runs_line[0]]
    new_pids = ready_pids([e for e in found if e[0] <= runs_line[0]])
    steps = sorted(b - a for a, b in zip([began_line[0]] + readies, readies))
    r["new ready lines"] = len(readies)
    r["step median"] = statistics.median(steps) if steps else None
    r["step p99"] = percentile(steps, 0.99)
    r["step max"] = steps[-1] if steps else None
    r["reexec gap"] = adopted_line[0] - runs_line[0]
    r["adopted"] = int(re.search(r"(\d+) workers? adopted", adopted_line[2]).group(1))
    r["warnings"] = [e[2] for e in found if e[1] in ("WARN", "ERROR")]

    # What was handed down.
    if caught:
        text, now_ns = caught
        r["state source"] = "read from the memfd itself (through /proc/PID/fd, between its sealing and its close)"
    else:
        generation = int(metric(after, "respawn_generation"))
        now_ns = time.monotonic_ns()
        text = state_like(new_pids, fds[-len(new_pids) - 2:], generation, now_ns)
        r["state source"] = ("computed as handdown.rs's `encode` writes it (the harness came too late to read "
                             "the memfd, which the new image closes once read)")
    worker_lines = [l for l in text.splitlines() if l.startswith("worker ")]
    r["state bytes"] = len(text.encode())
    r["state workers"] = len(worker_lines)
    r["state states"] = {}
    for line in worker_lines:
        state = line.split(" ")[6]
        r["state states"][state] = r["state states"].get(state, 0) + 1
    r["bytes per worker"] = sum(len(l) + 1 for l in worker_lines) / max(len(worker_lines), 1)
    r["old bytes"], r["old bytes per worker"], r["old head"] = old_format_bytes(text, now_ns)
    r["max bytes"] = source_constant("master/src/handdown.rs", "MAX_BYTES")
    r["max workers"] = source_constant("master/src/master.rs", "MAX_WORKERS")

    # What the clients saw.
    r["answered"] = sum(1 for *_, o in records if o in ("old", "new"))
    r["answered old"] = sum(1 for *_, o in records if o == "old")
    r["answered new"] = sum(1 for *_, o in records if o == "new")
    r["failures"] = {}
    for *_, o in records:
        if o not in ("old", "new"):
            r["failures"][o] = r["failures"].get(o, 0) + 1
    r["failed"] = sum(r["failures"].values())
    during = [b for a, b, o in records if o in ("old", "new") and signalled <= b <= reexecuted]
    r["rate during"] = len(during) / (reexecuted - signalled)
    old_ends = [b for _, b, o in records if o == "old"]
    r["last old"] = max(old_ends) - signalled if old_ends else None
    return r


# ---------------------------------------------------------------- report


def ms(seconds):
    return "n/a" if seconds is None else f"{seconds * 1000:,.0f}"


def paragraph(text):
    return textwrap.fill(text, 96, break_on_hyphens=False).splitlines() + [""]


def section(r):
    n = r["workers"]
    step = r["step median"] or 0
    rollout_said = f" ({r['rollout said']:.2f} s by its own line)" if "rollout said" in r else ""
    states = ", ".join(f"{k} {v:,}" for k, v in sorted(r["state states"].items()))
    env_workers = (ENV_STRING_LIMIT - r["old head"] - 1) / r["old bytes per worker"]
    env_long_lived = (ENV_STRING_LIMIT - r["old head"] - 1) / len(LONG_LIVED)
    memfd_workers = r["max bytes"] / r["bytes per worker"]
    rows = 2 * r["max workers"] + 1
    lines = [TITLE if n == WORKERS else f"## Upgrade at scale (USR2, {n:,} workers)", ""]
    lines += paragraph(
        f"Measured on {datetime.date.today().isoformat()} by `make bench-upgrade-scale` (`python3 "
        f"bench/upgrade_scale.py --workers {n}`), which rewrites this section alone; one run. Machine: "
        f"{r['cores']} cores, Linux {r['kernel']}, shared with other engineers' builds and tests (load "
        f"average {r['load average']:.1f} when it began), so every time here is noisy: read them as what "
        "a busy small machine does, not as respawn's floor.")
    lines += paragraph(
        f"`respawn --workers {n} --listen 127.0.0.1:PORT --control SOCK`, started from a hard link to "
        f"the release binary, with RLIMIT_NOFILE {r['master nofile'][0]} (soft) / {r['master nofile'][1]} "
        f"(hard), read from /proc/PID/limits (the harness raised its soft limit from {r['nofile before']} "
        f"to the hard limit: the master holds a pipe per worker, up to 2N + 1 = {2 * n + 1:,} while they "
        f"are replaced). Once every worker was ready, {r['clients']} client processes sent `GET /version` "
        "in a loop, each request on a new connection (bench/upgrade.py's clients); after "
        f"{WARM_UP:.0f} s a new build was renamed over the path (a script running the same binary with "
        f"`RESPAWN_DEMO_TAG={TAG}`, so that the answers tell the builds apart: each new worker "
        "executes the script, then the binary), then SIGUSR2 to the master. The load went on until the new image's `adopted` line and "
        f"{AFTER:.0f} s more. `ctl upgrade` would have answered `not done within 90 s` for a rollout this "
        "long; `status` follows it. The times of the rollout, its steps and the re-execution are the "
        "master's own log timestamps (1 ms resolution).")
    lines += ["| figure | value |", "|---|---|"]
    rows_ = [
        (f"{n:,} workers started and ready (the harness's clock, from the master's fork)", f"{r['start']:.1f} s"),
        ("rollout: `upgrading to` line → `every worker runs` line", f"{r['rollout']:.1f} s{rollout_said}"),
        ("each worker's step (between new workers' `ready` lines): median / p99 / max",
         f"{ms(r['step median'])} / {ms(r['step p99'])} / {ms(r['step max'])} ms "
         f"({r['new ready lines']:,} new workers)"),
        ("re-execution: old image's last line → new image's `adopted` line", f"{ms(r['reexec gap'])} ms"),
        ("workers adopted", f"{r['adopted']:,}"),
        ("state handed down", f"{r['state bytes']:,} bytes, {r['state workers']:,} worker lines ({states}), "
         f"{r['bytes per worker']:.1f} bytes each; {r['state source']}"),
        ("the same state as an environment string (the format before issue 16)",
         f"{r['old bytes']:,} bytes ({r['old bytes per worker']:.1f} a worker): "
         f"{'over' if r['old bytes'] > ENV_STRING_LIMIT else 'under'} the kernel's {ENV_STRING_LIMIT:,}"),
        ("requests answered", f"{r['answered']:,} ({r['answered old']:,} by the old build, "
         f"{r['answered new']:,} by the new), {r['rate during']:,.0f}/s during the upgrade"),
        ("requests failed", f"{r['failed']:,} ({outcomes(r['failures'])})"),
        ("USR2 → last answer of the old build", f"{r['last old']:.1f} s" if r["last old"] is not None else "n/a"),
        ("`respawn_requests_total`, before USR2 → after", f"{r['requests_total before']:,.0f} → "
         f"{r['requests_total after']:,.0f}"),
        ("`respawn_master_uptime_seconds`, before → after",
         f"{r['uptime before']:,.1f} → {r['uptime after']:,.1f} (the harness's clock: "
         f"{r['between metrics']:,.1f} s between the two reads)"),
        ("master VmRSS, before USR2 → after", f"{r['rss before'] / 1024:.1f} → {r['rss after'] / 1024:.1f} MiB"),
        ("workers alive after", f"{r['alive after']:,}"),
        ("the master's lines saying it dropped log lines (a pipe read too slowly)", f"{r['dropped']}"),
        ("warnings and errors logged during the upgrade", f"{len(r['warnings'])}" + (
            f" (first: `{r['warnings'][0][:120]}`)" if r["warnings"] else "")),
    ]
    lines += [f"| {a} | {b} |" for a, b in rows_]
    lines.append("")
    test_workers = int(60 / step) if step else 0
    limit = f"the old limit (about {env_long_lived:,.0f} to {env_workers:,.0f} workers)"
    if test_workers >= env_workers:
        ci = f"past {limit}"
    else:
        ci = (f"enough to check that counters, uptime and every worker survive a re-execution, but not to "
              f"pass {limit}: that takes a run like this one ({r['elapsed'] / 60:.1f} minutes in all)")
    lines += paragraph(
        "**The arithmetic.** The kernel refuses any single environment string over "
        f"{ENV_STRING_LIMIT:,} bytes (MAX_ARG_STRLEN, 32 pages) with E2BIG. The old format took "
        f"{r['old bytes per worker']:.1f} bytes a worker here (the pids, fds and ages of this run), so "
        f"it ended at about {env_workers:,.0f} workers alive at the exec; on a host up for days (7-digit "
        f"pids, ages of 9 digits in ms: `{LONG_LIVED}`, {len(LONG_LIVED)} bytes) at about "
        f"{env_long_lived:,.0f}; and at half that many workers wanted when the old ones drain slowly "
        "and up to 2N + 1 are alive. The memfd is "
        f"bounded by handdown.rs's MAX_BYTES, {r['max bytes']:,} bytes: at {r['bytes per worker']:.1f} "
        f"bytes a worker line, about {memfd_workers:,.0f} workers, against the {rows:,} (2 × "
        f"{r['max workers']:,} + 1) that can ever be alive, which take about "
        f"{rows * r['bytes per worker'] / 1024:,.0f} KiB (`thousands_of_workers_fit` checks the format "
        "at that size, without processes). What bounds an upgrade at scale is now time, not the "
        "hand-down: the rollout replaces one worker at a time, N × the step, "
        f"{step * 1000:.0f} ms here under load, while the re-execution itself took {ms(r['reexec gap'])} ms "
        f"for {r['adopted']:,} workers. On CI (2 cores, .ci/run) a test that should end within a minute "
        f"can upgrade about {test_workers:,} workers at this step: {ci}.")
    return "\n".join(lines).rstrip() + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=WORKERS, help="workers to upgrade (1 to 4096)")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="client processes")
    parser.add_argument("--out", help="the file whose section is replaced (default docs/benchmarks.md)")
    parser.add_argument("--print", action="store_true", help="print the section; write nothing")
    args = parser.parse_args()
    out = args.out or os.path.join(ROOT, "docs", "benchmarks.md")
    if args.workers != WORKERS and not (args.out or args.print):
        sys.exit(f"upgrade-scale: the section of docs/benchmarks.md is for {WORKERS:,} workers; "
                 "with another --workers, give --out FILE or --print")
    try:
        results = measure(args.workers, args.clients)
    except RuntimeError as err:
        sys.exit(f"upgrade-scale: {err}")
    text = section(results)
    if args.print:
        sys.stdout.write(text)
    else:
        write_section(out, text, TITLE)
        progress(f"upgrade-scale: wrote its section of {out}")
    return 1 if results["failed"] or results["adopted"] < args.workers else 0


if __name__ == "__main__":
    sys.exit(main())
