#!/usr/bin/env python3
"""Workers in any language: the example Node server under respawn, beside
the same server under Node's cluster module and the Rust demo.

    python3 bench/anylang.py [--runs 3] [--only languages|rivals] [--ports LOW-HIGH]
                             [--out FILE | --update-docs | --print]

Writes its sections ("Workers in any language", then "Beside PM2 and
gunicorn") to target/bench/anylang.md, or with --update-docs into
docs/benchmarks.md, in place, leaving the rest of the file as make bench
wrote it (bench/upgrade.py's main says more, and what --ports does); make
bench (bench/run.py) writes the same section, from the same `section` function,
reusing the figures it took for the Rust demo and Node's cluster. Then
bench/rivals.py's comparison with PM2 and gunicorn, installed from their
registries for the run, writes its own section ("Beside PM2 and
gunicorn"), which make bench carries over. `--only` runs one of the two.

The scenarios are make bench's own functions (respawn gap, crash storm,
idle cost), run for more systems: `respawn -- node clients/node/example.js`
and `respawn -- python3 clients/python/example.py` (the release binary),
beside `respawn` (the Rust demo) and `node bench/baseline/server.js` (the
cluster). Then clients/fork_to_ready.py's function times a Node and a
Python worker from fork to Ready, without a master: the program's own
start, which the gap's target allows on top of twice the Rust demo's.
"""

import argparse
import datetime
import os
import select
import shutil
import signal
import socket
import statistics
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# make bench's harness beside this file (its scenarios, systems, report
# helpers) and the clients' fork-to-Ready timer: the same code, not copies.
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "clients"))
import run  # noqa: E402
from run import RESPAWN, ROOT, System, fmt, medians, progress  # noqa: E402

TITLE = "## Workers in any language: Node and Python under respawn"
SCENARIOS = ["respawn gap", "gap steps", "crash storm", "idle cost"]
FORK_TO_READY_RUNS = 20
NODE_EXAMPLE = os.path.join(ROOT, "clients", "node", "example.js")
PYTHON_EXAMPLE = os.path.join(ROOT, "clients", "python", "example.py")
RUST, NODE, CLUSTER, PYTHON = "respawn (Rust demo)", "respawn -- node", "node cluster", "respawn -- python"


def systems():
    """{column: System or None (its interpreter is missing)}. The foreign
    workers get the flags the demo gets: --timeout 0 (the idle figure is the
    master's own wakeups), --min-uptime 0 where workers are killed on purpose."""
    node, python = shutil.which("node"), shutil.which("python3")

    def under_respawn(name, argv):
        return System(name, [RESPAWN], {"RUST_LOG": "info", "RUST_LOG_STYLE": "never"},
                      ["--timeout", "0"], ["--min-uptime", "0"], ["--", *argv])

    return {
        RUST: run.respawn_system(),
        NODE: under_respawn(NODE, [node, NODE_EXAMPLE]) if node else None,
        CLUSTER: run.baseline_system(),
        PYTHON: under_respawn(PYTHON, [python, PYTHON_EXAMPLE]) if python else None,
    }


def fork_to_ready(runs=FORK_TO_READY_RUNS):
    """{language: (median ms, slowest ms)}, or None where the interpreter is
    missing: clients/fork_to_ready.py's measurement."""
    import fork_to_ready as timer

    found = {}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        for language, argv in timer.WORKERS.items():
            if not shutil.which(argv[0]):
                found[language] = None
                continue
            times = [timer.fork_to_ready(argv, listener) for _ in range(runs)]
            found[language] = (statistics.median(times), max(times))
    return found


def gap_steps(system, kills=20):
    """Where the respawn gap goes: the kill repeated as in make bench's
    scenario, with the arrival of the master's log lines timed as well. Each
    figure is the median time from the kill to: the victim dead (its pidfd
    readable), the replacement's `spawned` line, its `ready` line, the answer.
    Node's cluster logs no spawned line."""
    server = system.start(1, *system.kill_flags)
    steps = {"dead": [], "spawned": [], "ready": [], "answered": []}
    try:
        server.ready(1)
        for _ in range(kills):
            victim = server.ready(1)[0]
            mark = len(server.log())
            pidfd = os.pidfd_open(victim)
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            select.select([pidfd], [], [], run.PATIENCE)
            steps["dead"].append(time.monotonic() - t0)
            os.close(pidfd)
            deadline = t0 + run.PATIENCE
            while time.monotonic() < deadline:
                try:
                    if run.get(server.port, "/", timeout=2) == 200:
                        break
                except OSError:
                    time.sleep(0.0005)
            steps["answered"].append(time.monotonic() - t0)
            replacement = server.ready(1)[0]  # its ready line has come
            for step in ("spawned", "ready"):
                said = [t for t, line in server.log()[mark:] if f"worker {replacement} {step}" in line]
                if said:
                    steps[step].append(said[0] - t0)
        return {f"kill → {step} ms": statistics.median(times) * 1000 if times else None
                for step, times in steps.items()}
    finally:
        server.stop()


def measure(runs=3, known=None):
    """The three scenarios for each system, `runs` times each (medians);
    `known` holds make bench's results by system name ("respawn", "node
    cluster"), reused rather than measured again."""
    known = known or {}
    functions = dict(run.SCENARIOS, **{"gap steps": gap_steps})
    results = {"runs": runs, "columns": {}, "missing": []}
    for column, system in systems().items():
        figures = results["columns"][column] = {}
        if system is None:
            results["missing"].append(column)
            continue
        for name in SCENARIOS:
            if name in known.get(system.name, {}):
                figures[name] = known[system.name][name]
                continue
            taken = []
            for i in range(runs):
                progress(f"any language, {name}: {column}, run {i + 1} of {runs}")
                try:
                    taken.append(functions[name](system))
                except Exception as err:  # a failed run is reported, not fatal
                    progress(f"any language, {name}: {column} run {i + 1} failed: {err}")
            if taken:
                figures[name] = medians(taken)
    progress(f"any language: fork to Ready, {FORK_TO_READY_RUNS} runs each of Node and Python")
    results["fork to ready"] = fork_to_ready()
    results["load average"] = os.getloadavg()[0]
    return results


def targets(results):
    """{(scenario, figure): (text, check)} for the Node server under respawn."""
    rust_gap = results["columns"][RUST].get("respawn gap", {}).get("p50 ms")
    start = (results["fork to ready"].get("node") or (None,))[0]
    found = {
        ("crash storm", "errors"): ("0", lambda v: v == 0),
        ("crash storm", "final count"): ("exactly 2", lambda v: v == 2),
    }
    if rust_gap is not None and start is not None:
        limit = 2 * rust_gap + start
        found[("respawn gap", "p50 ms")] = (
            f"≤ 2 × {fmt(rust_gap)} + {fmt(start)} (Node's fork to Ready) = {fmt(limit)}",
            lambda v: v <= limit)
    return found


def failed_targets(results):
    node = results["columns"][NODE]
    return [key for key, (_, check) in targets(results).items()
            if (node.get(key[0]) or {}).get(key[1]) is not None and not check(node[key[0]][key[1]])]


ALONE = "`make bench-any` (`python3 bench/anylang.py`), which rewrites this section alone"


def section(results, command=ALONE):
    columns = results["columns"]

    def paragraph(text):
        return textwrap.fill(text, 96, break_on_hyphens=False).splitlines() + [""]

    lines = [TITLE, ""]
    lines += paragraph(
        f"Measured on {datetime.date.today().isoformat()} by {command}; each figure is the median of "
        f"{results['runs']} runs; the machine's load average was {results['load average']:.1f} at the end "
        f"({os.cpu_count()} cores). The example servers of `clients/`, with the demo's routes, run under "
        "the release binary: `respawn --timeout 0 -- node clients/node/example.js` and `... -- python3 "
        "clients/python/example.py`, beside the Rust demo and the same Node server under Node's cluster "
        "module (`bench/baseline/server.js`), in make bench's own scenarios (see How each figure is "
        "taken): the respawn gap (1 worker, killed 50 times), the crash storm (2 workers, `GET /crash` "
        "every 250 ms under wrk -c32 on `/`) and the idle cost (8 workers). As for the demo, the "
        "foreign workers run with `--min-uptime 0` where workers are killed on purpose (the gap). "
        "*Gap steps* kills the only worker 20 times more, as the gap does, and times the arrival of the "
        "master's log lines too: the median time from the kill to the victim dead (its pidfd readable), "
        "to its replacement's `spawned` line, to its `ready` line, and to the answer.")
    starts = results["fork to ready"]
    said = []
    for language, label in (("node", "Node"), ("python", "Python")):
        f = starts.get(language)
        said.append(f"{label} {fmt(f[0])} ms median ({fmt(f[1])} ms slowest)" if f else f"{label}: not found")
    lines += paragraph(
        f"**Fork to Ready**, the program's own start (clients/fork_to_ready.py's function, "
        f"{FORK_TO_READY_RUNS} runs each, without a master: fork, exec of the interpreter, the example's "
        f"imports, the Ready frame on the pipe): {'; '.join(said)}. A replacement worker adds it to "
        "respawn's own gap; the listening socket stays open in the master meanwhile, so a client "
        "waits in its queue rather than being refused.")
    if results["missing"]:
        lines += paragraph(f"**Not found**: {', '.join(results['missing'])}: those columns are empty.")
    names = list(columns)
    lines += [
        "| scenario | figure | " + " | ".join(names) + " | node: respawn / cluster | target (respawn -- node) | holds |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    checks = targets(results)
    for scenario in SCENARIOS:
        keys = []
        for name in names:
            for k in columns[name].get(scenario) or {}:
                if k not in keys:
                    keys.append(k)
        for k in keys:
            values = {name: (columns[name].get(scenario) or {}).get(k) for name in names}
            mine, theirs = values[NODE], values[CLUSTER]
            ratio = (f"{mine / theirs:.2f}" if isinstance(mine, (int, float)) and isinstance(theirs, (int, float))
                     and theirs else "")
            target, check = checks.get((scenario, k), ("", None))
            holds = "" if check is None or mine is None else ("yes" if check(mine) else "**no**")
            lines.append(f"| {scenario} | {k} | " + " | ".join(fmt(values[n]) for n in names)
                         + f" | {ratio} | {target} | {holds} |")
    lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario and system")
    parser.add_argument("--only", choices=["languages", "rivals"],
                        help="measure only the languages' table or only the comparison with PM2 and gunicorn")
    # Where the sections go and which ports are used: as bench/upgrade.py.
    import upgrade
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=os.path.join(ROOT, "target", "bench", "anylang.md"),
                       help="the file to write the sections to, in place of its own if it has them "
                            "(default: target/bench/anylang.md)")
    where.add_argument("--update-docs", action="store_true",
                       help="write the sections into docs/benchmarks.md, in place")
    where.add_argument("--print", action="store_true", help="print the sections; write nothing")
    parser.add_argument("--ports", type=upgrade.port_range, metavar="LOW-HIGH",
                        help="the languages' masters listen on free ports of this range (default: any "
                             "free port)")
    args = parser.parse_args()
    if args.update_docs:
        args.out = upgrade.DOCS
    if args.ports:
        upgrade.PORTS = args.ports
        run.free_port = upgrade.pick_port  # what run.System.start listens on
    if not os.path.exists(RESPAWN):
        sys.exit(f"anylang: {RESPAWN} is missing: run 'make bench-any', which builds it")
    if not shutil.which("wrk"):
        sys.exit("anylang: wrk is missing: run 'make bench', which installs it")
    import rivals

    failed = False
    parts = []
    if args.only != "rivals":
        results = measure(args.runs)
        failed = bool(failed_targets(results))
        parts.append((section(results), TITLE))
    if args.only != "languages":
        progress("rivals: respawn beside PM2 and gunicorn (bench/rivals.py)")
        parts.append((rivals.section(rivals.measure()), rivals.TITLE))
    for text, title in parts:
        if args.print:
            sys.stdout.write(text)
        else:
            upgrade.write_section(args.out, text, title)
            progress(f"any language: wrote the section {title[3:]!r} of {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
