"""How long a Node and a Python worker take from fork to Ready: the start
time a replacement adds to respawn's own, measured here as the master sees
it (fork, exec of the interpreter, the example's imports, listening, the
Ready frame on the pipe), without the master.

    python3 clients/fork_to_ready.py [RUNS]     # default 20 runs each

Prints the median and the slowest run, in milliseconds, per language.
"""

import fcntl
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = {
    "node": ["node", os.path.join(HERE, "node", "example.js")],
    "python": [sys.executable, os.path.join(HERE, "python", "example.py")],
}


def fork_to_ready(argv, listener):
    """Milliseconds from fork to the Ready frame; the worker is then stopped."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        # The child: listener at fd 3, channel at fd 4, as respawn hands
        # them. Both go far up first, so that neither dup2 overwrites the
        # other's source.
        listen, channel = (fcntl.fcntl(fd, fcntl.F_DUPFD, 20) for fd in (listener.fileno(), write_end))
        os.dup2(listen, 3)
        os.dup2(channel, 4)
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), RESPAWN_CHANNEL_FD="4")
        os.execvpe(argv[0], argv, env)
    os.close(write_end)
    frame = os.read(read_end, 4)
    took = (time.monotonic() - started) * 1000
    os.kill(pid, 15)
    os.waitpid(pid, 0)
    os.close(read_end)
    if frame != bytes([1, 1, 0, 0]):
        sys.exit(f"{argv}: no Ready frame, got {frame!r}")
    return took


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    for name, argv in WORKERS.items():
        times = [fork_to_ready(argv, listener) for _ in range(runs)]
        print(f"{name}: fork to Ready {statistics.median(times):.0f} ms median, "
              f"{max(times):.0f} ms slowest, {runs} runs ({' '.join(argv[:1])})")


if __name__ == "__main__":
    main()
