#!/usr/bin/env python3
"""Where the respawn gap goes: one worker killed again and again under
`perf record` (kernel tracepoints), for respawn and for the C limit
(bench/fork_limit.c), each step of the replacement timed by the kernel.

    python3 bench/gap_trace.py [--kills 20] [--only respawn|limit] [--show-child]

Needs perf with tracepoint access (root, or perf_event_paranoid <= 1) and
cc; builds bench/fork_limit.c into target/release/fork_limit. `make bench`
runs it (when perf works) and writes its section of docs/benchmarks.md.
Prints, per system, the median of each step over the kills, in µs:

  exit → master wakes   the victim's teardown in the kernel, to the master's
                        epoll_wait returning (SIGCHLD or the pipe's EOF)
  wake → fork           the master's turn up to clone(2): reaping, reading
                        the dead worker's pipe, bookkeeping, logging
  fork                  clone(2) itself: copying the master's page tables,
                        fd table and the rest
  fork → child runs     until the child is first scheduled (with 2 cores,
                        often after the master went back to sleep)
  master after fork     from clone(2)'s return to the master's next
                        epoll_wait: what it does while the child starts
  child → Ready         the child's setup up to its Ready write
  Ready → accept        from Ready to the first accept(2)
  exit → accept         the whole, from the victim's death

and the counts of system calls and of page faults (copy-on-write after the
fork, mostly) in the child before its accept, and in the master between the
fork and its sleep. Each traced system call costs about a microsecond more
than it would untraced: steps made of many calls (the child's setup) read
larger here than they are; `make bench` gives the untraced gap. With
--show-child, the master's calls from its wake to its sleep and the
child's up to accept, for the median kill, runs of the same call folded
into one line.
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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: the servers, GET, the waits, the C limit)
NR = {0: "read", 1: "write", 3: "close", 12: "brk", 13: "rt_sigaction", 14: "rt_sigprocmask",
      39: "getpid", 43: "accept", 56: "clone", 61: "wait4", 72: "fcntl", 110: "getppid",
      157: "prctl", 217: "getdents64", 232: "epoll_wait", 233: "epoll_ctl", 257: "openat",
      262: "newfstatat", 273: "set_robust_list", 288: "accept4", 293: "pipe2", 332: "statx",
      334: "rseq", 436: "close_range", 435: "clone3", 9: "mmap", 11: "munmap", 33: "dup2",
      292: "dup3", 28: "madvise"}
ACCEPT = {43, 288}
CLONE = {56, 435}

LINE = re.compile(r"^\s*(\d+)(?:/\d+)?\s+([\d.]+):\s+(\S+):\s*(.*)$")


def kill_and_answer(server):
    """The gap of make bench (run.gap_once); returns the victim's pid."""
    victim = server.ready(1)[0]
    run.gap_once(server)
    return victim


def traced(system, kills):
    """Runs `kills` replacements under perf; returns (master pid, victims,
    the events as (pid, time, event, detail)). perf follows the master and
    its first worker, and whatever they fork from then on."""
    server = system.start(1, *system.kill_flags)
    data = tempfile.NamedTemporaryFile(prefix="gap_trace.", suffix=".data", delete=False).name
    perf = None
    try:
        first = server.ready(1)[0]
        events = ["raw_syscalls:sys_enter", "raw_syscalls:sys_exit", "sched:sched_process_fork",
                  "sched:sched_process_exit", "exceptions:page_fault_user"]
        argv = ["perf", "record", "-q", "-o", data, "-p", f"{server.pid},{first}"]
        for e in events:
            argv += ["-e", e]
        perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # perf has attached by then (it says nothing when it has)
        victims = []
        for _ in range(kills):
            victims.append(kill_and_answer(server))
            time.sleep(0.02)
        time.sleep(0.2)
        perf.send_signal(signal.SIGINT)
        err = perf.communicate(timeout=60)[1]
        if perf.returncode not in (0, -signal.SIGINT):
            raise RuntimeError(f"perf record failed: {err.strip()}")
        master = server.pid
        out = subprocess.run(["perf", "script", "-i", data, "-F", "pid,time,event,trace"],
                             capture_output=True, text=True, timeout=300).stdout
    finally:
        if perf and perf.poll() is None:
            perf.kill()
            perf.wait()
        server.stop()
        os.unlink(data)
    parsed = []
    for line in out.splitlines():
        if m := LINE.match(line):
            parsed.append((int(m.group(1)), float(m.group(2)), m.group(3), m.group(4)))
    return master, victims, parsed


def nr(detail):
    m = re.match(r"NR (\d+)", detail)
    return int(m.group(1)) if m else None


def steps(master, victims, events):
    """Per kill, the times of the steps (µs), the counts, and the child's calls."""
    results = []
    for victim in victims:
        exit_at = next((t for p, t, e, d in events if p == victim and e == "sched:sched_process_exit"), None)
        if exit_at is None:
            continue
        after = [ev for ev in events if ev[1] >= exit_at]
        wake = next((t for p, t, e, d in after if p == master and e == "raw_syscalls:sys_exit"
                     and nr(d) == 232), None)
        fork_in = next(((t, i) for i, (p, t, e, d) in enumerate(after) if p == master
                        and e == "raw_syscalls:sys_enter" and nr(d) in CLONE), None)
        fork_ev = next((d for p, t, e, d in after if p == master and e == "sched:sched_process_fork"), None)
        if wake is None or fork_in is None or fork_ev is None:
            continue
        child = int(re.search(r"child_pid=(\d+)", fork_ev).group(1))
        fork_out = next((t for p, t, e, d in after if p == master and e == "raw_syscalls:sys_exit"
                         and nr(d) in CLONE and t >= fork_in[0]), None)
        sleep = next((t for p, t, e, d in after if p == master and e == "raw_syscalls:sys_enter"
                      and nr(d) == 232 and t >= fork_out), None)
        mine = [ev for ev in after if ev[0] == child]
        if not mine or fork_out is None or sleep is None:
            continue
        runs = mine[0][1]
        ready = next((t for p, t, e, d in mine if e == "raw_syscalls:sys_enter" and nr(d) == 1), None)
        accept = next((t for p, t, e, d in mine if e == "raw_syscalls:sys_enter" and nr(d) in ACCEPT), None)
        if ready is None or accept is None:
            continue
        before_accept = [ev for ev in mine if ev[1] <= accept]
        master_window = [ev for ev in after if ev[0] == master and fork_out <= ev[1] <= sleep]
        us = lambda a, b: (b - a) * 1e6
        results.append({
            "exit → master wakes": us(exit_at, wake),
            "wake → fork": us(wake, fork_in[0]),
            "fork": us(fork_in[0], fork_out),
            "fork → child runs": us(fork_out, runs),
            "master after fork": us(fork_out, sleep),
            "child → Ready": us(runs, ready),
            "Ready → accept": us(ready, accept),
            "exit → accept": us(exit_at, accept),
            "child syscalls": sum(1 for ev in before_accept if ev[2] == "raw_syscalls:sys_enter"),
            "child page faults": sum(1 for ev in before_accept if ev[2] == "exceptions:page_fault_user"),
            "master syscalls after fork": sum(1 for ev in master_window if ev[2] == "raw_syscalls:sys_enter"),
            "master page faults after fork": sum(1 for ev in master_window
                                                 if ev[2] == "exceptions:page_fault_user"),
            "_calls": [(t, nr(d)) for p, t, e, d in before_accept if e == "raw_syscalls:sys_enter"],
            "_runs": runs,
            "_master": [(t, nr(d)) for p, t, e, d in after if p == master and wake <= t <= sleep
                        and e == "raw_syscalls:sys_enter"],
            "_wake": wake,
        })
    return results


def folded(calls, start):
    """The child's calls, each run of one call folded: `+12 µs rt_sigaction ×64 (150 µs)`."""
    lines, i = [], 0
    while i < len(calls):
        j = i
        while j + 1 < len(calls) and calls[j + 1][1] == calls[i][1]:
            j += 1
        end = calls[j + 1][0] if j + 1 < len(calls) else calls[j][0]
        name = NR.get(calls[i][1], f"NR {calls[i][1]}")
        count = f" ×{j - i + 1}" if j > i else ""
        lines.append(f"  +{(calls[i][0] - start) * 1e6:7.1f} µs  {name}{count}  ({(end - calls[i][0]) * 1e6:.1f} µs)")
        i = j + 1
    return lines


def perf_works():
    """None if perf can record the tracepoints here, else why not."""
    if not shutil.which("perf"):
        return "perf is not installed"
    with tempfile.NamedTemporaryFile(prefix="gap_trace.", suffix=".data") as data:
        probe = subprocess.run(["perf", "record", "-q", "-o", data.name, "-e", "raw_syscalls:sys_enter",
                                "--", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"perf cannot record tracepoints here ({probe.stderr.strip().splitlines()[-1:]})"
    return None


def measure(kills=20, binary=None, only=None):
    """{system name: {step: median}} and the folded calls of the median
    kill's master and child, for respawn and the C limit."""
    systems = []
    if only != "limit":
        respawn = run.respawn_system()
        if binary:
            respawn.argv = [binary]
        systems.append(respawn)
    limit = run.limit_system() if only != "respawn" else None
    if limit:
        systems.append(limit)
    table, calls = {}, {}
    for system in systems:
        run.progress(f"gap steps under perf: {system.name}, {kills} kills")
        master, victims, events = traced(system, kills)
        kills_found = steps(master, victims, events)
        if not kills_found:
            raise RuntimeError(f"no complete replacement found in the trace of {system.name}")
        keys = [k for k in kills_found[0] if not k.startswith("_")]
        table[system.name] = {k: statistics.median(r[k] for r in kills_found) for k in keys}
        table[system.name]["kills"] = len(kills_found)
        middle = sorted(kills_found, key=lambda r: r["exit → accept"])[len(kills_found) // 2]
        calls[system.name] = (folded(middle["_master"], middle["_wake"]), folded(middle["_calls"], middle["_runs"]))
    return table, calls


def markdown(table):
    names = list(table)
    lines = ["| step (median µs; counts) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in table[names[0]]:
        lines.append(f"| {k} | " + " | ".join(f"{table[n].get(k, float('nan')):.0f}" for n in names) + " |")
    return lines


TITLE = "## The replacement, step by step"


def section(measured, why_not=None):
    """The section of docs/benchmarks.md: the steps' table and respawn's
    calls, or why they could not be measured."""
    lines = [TITLE, ""]
    if why_not:
        return "\n".join(lines + [f"Not measured by this run: {why_not}.", ""])
    table, calls = measured
    lines += [
        f"Measured by `make bench` with `bench/gap_trace.py` on {time.strftime('%Y-%m-%d')}, the "
        f"machine's load average {os.getloadavg()[0]:.1f}: the only worker killed "
        f"{table[next(iter(table))]['kills']} times as in the respawn gap, for respawn and for the "
        "C limit, under `perf record` with the kernel's tracepoints (system calls, forks, exits, "
        "page faults) on the master and its children. Each traced call costs about a microsecond "
        "more than untraced, and each fork more (perf copies its counters into the child): the "
        "steps read larger than in the gap above, and their sum is no gap. What they say is where "
        "respawn's time goes beside the C limit's, step by step.",
        "",
    ]
    lines += markdown(table) + [""]
    for name, (master, child) in calls.items():
        if name != "respawn":
            continue
        lines += [f"{name}'s calls in the median kill, the master's from its wake to its sleep, then the "
                  "child's up to its first accept (a run of one call folded into one line, with the "
                  "time until the next call):", "", "```", "master:", *master, "child:", *child, "```", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--only", choices=["respawn", "limit"])
    parser.add_argument("--show-child", action="store_true")
    parser.add_argument("--bin", default=run.RESPAWN, help="the respawn binary")
    args = parser.parse_args()
    if why := perf_works():
        sys.exit(f"gap_trace: {why}")
    table, calls = measure(args.kills, args.bin, args.only)
    if args.show_child:
        for name, (master, child) in calls.items():
            print(f"{name}: the master's calls from its wake to its sleep (median kill)")
            print("\n".join(master))
            print(f"{name}: the child's calls up to accept (median kill)")
            print("\n".join(child))
    print("\n".join(markdown(table)))


if __name__ == "__main__":
    main()
