#!/usr/bin/env python3
"""Issue 4 figures: forks a crash loop costs before the master gives up,
the time from a hang to its replacement (--timeout 1), and the idle
master's wakeups per minute with and without --timeout. Run from the
repository root after a release build (about 100 s):

    python3 bench/policy_figures.py
"""
import subprocess, time, os, re, signal, socket, statistics
BIN="target/release/respawn"
def start(args):
    p = subprocess.Popen([BIN,"--listen","127.0.0.1:0"]+args, stderr=subprocess.PIPE, text=True, bufsize=1, env=dict(os.environ, RUST_LOG="info"))
    port=None
    while port is None:
        m = re.search(r"listening on 127.0.0.1:(\d+)", p.stderr.readline()); port = m and int(m.group(1))
    return p, port
# 1. crash loop: forks before give-up
for args in (["--workers","2","--demo-fail-start"], ["--workers","2","--demo-fail-start","--max-restarts","5"], ["--workers","4","--demo-fail-start"]):
    t0=time.monotonic(); p, port = start(args); out = p.stderr.read(); p.wait(); t=time.monotonic()-t0
    print("crash loop %-45s exit %d, %d forks, gave up after %.2f s" % (" ".join(args), p.returncode, out.count(" spawned"), t))
# 2. hang -> killed -> replacement ready
p, port = start(["--workers","2","--timeout","1"])
lines=[]
import threading
def reader():
    for l in p.stderr: lines.append((time.monotonic(), l))
threading.Thread(target=reader, daemon=True).start()
while sum(1 for _,l in lines if l.rstrip().endswith(" ready")) < 2: time.sleep(0.01)
gaps=[]; kills=[]
for i in range(5):
    s = socket.create_connection(("127.0.0.1", port)); t0=time.monotonic(); s.sendall(b"GET /hang HTTP/1.1\r\n\r\n")
    n=len(lines)
    while True:
        hung=[(t,l) for t,l in lines[n:] if " hung " in l]
        if hung:
            ready=[(t,l) for t,l in lines[n:] if l.rstrip().endswith(" ready")]
            if ready: break
        time.sleep(0.005)
    kills.append(hung[0][0]-t0); gaps.append(ready[0][0]-t0); s.close()
p.send_signal(signal.SIGINT); p.wait()
print("hang (--timeout 1): killed after %s s; replacement ready after %s s" % (" ".join("%.2f"%k for k in kills), " ".join("%.2f"%g for g in gaps)))
# 3. idle wakeups per minute
def wakeups(pid): return int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", open("/proc/%d/status"%pid).read()).group(1))
for args in (["--timeout","0"], [], ["--timeout","1"]):
    p, port = start(["--workers","2"]+args); time.sleep(0.5)
    a=wakeups(p.pid); time.sleep(30); b=wakeups(p.pid)
    p.send_signal(signal.SIGINT); p.wait()
    print("idle master %-14s %5.0f wakeups/min (%d in 30 s)" % (" ".join(args) or "(default 60)", (b-a)*2, b-a))
