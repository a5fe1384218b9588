"""respawn.py: make a Python HTTP handler a worker of respawn. Standard
library only; Python 3.8 or newer.

    import respawn, sys
    from http.server import BaseHTTPRequestHandler

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self): ...

    sys.exit(respawn.serve(Hello))

respawn (the master) forks and executes this program once per worker, its
listening sockets already bound, at fd 3, 4, ... (LISTEN_FDS, as systemd
passes them), and the write end of a pipe to the master at fd
RESPAWN_CHANNEL_FD. serve() accepts on those fds and keeps the contract of
docs/protocol.md on the pipe:

  Ready       before the first accept: the master stops counting the start.
  Busy, Idle  at each request's start and end: the master's --timeout finds
              a handler stuck on one request, and counts requests from these.
  Suicide     "do not send me more, replace me now", sent *before* the worker
              stops accepting, so that the replacement is forked and
              listening while this one finishes its answer.

A master that stops reading (stalled, stopped) never holds the worker up:
the pipe is non-blocking, marks it has no room for are dropped and counted,
and Ready and Suicide wait for room (_Channel says how).

One request at a time, then the connection is closed, as the Rust worker
does. A worker is one process with one request in flight; respawn's N
workers are the concurrency. That is honest about Python: threads share one
interpreter lock, so they buy waiting, not computing; and it keeps --timeout
meaningful: a handler stuck in a loop stops the worker from starting
anything else, which is what the master watches for, where a threaded
server would go on accepting beside a thread spinning forever. The price: a
slow client holds a worker, so the head must arrive within HEAD_TIMEOUT
(unless the handler class sets its own `timeout`), and a proxy in front
should buffer requests, as for any prefork server.

On an exception a handler does not catch, the worker says Suicide first,
answers the request with a 500 (if no header went out yet; else it cuts
the connection), and exits 70. Not started by respawn (no LISTEN_FDS for
this pid), serve() says so and returns 3, the code of a worker that could
not set up: a worker that bound a port of its own would look healthy and
never hand over. Exit codes: 0 stopped (SIGTERM, SIGQUIT, or its share of
RESPAWN_MAX_REQUESTS served), 70 after an uncaught exception, 3 could not
set up.
"""

import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback

VERSION = 1
READY, SUICIDE, BUSY, IDLE = 1, 2, 3, 4
# A frame is at most 4 + 240 = 244 bytes, under PIPE_BUF (4096): one write(2)
# of it is atomic, so frames never interleave nor arrive cut.
MAX_PAYLOAD = 240

STOPPED, SETUP_FAILED, CRASHED = 0, 3, 70

# Seconds a connection may stay silent while its request head comes in (and
# while its answer goes out): one request at a time, a client that sends
# nothing must not hold the worker for long.
HEAD_TIMEOUT = 5.0

# Seconds a worker that is done waits at most for room in the pipe for a
# Ready or Suicide it still owes the master (a stopped master's), before it
# exits without it: the master learns of the exit anyway.
OWED_AT_EXIT = 5.0
# Lines about dropped marks: at most one a second, the rest counted.
DROPPED_LINE_EVERY = 1.0


def frame(kind, text=""):
    """One frame of the channel: version, kind, payload length (u16 LE),
    payload. The text is cut to 240 bytes at the start of a character, never
    inside one, so the master always gets valid UTF-8."""
    payload = text.encode("utf-8", "replace")
    if len(payload) > MAX_PAYLOAD:
        end = MAX_PAYLOAD
        # 10xxxxxx is a continuation byte: back up to the character's first.
        while end > 0 and payload[end] & 0xC0 == 0x80:
            end -= 1
        payload = payload[:end]
    return bytes([VERSION, kind]) + len(payload).to_bytes(2, "little") + payload


def serve(handler_class):
    """Serves `handler_class` (a BaseHTTPRequestHandler subclass) on every
    listener respawn handed over, until told to stop; returns the exit code.
    Call it from the main thread: it installs signal handlers."""
    pid = os.getpid()
    handed = _inherited(pid)
    if handed is None:
        _log(
            f"worker {pid}: not started by respawn (no LISTEN_FDS for pid {pid}); "
            f"run it as: respawn -- python3 {sys.argv[0] or 'your_server.py'}"
        )
        return SETUP_FAILED
    fds, channel_fd, share = handed
    listeners = []
    for fd in fds:
        try:
            listeners.append(socket.socket(fileno=fd))
        except OSError as err:
            _log(f"worker {pid}: listening on fd {fd}: {err}")
            return SETUP_FAILED
    return _Worker(pid, listeners, channel_fd, share, handler_class).run()


def _inherited(pid):
    """(listener fds, channel fd or None, share of requests or 0), or None if
    nothing was handed to this process. The variables are removed, as
    sd_listen_fds does: a program this one starts must not take our fds."""
    env = os.environ
    count = _number(env.get("LISTEN_FDS"))
    for_us = env.get("LISTEN_PID") == str(pid) and count > 0
    channel = _number(env.get("RESPAWN_CHANNEL_FD"), None)
    share = _number(env.get("RESPAWN_MAX_REQUESTS"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "RESPAWN_CHANNEL_FD"):
        env.pop(name, None)
    if not for_us:
        return None
    return list(range(3, 3 + count)), channel, share


def _number(text, otherwise=0):
    try:
        value = int(text)
    except (TypeError, ValueError):
        return otherwise
    return value if value >= 0 else otherwise


def _log(line):
    print(line, file=sys.stderr, flush=True)


class _Worker:
    """The accept loop, the channel and the stop flag. Handlers see it as
    `self.server` (with `pid` and `slot` for their logs)."""

    def __init__(self, pid, listeners, channel_fd, share, handler_class):
        self.pid = pid
        self.slot = os.environ.get("RESPAWN_SLOT", "")
        self.channel = _Channel(pid, channel_fd)
        self.share = share
        self.started = 0
        self.stopping = False
        self.exit_code = STOPPED
        self.suicide_sent = False
        self.handler_class = _guarded(handler_class)
        self.listeners = listeners
        for listener in self.listeners:
            # Non-blocking: another worker may take the connection between
            # our wake-up and our accept, and a blocking accept would then
            # wait for the next one with a stop request pending.
            listener.setblocking(False)
            # Not for the programs a handler may start.
            listener.set_inheritable(False)

    def send(self, kind, text=""):
        self.channel.send(kind, text)

    def suicide(self, reason):
        if not self.suicide_sent:
            self.send(SUICIDE, reason)
        self.suicide_sent = True

    def stop(self, code):
        # A crash stays a crash: 70 wins over a later stop's 0.
        self.exit_code = max(self.exit_code, code)
        self.stopping = True

    def run(self):
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        # The handler only records the request: a handler in the middle of
        # a request finishes it (sleeps and reads resume after a signal),
        # and the loop sees the flag before its next accept. The wakeup fd
        # ends a select() that is waiting for a connection.
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(signum, lambda *_: self.stop(STOPPED))
        # A master may start workers with them blocked, so that a stop sent
        # before this point waits for the handler instead of killing us.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGQUIT})
        # HUP, TTIN, TTOU and USR2 steer the master, and arrive ignored;
        # Python leaves that so, and this keeps it so under a launcher that
        # did not ignore them (sent to the group, HUP would kill the worker
        # and TTIN stop it).
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_IGN)

        selector = selectors.DefaultSelector()
        for listener in self.listeners:
            selector.register(listener, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        self.send(READY)
        try:
            return self.accept_until_stopped(selector, wake_r)
        finally:
            self.channel.close()

    def accept_until_stopped(self, selector, wake_r):
        # Frames the full pipe refused are written between requests, when
        # select says it has room again.
        watching = None
        while not self.stopping:
            wanted = self.channel.fd if self.channel.waiting() else None
            if wanted != watching:
                if watching is not None:
                    selector.unregister(watching)
                if wanted is not None:
                    selector.register(wanted, selectors.EVENT_WRITE)
                watching = wanted
            for key, _ in selector.select():
                if key.fileobj is wake_r:
                    os.read(wake_r, 512)
                    continue
                if key.fileobj is watching:
                    self.channel.flush()
                    continue
                # The stop may have come with this select's wake-up: once
                # asked, not one more accept (the master already counts this
                # worker out; its replacement takes the connection).
                if self.stopping:
                    break
                try:
                    conn, address = key.fileobj.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # another worker took it, or the client left
                except OSError as err:
                    _log(f"worker {self.pid}: accepting: {err}")
                    return SETUP_FAILED
                self.serve_one(conn, address)
                # Stop requested or share served: nothing more is accepted.
                break
        return self.exit_code

    def serve_one(self, conn, address):
        conn.setblocking(True)
        # A Unix socket's peer has no address; http.server wants a pair.
        if not isinstance(address, tuple):
            address = ("unix", 0)
        try:
            self.handler_class(conn, address, self)
        except ConnectionError:
            pass  # the client left: not the program's fault
        finally:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()

    def begin(self, handler):
        """A request starts: marked, and counted against the share."""
        self.started += 1
        host, port = handler.client_address[:2]
        host = f"[{host}]" if ":" in host else host
        peer = f" from {host}:{port}" if port else ""
        self.send(BUSY, f"{handler.requestline}{peer}")
        if self.share and self.started == self.share:
            # Handed over first, so the replacement starts while this
            # request is served.
            self.suicide(f"served its {self.share} requests")
            self.stop(STOPPED)


class _Channel:
    """The pipe to the master, written so that the master can never hold
    this worker up. A master that stalls (a re-exec pauses it up to 1.5 s,
    a SIGSTOP for as long as it lasts) reads nothing; once the pipe's 64 KiB
    are full (about 1,500 requests' marks), a blocking write would stop the
    worker in the middle of a request until the master read again. So the
    fd is non-blocking, and a frame the full pipe refuses (EAGAIN) waits
    here instead, while the worker serves on:

    - Ready and Suicide are never lost: they wait in order, and go first.
    - Of Busy and Idle, only the newest waits (one slot): each one it
      replaces is dropped and counted. Once the pipe has room (the accept
      loop watches for it between requests), the newest tells the master
      where the worker is now, and one line says how many it missed.

    Every frame is written with one write(2). A frame is at most 244 bytes,
    under PIPE_BUF (4096), so a non-blocking write of it to a pipe puts it
    in whole or fails with EAGAIN, never in part: a cut frame would be
    garbage to the master, and this code relies on the kernel for that."""

    def __init__(self, pid, fd):
        self.pid = pid
        self.fd = fd
        self.owed = []  # Ready and Suicide frames not written yet, in order
        self.newest = None  # the newest Busy or Idle not written yet
        self.dropped = 0  # marks replaced before they were written, not said yet
        self.said_at = None
        if fd is not None:
            try:
                # Not for the programs a handler may start.
                os.set_inheritable(fd, False)
                os.set_blocking(fd, False)
            except OSError as err:
                self.fail(err)

    def waiting(self):
        return self.fd is not None and (bool(self.owed) or self.newest is not None)

    def send(self, kind, text=""):
        if self.fd is None:
            return
        data = frame(kind, text)
        if not self.owed and self.newest is None:
            # Nothing waits: straight to the pipe, as a rule (twice a
            # request; the queue's bookkeeping would cost as much again).
            try:
                os.write(self.fd, data)
            except BlockingIOError:
                pass  # full: it waits below
            except OSError as err:
                self.fail(err)
                return
            else:
                if self.dropped:
                    self.say_dropped()
                return
        if kind in (BUSY, IDLE):
            if self.newest is not None:
                self.dropped += 1
            self.newest = data
        else:
            self.owed.append(data)
        self.flush()

    def flush(self):
        """Writes what waits, in order, as far as the pipe takes it."""
        while self.waiting():
            data = self.owed[0] if self.owed else self.newest
            try:
                os.write(self.fd, data)
            except BlockingIOError:
                return  # full: the accept loop calls again when it has room
            except OSError as err:
                self.fail(err)
                return
            if self.owed:
                self.owed.pop(0)
            else:
                self.newest = None
        self.say_dropped()

    def fail(self, err):
        """The master is gone, or the fd is not a pipe: say it once, and
        serve on, the best this worker can still do."""
        _log(f"worker {self.pid}: writing to the master: {err}")
        self.fd = None

    def say_dropped(self, at_exit=False):
        """`worker 4321: 1520 Busy/Idle marks dropped: ...`, at most once a
        second (the next line counts the rest), and at exit."""
        if not self.dropped:
            return
        now = time.monotonic()
        if not at_exit and self.said_at is not None and now - self.said_at < DROPPED_LINE_EVERY:
            return
        marks = "mark" if self.dropped == 1 else "marks"
        _log(f"worker {self.pid}: {self.dropped} Busy/Idle {marks} dropped: the master was not reading its pipe")
        self.dropped = 0
        self.said_at = now

    def close(self):
        """At exit: waits up to OWED_AT_EXIT for room for a Ready or Suicide
        still owed, or says what the master was not told."""
        deadline = time.monotonic() + OWED_AT_EXIT
        while self.fd is not None and self.owed:
            left = deadline - time.monotonic()
            if left <= 0:
                kinds = " and ".join("Ready" if data[1] == READY else "Suicide" for data in self.owed)
                _log(
                    f"worker {self.pid}: the master read nothing for {OWED_AT_EXIT:g} s; "
                    f"exiting without sending it {kinds}"
                )
                break
            select.select([], [self.fd], [], left)
            self.flush()
        if self.newest is not None:
            self.dropped += 1
        self.say_dropped(at_exit=True)


def _guarded(handler_class):
    """`handler_class` with the worker's duties around each request: Busy
    and Idle, one request per connection, and what an uncaught exception
    does. A subclass made here, so the program's class stays as written."""

    class Guarded(_Guard, handler_class):
        pass

    Guarded.__name__ = handler_class.__name__
    Guarded.__qualname__ = handler_class.__qualname__
    if getattr(handler_class, "timeout", None) is None:
        Guarded.timeout = HEAD_TIMEOUT
    return Guarded


class _Guard:
    """Mixed in before the program's BaseHTTPRequestHandler subclass."""

    _busy = False
    _headers_out = False
    _connection_said = False

    def parse_request(self):
        parsed = super().parse_request()
        if parsed:
            self._busy = True
            self.server.begin(self)
        return parsed

    def send_header(self, keyword, value):
        if keyword.lower() == "connection":
            self._connection_said = True
        super().send_header(keyword, value)

    def end_headers(self):
        # The connection closes after this answer: the client is told.
        if not self._connection_said:
            self.send_header("Connection", "close")
        super().end_headers()

    def flush_headers(self):
        self._headers_out = True
        super().flush_headers()

    def handle_one_request(self):
        worker = self.server
        try:
            super().handle_one_request()
        except ConnectionError:
            pass  # the client left: not the program's fault
        except Exception as exc:  # what the handler did not catch
            message = str(exc) or type(exc).__name__
            # First, so that the master forks the replacement while this
            # one answers.
            worker.suicide(f"uncaught {type(exc).__name__}: {message}")
            worker.stop(CRASHED)
            self._answer_crash(message)
            # Last: a slow log must hold up neither the handover nor the
            # answer.
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
            _log(f"worker {worker.pid} raised {type(exc).__name__}: {message}{where}; it exits")
        finally:
            # One request per connection: a kept-alive client would hold
            # the worker between its requests.
            self.close_connection = True
            if self._busy:
                self._busy = False
                worker.send(IDLE)

    def _answer_crash(self, message):
        """A 500 if no header went out yet; else the connection is cut
        (closed by the caller), the only honest end of a half answer."""
        if self._headers_out:
            return
        body = f"worker {self.server.pid} panicked: {message}\n".encode("utf-8", "replace")
        self._headers_buffer = []
        try:
            self.send_response(500)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass  # the client left
