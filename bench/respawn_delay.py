#!/usr/bin/env python3
"""Issue 3 figure: kill -9 a worker, time until the master logs its
replacement ready (50 kills, 2 workers). Run from the repository root after
`cargo build --release -p respawn-master --features demo`:

    python3 bench/respawn_delay.py
"""
import subprocess, time, os, re, signal, statistics, sys
p = subprocess.Popen(["target/release/respawn","--workers","2","--listen","127.0.0.1:0","--min-uptime","0"], stderr=subprocess.PIPE, text=True, bufsize=1, env=dict(os.environ, RUST_LOG="info"))
ready = []
def line():
    l = p.stderr.readline(); return l
while len(ready) < 2:
    l = line()
    m = re.search(r"worker (\d+) ready", l)
    if m: ready.append(int(m.group(1)))
gaps=[]; loglines=[]
for i in range(50):
    victim = ready.pop(0)
    t0 = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    while True:
        l = line(); 
        m = re.search(r"worker (\d+) ready", l)
        if m:
            gaps.append((time.perf_counter()-t0)*1000); ready.append(int(m.group(1))); break
p.send_signal(signal.SIGINT); p.wait()
gaps.sort()
print("kill -9 -> replacement Ready logged, 50 kills: p50 %.3f ms, p90 %.3f ms, max %.3f ms" % (statistics.median(gaps), gaps[44], gaps[-1]))
