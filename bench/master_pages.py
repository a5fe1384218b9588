#!/usr/bin/env python3
"""The master's memory with 8 workers, for builds side by side.

    python3 bench/master_pages.py [--runs 5] BINARY [BINARY ...]

Starts each binary in turn (`--workers 8`, 100 requests, 1 s idle), `--runs`
times, the binary's page cache emptied first (fsync, then
POSIX_FADV_DONTNEED: the file read back from disk, as after a boot, not the
large folios a fresh copy leaves), and prints, per binary, the medians and
ranges of: the pages of the binary that the master maps and no worker maps
(from /proc/PID/pagemap: the same page frame mapped by a worker is shared),
the master's private memory and its PSS (smaps_rollup). Root is needed to
read page frame numbers. bench/notes.md (Memory) quotes it: the DT_RELR link
measured against `RESPAWN_RELR=0`.
"""

import argparse
import os
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: start, get, smaps readers)


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def frames(pid, path):
    """{page of the file: page frame} for the pages of `path` that `pid` maps."""
    found = {}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or fields[5] != path:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            offset = int(fields[2], 16)
            pagemap.seek(start // 4096 * 8)
            data = pagemap.read((end - start) // 4096 * 8)
            for i in range(len(data) // 8):
                entry = struct.unpack_from("<Q", data, i * 8)[0]
                if entry >> 63:  # present
                    found[offset // 4096 + i] = entry & ((1 << 55) - 1)
    return found


def once(binary):
    evict(binary)
    system = run.System("respawn", [binary], {"RUST_LOG": "info", "RUST_LOG_STYLE": "never"}, ["--timeout", "0"])
    server = system.start(8)
    try:
        workers = server.ready(8)
        for _ in range(100):
            run.get(server.port)
        time.sleep(1)
        exe = os.path.realpath(f"/proc/{server.pid}/exe")
        master = frames(server.pid, exe)
        theirs = set()
        for pid in workers:
            theirs |= set(frames(pid, exe).values())
        alone = sum(1 for frame in master.values() if frame not in theirs)
        return alone, run.private_kib(server.pid), run.pss_kib(server.pid)
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args()
    results = {binary: [] for binary in args.binaries}
    for _ in range(args.runs):
        for binary in args.binaries:  # in turn, so that the host's moods fall on both
            results[binary].append(once(binary))
    for binary, rows in results.items():
        for i, name in enumerate(["pages only the master maps", "private kB", "PSS kB"]):
            values = [row[i] for row in rows]
            print(f"{binary}: {name}: median {statistics.median(values)} ({min(values)}-{max(values)})")


if __name__ == "__main__":
    main()
