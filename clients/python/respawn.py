"""respawn.py: make a Python HTTP server a worker of respawn. Standard
library only; Python 3.8 or newer. Installed with `pip install
clients/python` (the package respawn-worker), or copied beside a program.

A WSGI application (Flask, Django, Bottle, Falcon, any PEP 3333 callable):

    import respawn, sys
    from myapp import app

    sys.exit(respawn.serve_wsgi(app))

A handler of the standard library's http.server:

    import respawn, sys
    from http.server import BaseHTTPRequestHandler

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self): ...

    sys.exit(respawn.serve(Hello))

respawn (the master) forks and executes this program once per worker, its
listening sockets already bound, at fd 3, 4, ... (LISTEN_FDS, as systemd
passes them), and the write end of a pipe to the master at fd
RESPAWN_CHANNEL_FD. serve() and serve_wsgi() accept on those fds and keep
the contract of docs/protocol.md on the pipe:

  Ready       before the first accept: the master stops counting the start.
  Busy, Idle  at each request's start and end: the master's --timeout finds
              a handler stuck on one request, and counts requests from these.
  Suicide     "do not send me more, replace me now", sent *before* the worker
              stops accepting, so that the replacement is forked and
              listening while this one finishes its answer.

A master that stops reading (stalled, stopped) never holds the worker up:
the pipe is non-blocking, marks it has no room for are dropped and counted,
and Ready and Suicide wait for room (_Channel says how).

One request at a time, then the connection is closed (every answer says
`Connection: close`), as the Rust worker does and as gunicorn's sync
workers do. A worker is one process with one request in flight; respawn's
N workers are the concurrency. That is honest about Python: threads share
one interpreter lock, so they buy waiting, not computing; and it keeps
--timeout meaningful: a handler stuck in a loop stops the worker from
starting anything else, which is what the master watches for, where a
threaded server would go on accepting beside a thread spinning forever.
Keeping connections alive would cost more than it saves here: a worker
holding a client's idle connection is the only one that can serve its next
request, which then waits behind whatever that worker is doing while the
others idle; a new connection goes to the shared queue, which any free
worker takes from. The price: a slow client holds a worker, so the head
must arrive within HEAD_TIMEOUT (unless the handler class sets its own
`timeout`), and a proxy in front should buffer requests, as for any
prefork server.

No request the worker received is lost to its closing: a client told
`Connection: close` sends nothing more on that connection, and what it sent
anyway (a body the handler did not read, a pipelined request) is read and
dropped for up to LINGER seconds, in the accept loop, before the close.
close(2) with input unread would send a reset, which can destroy the answer
still on its way to the client. A worker that stops (SIGTERM, a crash, its
share served) stops accepting, answers the request in flight, and gives
such connections LINGER_AT_EXIT more before it exits.

On an exception that nothing caught (a handler's, or one that escapes the
WSGI application: a framework such as Flask answers its own 500s, and those
stay its own), the worker says Suicide first, answers the request with a
500 (if no header went out yet; else it cuts the connection), and exits 70.
Not started by respawn (no LISTEN_FDS for this pid), serve() says so and
returns 3, the code of a worker that could not set up: a worker that bound
a port of its own would look healthy and never hand over. Exit codes: 0
stopped (SIGTERM, SIGQUIT, or its share of RESPAWN_MAX_REQUESTS served), 70
after an uncaught exception, 3 could not set up.
"""

import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler

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

# Seconds a closed connection whose client sent more than was read is
# drained before it is closed (see the module's docs), and how many such
# connections are held at most (the oldest is closed first). The worker
# serves on meanwhile: the accept loop drains them.
LINGER = 2.0
MAX_LINGERING = 64
# Seconds a worker that stops gives those connections at most, after its
# last answer: enough for a client on the same network to read the answer
# and close; a worker that stops is replaced already, so this delays only
# its exit.
LINGER_AT_EXIT = 0.25


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
    Call it from the main thread: it installs signal handlers. A class that
    cannot work here (one that reads attributes of a socketserver server
    from self.server, such as wsgiref's WSGIRequestHandler) raises
    TypeError at once, before anything is served."""
    why = _unservable(handler_class)
    if why:
        raise TypeError(why)
    return _serve(handler_class)


def serve_wsgi(app):
    """Serves the WSGI application `app` (PEP 3333: Flask's app, Django's
    get_wsgi_application(), any callable app(environ, start_response)) on
    every listener respawn handed over, one request at a time, until told
    to stop; returns the exit code. An exception that escapes `app` (or its
    iterable) is uncaught: Suicide, a 500, exit 70. A framework that turns
    its routes' exceptions into 500s (Flask, Django) keeps them: the worker
    serves on."""
    if isinstance(app, type) and issubclass(app, BaseHTTPRequestHandler):
        raise TypeError(
            f"respawn.serve_wsgi({app.__name__}): that is an http.server handler class, "
            f"not a WSGI application: serve it with respawn.serve({app.__name__})"
        )
    if not callable(app):
        raise TypeError(
            f"respawn.serve_wsgi takes a WSGI application, a callable "
            f"app(environ, start_response), not {type(app).__name__}"
        )

    class Wsgi(_WsgiHandler):
        application = staticmethod(app)

    return _serve(Wsgi)


def _serve(handler_class):
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


# What a handler finds as self.server, besides pid and slot: a _Worker, not
# a socketserver server.
_NOT_A_SERVER = (
    "a handler's self.server is the respawn worker (pid, slot), not a "
    "socketserver server; a WSGI application is served with respawn.serve_wsgi(app)"
)


def _unservable(handler_class):
    """Why serve() cannot serve `handler_class`, or None. A handler that
    reads from self.server what a worker does not have would fail every
    request (`'_Worker' object has no attribute 'base_environ'`) and take
    its worker with it, forever: better refused before the first fork
    serves, with what to call instead."""
    if not (isinstance(handler_class, type) and issubclass(handler_class, BaseHTTPRequestHandler)):
        shown = getattr(handler_class, "__name__", type(handler_class).__name__)
        if callable(handler_class) and not isinstance(handler_class, type):
            return (
                f"respawn.serve({shown}): serve takes a BaseHTTPRequestHandler subclass; "
                f"a WSGI application (Flask, Django, any app(environ, start_response)) "
                f"is served with respawn.serve_wsgi(app)"
            )
        return f"respawn.serve({shown}): serve takes a BaseHTTPRequestHandler subclass"
    name = handler_class.__name__
    # Only a program that imported wsgiref can pass its handler: no import here.
    wsgiref = sys.modules.get("wsgiref.simple_server")
    if wsgiref is not None and issubclass(handler_class, wsgiref.WSGIRequestHandler):
        return (
            f"respawn.serve({name}): wsgiref's WSGIRequestHandler needs a wsgiref server "
            f"(base_environ, get_app), which a respawn worker is not: serve the "
            f"application itself with respawn.serve_wsgi(app)"
        )
    for method, attribute in _server_reads(handler_class):
        if not hasattr(_Worker, attribute):
            return (
                f"respawn.serve({name}): {method} reads self.server.{attribute}, which a "
                f"respawn worker does not have: {_NOT_A_SERVER}"
            )
    return None


def _server_reads(handler_class):
    """(method, attribute) for each `self.server.<attribute>` that the
    methods of `handler_class` and its bases above http.server's read, found
    in their bytecode (nested functions included). A read written another
    way (getattr, a local alias) is not seen here; _Worker.__getattr__ says
    the same at the request that makes it."""
    import dis

    # http.server's own classes read nothing from self.server.
    known = set(BaseHTTPRequestHandler.__mro__)

    def reads(code):
        previous = None
        for instruction in dis.get_instructions(code):
            if (
                previous is not None
                and previous.opname == "LOAD_ATTR"
                and previous.argval == "server"
                and instruction.opname in ("LOAD_ATTR", "LOAD_METHOD")
            ):
                yield instruction.argval
            previous = instruction
        for const in code.co_consts:
            if hasattr(const, "co_code"):
                yield from reads(const)

    for klass in handler_class.__mro__:
        if klass in known:
            continue
        for name, member in vars(klass).items():
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            code = getattr(function, "__code__", None)
            if code is not None:
                for attribute in reads(code):
                    yield f"{klass.__name__}.{name}", attribute


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
    # One write for the line and its newline: print() makes two, and the
    # master's lines on the same stderr can land between them.
    data = (line + "\n").encode("utf-8", "replace")
    try:
        sys.stderr.flush()
        os.write(2, data)
    except OSError:
        pass


class _Worker:
    """The accept loop, the channel, the stop flag and the connections that
    linger. Handlers see it as `self.server` (with `pid` and `slot` for
    their logs)."""

    # Every attribute a worker has: serve() refuses a handler class that
    # reads another from self.server (see _unservable).
    __slots__ = (
        "pid",
        "slot",
        "channel",
        "share",
        "started",
        "stopping",
        "exit_code",
        "suicide_sent",
        "handler_class",
        "listeners",
        "selector",
        "lingering",
    )

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
        self.selector = None
        # Closed connections still drained: {socket: when it is closed at the latest}.
        self.lingering = {}
        self.listeners = listeners
        for listener in self.listeners:
            # Non-blocking: another worker may take the connection between
            # our wake-up and our accept, and a blocking accept would then
            # wait for the next one with a stop request pending.
            listener.setblocking(False)
            # Not for the programs a handler may start.
            listener.set_inheritable(False)

    def __getattr__(self, name):
        # Called only for what a worker does not have: a handler that reads
        # a socketserver server's attribute in a way _unservable missed.
        raise AttributeError(f"'_Worker' object has no attribute {name!r}: {_NOT_A_SERVER}")

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

    def crash(self, exc):
        """The handover for an exception nothing caught, first, so that the
        master forks the replacement while this worker answers; returns the
        message for say_crash."""
        message = str(exc) or type(exc).__name__
        self.suicide(f"uncaught {type(exc).__name__}: {message}")
        self.stop(CRASHED)
        return message

    def say_crash(self, exc, message):
        # Last: a slow log must hold up neither the handover nor the answer.
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        _log(f"worker {self.pid} raised {type(exc).__name__}: {message}{where}; it exits")

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

        self.selector = selectors.DefaultSelector()
        for listener in self.listeners:
            self.selector.register(listener, selectors.EVENT_READ)
        self.selector.register(wake_r, selectors.EVENT_READ)
        self.send(READY)
        try:
            code = self.accept_until_stopped(wake_r)
        except Exception as exc:
            # The server itself failed (a handler's setup, say, outside the
            # request the guard watches): the same handover, but no answer,
            # since what went out already is unknown.
            self.say_crash(exc, self.crash(exc))
            code = self.exit_code
        try:
            self.linger_at_exit()
        finally:
            self.channel.close()
        return code

    def accept_until_stopped(self, wake_r):
        # Frames the full pipe refused are written between requests, when
        # select says it has room again.
        watching = None
        while not self.stopping:
            wanted = self.channel.fd if self.channel.waiting() else None
            if wanted != watching:
                if watching is not None:
                    self.selector.unregister(watching)
                if wanted is not None:
                    self.selector.register(wanted, selectors.EVENT_WRITE)
                watching = wanted
            for key, _ in self.selector.select(self.linger_timeout()):
                if key.data is _LINGERING:
                    self.drain_lingering(key.fileobj)
                    continue
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
            self.close_expired()
        return self.exit_code

    def serve_one(self, conn, address):
        conn.setblocking(True)
        # A Unix socket's peer has no address; http.server wants a pair.
        if not isinstance(address, tuple):
            address = ("unix", 0)
        handler = None
        try:
            handler = self.handler_class(conn, address, self)
        except ConnectionError:
            pass  # the client left: not the program's fault
        except Exception:
            conn.close()  # cut: what went out of it is unknown
            raise
        # serve_wsgi's handler knows a body it did not read is on its way.
        self.close_gently(conn, getattr(handler, "body_unread", False))

    def close_gently(self, conn, more_coming):
        """Closes a connection whose answer is out, without a reset: if the
        client sent more than was read (or more is on its way), it lingers
        (module docs, LINGER)."""
        try:
            # The answer ends here, whatever the client sends after it.
            conn.shutdown(socket.SHUT_WR)
            conn.setblocking(False)
            ended, got = _drain(conn)
        except OSError:
            ended, got = True, False
        if ended or not (got or more_coming):
            conn.close()
            return
        if len(self.lingering) >= MAX_LINGERING:
            self.forget(next(iter(self.lingering)))
        self.lingering[conn] = time.monotonic() + LINGER
        self.selector.register(conn, selectors.EVENT_READ, _LINGERING)

    def drain_lingering(self, conn):
        ended, _ = _drain(conn)
        if ended:
            self.forget(conn)

    def forget(self, conn):
        del self.lingering[conn]
        self.selector.unregister(conn)
        conn.close()

    def linger_timeout(self):
        """How long select may wait: until the first lingering connection
        is due, or for ever."""
        if not self.lingering:
            return None
        return max(0.0, min(self.lingering.values()) - time.monotonic())

    def close_expired(self):
        now = time.monotonic()
        for conn in [conn for conn, due in self.lingering.items() if due <= now]:
            self.forget(conn)

    def linger_at_exit(self):
        """A worker that stops gives its lingering connections at most
        LINGER_AT_EXIT more; nothing else is watched meanwhile."""
        if self.selector is None:
            return
        for key in list(self.selector.get_map().values()):
            if key.data is not _LINGERING:
                self.selector.unregister(key.fileobj)
        end = time.monotonic() + LINGER_AT_EXIT
        for conn in self.lingering:
            self.lingering[conn] = min(self.lingering[conn], end)
        while self.lingering:
            for key, _ in self.selector.select(self.linger_timeout()):
                self.drain_lingering(key.fileobj)
            self.close_expired()

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


# The selector's mark on a lingering connection.
_LINGERING = "lingering"


def _drain(conn):
    """Reads and drops what the client of a closed, non-blocking
    connection sent: (ended, got), whether it has closed its end (or failed)
    and whether anything came. At most 1 MiB a call, so that a client that
    streams cannot hold the loop."""
    got = False
    for _ in range(16):
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False, got
        except OSError:
            return True, got
        if not data:
            return True, got
        got = True
    return False, got


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


# Headers about the connection, not the answer: the worker's to say (PEP
# 3333 forbids them to an application). Every answer closes its connection.
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)


class _Guard:
    """Mixed in before the program's BaseHTTPRequestHandler subclass."""

    _busy = False
    _headers_out = False
    # Whether the connection to the client failed: None where the handler
    # cannot tell (a program's handler writes to wfile itself), and then a
    # ConnectionError is taken for the client's leaving; serve_wsgi's
    # handler knows, so one the application raised is an exception.
    _respawn_client_gone = None

    def parse_request(self):
        parsed = super().parse_request()
        if parsed:
            self._busy = True
            self.server.begin(self)
        return parsed

    def handle_expect_100(self):
        # An interim answer, not this request's: no Connection header, and
        # a crash after it still gets its 500.
        self._respawn_io(self.wfile.write, f"{self.protocol_version} 100 Continue\r\n\r\n".encode("latin-1"))
        return True

    def _respawn_io(self, io, *args):
        """A read or write of the client's connection: its failure is the
        client's, and said so for handle_one_request."""
        try:
            return io(*args)
        except OSError:
            self._respawn_client_gone = True
            raise

    def send_header(self, keyword, value):
        # The connection closes after this answer, whatever the handler
        # said: a client told keep-alive would send its next request into
        # a closed connection.
        if keyword.lower() in ("connection", "keep-alive"):
            return
        super().send_header(keyword, value)

    def end_headers(self):
        super().send_header("Connection", "close")
        super().end_headers()

    def flush_headers(self):
        self._headers_out = True
        super().flush_headers()

    def handle_one_request(self):
        worker = self.server
        try:
            super().handle_one_request()
        # SystemExit too: sys.exit() in a view would end the worker with
        # neither an answer nor a handover.
        except (Exception, SystemExit) as exc:  # what the handler did not catch
            if isinstance(exc, ConnectionError) and self._respawn_client_gone is not False:
                return  # the client left: not the program's fault
            message = worker.crash(exc)
            self._answer_crash(message)
            worker.say_crash(exc, message)
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


class _WsgiHandler(BaseHTTPRequestHandler):
    """One request handed to a WSGI application (PEP 3333), on http.server's
    parsing of the head; `application` is set by serve_wsgi. What escapes
    the application escapes this handler too: the guard's crash. What goes
    wrong with the client (gone, silent past the timeout, a malformed
    chunked body) ends the request quietly, as the client's doing."""

    protocol_version = "HTTP/1.1"
    server_version = "respawn.py"
    application = None
    _first = b""
    # Whether some of the request's body was not read: close_gently lets
    # the connection linger for it.
    body_unread = False

    def handle_one_request(self):
        self._respawn_client_gone = False
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline or not self.parse_request():
                return
        except OSError:
            # A head that never came whole (the client left, or sat silent
            # past the timeout) is the client's doing.
            self._respawn_client_gone = True
            return
        length = self.headers.get("Content-Length")
        if length is not None and not length.strip().isdigit():
            self.send_error(400, "Bad Content-Length")
            return
        try:
            self._respond(self._environ())
        except OSError:
            if not self._respawn_client_gone:
                raise

    def _environ(self):
        path, _, query = self.path.partition("?")
        if not path.startswith("/"):
            # The absolute form, `GET http://host/path`, as a proxy sends it.
            path = urllib.parse.urlsplit(path).path or "/"
        local = self.connection.getsockname()
        tcp = isinstance(local, tuple)
        environ = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": local[0] if tcp else "localhost",
            "SERVER_PORT": str(local[1]) if tcp else "80",
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0] if tcp else "",
            "REMOTE_PORT": str(self.client_address[1]) if tcp else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            key = name.upper().replace("-", "_")
            if "_" in name:
                # X_Real_IP would pass for X-Real-IP: dropped, as nginx and
                # gunicorn do.
                continue
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            environ[key] = f"{environ[key]},{value.strip()}" if key in environ else value.strip()
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if chunked:
            environ.pop("CONTENT_LENGTH", None)
            environ["wsgi.input_terminated"] = True
            environ["wsgi.input"] = _ChunkedBody(self)
        else:
            length = environ.get("CONTENT_LENGTH", "")
            environ["wsgi.input"] = _Body(self, int(length) if length else 0)
        return environ

    def _respond(self, environ):
        self._status = self._headers = None
        self._body_allowed = self.command != "HEAD"
        body = environ["wsgi.input"]
        try:
            result = self.application(environ, self._start_response)
            try:
                length = None
                if isinstance(result, (list, tuple)) and len(result) == 1 and isinstance(result[0], bytes):
                    length = len(result[0])
                if self._body_allowed:
                    for chunk in result:
                        if chunk:
                            self._write(chunk, length)
                if not self._headers_out:
                    self._send_head(b"", 0 if length is None and self._body_allowed else length)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        finally:
            self.body_unread = not body.done()

    def _start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self._headers_out:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self._status is not None:
            raise RuntimeError("start_response called a second time without exc_info")
        code = status[:3]
        if not (isinstance(status, str) and code.isdigit() and status[3:4] == " "):
            raise ValueError(f"a WSGI status is like '200 OK', not {status!r}")
        for name, value in headers:
            text = name + value if isinstance(name, str) and isinstance(value, str) else "\n"
            if "\n" in text or "\r" in text:
                raise ValueError(f"a WSGI header is two strings on one line, not {(name, value)!r}")
        self._status, self._headers = status, headers
        if int(code) in (204, 304) or code.startswith("1"):
            self._body_allowed = False
        return self._write

    def _write(self, data, length=None):
        if self._status is None:
            raise RuntimeError("the WSGI application wrote its body before it called start_response")
        if not isinstance(data, bytes):
            raise TypeError(f"a WSGI body is bytes, not {type(data).__name__}")
        if not self._headers_out:
            # The head and the first piece of the body in one write.
            self._send_head(data, length)
        elif self._body_allowed and data:
            self._respawn_io(self.wfile.write, data)

    def _send_head(self, first, length):
        code, _, reason = self._status.partition(" ")
        self.send_response_only(int(code), reason or None)
        said = set()
        for name, value in self._headers:
            lower = name.lower()
            if lower not in _HOP_BY_HOP:
                said.add(lower)
                self.send_header(name, value)
        if "date" not in said:
            self.send_header("Date", self.date_time_string())
        if "server" not in said:
            self.send_header("Server", self.version_string())
        if "content-length" not in said and length is not None:
            self.send_header("Content-Length", str(length))
        self._first = first if self._body_allowed else b""
        self.end_headers()

    def flush_headers(self):
        if hasattr(self, "_headers_buffer"):
            # The head and the first piece of the body in one write: a
            # second small write would wait for the client's ACK (Nagle).
            self._headers_buffer.append(self._first)
            self._first = b""
            self._respawn_io(self.wfile.write, b"".join(self._headers_buffer))
            self._headers_buffer = []

    def log_request(self, code="-", size="-"):
        pass  # no line per request, as the Rust worker and gunicorn

    def log_message(self, format, *args):
        _log(f"worker {self.server.pid}: {format % args}")


class _Body:
    """wsgi.input for a body of Content-Length bytes: reads stop there, so
    that an application that reads to the end does not wait for bytes that
    will never come."""

    def __init__(self, handler, length):
        self.handler = handler
        self.left = length

    def done(self):
        return self.left == 0

    def _take(self, size):
        if size is None or size < 0 or size > self.left:
            size = self.left
        return size

    def read(self, size=-1):
        size = self._take(size)
        data = self.handler._respawn_io(self.handler.rfile.read, size) if size else b""
        self.left -= len(data)
        if size and not data:
            self.left = 0  # the client closed early: no more is coming
        return data

    def readline(self, size=-1):
        size = self._take(size)
        data = self.handler._respawn_io(self.handler.rfile.readline, size) if size else b""
        self.left -= len(data)
        if size and not data:
            self.left = 0
        return data

    def readlines(self, hint=-1):
        lines, total = [], 0
        for line in self:
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class _ChunkedBody(_Body):
    """wsgi.input for a body sent with `Transfer-Encoding: chunked`, decoded;
    `wsgi.input_terminated` tells the application to read it to the end.
    A malformed chunk is the client's doing, like a connection it reset."""

    def __init__(self, handler):
        super().__init__(handler, 0)
        self.ended = False
        self.pending_crlf = False

    def done(self):
        return self.ended

    def _take(self, size):
        if self.left == 0 and not self.ended:
            self._next_chunk()
        return super()._take(size)

    def _next_chunk(self):
        line = self.handler._respawn_io(self.handler.rfile.readline, 1026)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16) if line.endswith(b"\n") else -1
        except ValueError:
            size = -1
        if size < 0:
            self.handler._respawn_client_gone = True
            raise ConnectionError(f"malformed chunk size line {line[:40]!r} in a chunked request body")
        if size == 0:
            # The trailer section, up to its empty line, is not kept.
            while self.handler._respawn_io(self.handler.rfile.readline, 65537) not in (b"\r\n", b"\n", b""):
                pass
            self.ended = True
        self.left = size
        self.pending_crlf = size > 0

    def read(self, size=-1):
        if size is None or size < 0:
            parts = []
            while True:
                part = self._read_some(-1)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        return self._read_some(size)

    def _read_some(self, size):
        data = super().read(size)
        self._end_of_chunk()
        return data

    def readline(self, size=-1):
        parts, wanted = [], size if size is not None and size >= 0 else -1
        while wanted != 0:
            part = super().readline(wanted)
            self._end_of_chunk()
            if not part:
                break
            parts.append(part)
            if part.endswith(b"\n"):
                break
            if wanted > 0:
                wanted -= len(part)
        return b"".join(parts)

    def _end_of_chunk(self):
        if self.left == 0 and self.pending_crlf:
            self.pending_crlf = False
            if self.handler._respawn_io(self.handler.rfile.readline, 3) not in (b"\r\n", b"\n"):
                self.handler._respawn_client_gone = True
                raise ConnectionError("a chunk of the request body does not end with CRLF")
