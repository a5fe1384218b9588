#!/usr/bin/env python3
"""Two builds of respawn side by side, on issue 18's figures: the gap after
a SIGKILL (beside the C limit), the start of 512 and 4,096 workers by the
master's timestamps, the master's memory with 8 workers, the herd.

    python3 bench/before_after.py --before PATH [--after PATH] [--runs 3]

The two binaries (and bench/fork_limit.c for the gap and the start) take
turns, kill for kill and start for start, so that they meet the same
machine; each figure is the median over the runs, with the spread (lowest
to highest) beside it. A build of an earlier commit:

    git worktree add /tmp/before COMMIT
    cargo build --release --manifest-path /tmp/before/Cargo.toml \\
        -p respawn-master --features demo --bin respawn

Prints a Markdown table; writes nothing.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: the scenarios themselves)


def system(name, path):
    s = run.respawn_system()
    s.name, s.argv = name, [path]
    return s


def gaps(systems, kills):
    servers = [(s, s.start(1, *s.kill_flags)) for s in systems]
    try:
        for _, server in servers:
            server.ready(1)
        taken = {s.name: [] for s, _ in servers}
        for _ in range(kills):
            for s, server in servers:
                taken[s.name].append(run.gap_once(server))
        return {name: statistics.median(values) for name, values in taken.items()}
    finally:
        for _, server in servers:
            server.stop()


def starts(systems, repetitions):
    run.nofile_limits(run.BIG)
    took = {(s.name, n): [] for s in systems for n in (run.SMALL, run.BIG)}
    for _ in range(repetitions):
        for s in systems:
            for n in (run.SMALL, run.BIG):
                server = run.Starting(s, n)
                try:
                    server.wait(4 * run.PATIENCE)
                    took[(s.name, n)].append(server.logged_times()[0])
                finally:
                    server.stop()
    return {key: statistics.median(values) for key, values in took.items()}


def measure(before, after, runs, kills):
    limit = run.limit_system()
    pair = [before, after]
    rows = {}  # (figure, system name) -> [value per run]

    def note(figure, name, value):
        rows.setdefault((figure, name), []).append(value)

    for i in range(runs):
        run.progress(f"run {i + 1} of {runs}: gap")
        g = gaps(pair + ([limit] if limit else []), kills)
        for s in pair:
            note("gap p50 ms", s.name, g[s.name])
            if limit:
                note("gap / C limit", s.name, g[s.name] / g[limit.name])
        if limit:
            note("gap p50 ms", limit.name, g[limit.name])
        run.progress(f"run {i + 1} of {runs}: start")
        st = starts(pair + ([limit] if limit else []), 1)
        for s in pair + ([limit] if limit else []):
            small, big = st[(s.name, run.SMALL)], st[(s.name, run.BIG)]
            note(f"start {run.SMALL} s", s.name, small)
            note(f"start {run.BIG} s", s.name, big)
            note(f"{run.BIG} / {run.SMALL}", s.name, big / small)
        for s in pair:
            run.progress(f"run {i + 1} of {runs}: idle cost and herd, {s.name}")
            idle = run.idle_cost(s)
            note("master PSS kB (8 workers)", s.name, idle["master PSS MiB"] * 1024)
            note("master private kB", s.name, idle["master private MiB"] * 1024)
            note("master private dirty kB", s.name, idle.get("master kB: private dirty"))
            h = run.herd(s)
            note("herd: wakeups/request", s.name, h["worker wakeups/request"])
            note("herd: request 5 ms late", s.name, h[run.LATE_KEY])
    return rows


def table(rows, names):
    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        top = max(values)
        f = (lambda v: f"{v:.3f}") if top < 10 else (lambda v: f"{v:.1f}") if top < 100 else (lambda v: f"{v:.0f}")
        return f"{f(statistics.median(values))} ({f(min(values))}–{f(max(values))})"

    figures = list(dict.fromkeys(figure for figure, _ in rows))
    lines = ["| figure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for figure in figures:
        lines.append(f"| {figure} | " + " | ".join(cell(rows.get((figure, n), [])) for n in names) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier build's respawn binary")
    parser.add_argument("--after", default=run.RESPAWN, help="this tree's (default: target/release/respawn)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kills", type=int, default=40)
    args = parser.parse_args()
    for path in (args.before, args.after):
        if not os.access(path, os.X_OK):
            sys.exit(f"before_after: {path} is not an executable file")
    load = os.getloadavg()[0]
    rows = measure(system("before", args.before), system("after", args.after), args.runs, args.kills)
    print(f"{args.runs} runs, median (lowest–highest); load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; {run.machine().get('cpu', '')}\n")
    print(table(rows, ["before", "after", "C limit"]))


if __name__ == "__main__":
    main()
