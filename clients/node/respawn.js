// respawn.js: make a Node.js server a worker of respawn. No dependencies;
// Node 18 or newer. `npm install /path/to/respawn/clients/node` installs it
// as the package respawn-worker.
//
//   const respawn = require('respawn-worker');
//   respawn.serve(http.createServer(handler));      // node:http
//   respawn.serve(http.createServer(expressApp));   // Express
//   respawn.serve(http.createServer(koaApp.callback()));  // Koa
//   respawn.serve(fastify);                         // Fastify: the instance
//
// respawn (the master) forks and executes this program once per worker, its
// listening sockets already bound, at fd 3, 4, ... (LISTEN_FDS, as systemd
// passes them), and the write end of a pipe to the master at fd
// RESPAWN_CHANNEL_FD. serve() listens on those fds and keeps the contract of
// docs/protocol.md on the pipe:
//
//   Ready      once listening: the master stops counting the start.
//   Busy, Idle at each request's start, and when none is left in flight: the
//              master's --timeout finds an event loop stuck on one request,
//              and its counts of requests come from these marks.
//   Suicide    "do not send me more, replace me now", sent *before* the
//              worker stops accepting, so that the replacement is forked and
//              listening while this one finishes what it holds.
//
// A master that stops reading (stalled, stopped) never holds the worker up:
// the pipe is non-blocking, marks it has no room for are dropped and
// counted, and Ready and Suicide wait for room (openChannel says how).
//
// It is the pattern of the Node.js article respawn comes from, done right:
// on an uncaught exception the worker says Suicide first, stops accepting,
// answers the request that threw with a 500, lets every other request in
// flight finish, and only then exits (70). The article's worker exited at
// once, dropping whatever it was serving beside the request that threw.
// A stopping worker loses no request a kept-alive connection brought it:
// each is answered with `Connection: close`, and a connection between
// requests is closed only after a short grace (stop() says why).
//
// Not started by respawn (no LISTEN_FDS for this pid), serve() says so and
// exits 3, the code of a worker that could not set up: a worker that bound
// a port of its own would look healthy and never hand over. Exit codes: 0
// stopped (SIGTERM, SIGQUIT, or its share of RESPAWN_MAX_REQUESTS served),
// 70 after an uncaught exception (or an app whose close() failed), 3 could
// not set up (a listener refused, an app whose ready() failed).

'use strict';
const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const net = require('node:net');
const { AsyncLocalStorage } = require('node:async_hooks');

const VERSION = 1;
const READY = 1;
const SUICIDE = 2;
const BUSY = 3;
const IDLE = 4;
// A frame is at most 4 + 240 = 244 bytes, under PIPE_BUF (4096): one
// write(2) of it is atomic, so frames never interleave nor arrive cut.
const MAX_PAYLOAD = 240;
// How long a worker that is done waits at most for room in the pipe for a
// Ready or Suicide it still owes the master (a stopped master's), before it
// exits without it: the master learns of the exit anyway.
const OWED_AT_EXIT_MS = 5000;
// Lines about dropped marks: at most one a second, the rest counted.
const DROPPED_LINE_EVERY_MS = 1000;
// How long a stopping worker keeps a kept-alive connection between
// requests, for a request that may be on its way on it (see stop()). A
// client that sends back to back has its next request in the worker's
// socket well within it, a loaded machine included; one idle that long is
// not sending.
const KEEP_ALIVE_GRACE_MS = 200;

const STOPPED = 0;
const SETUP_FAILED = 3;
const CRASHED = 70;

const pid = process.pid;
let serving = false;

// One frame of the channel: version, kind, payload length (u16 LE), payload.
// The text is cut to 240 bytes at the start of a character, never inside one,
// so the master always gets valid UTF-8.
function frame(kind, text = '') {
  let payload = Buffer.from(text, 'utf8');
  if (payload.length > MAX_PAYLOAD) {
    let end = MAX_PAYLOAD;
    // 10xxxxxx is a continuation byte: back up to the character's first byte.
    while (end > 0 && (payload[end] & 0xc0) === 0x80) end -= 1;
    payload = payload.subarray(0, end);
  }
  const bytes = Buffer.alloc(4 + payload.length);
  bytes[0] = VERSION;
  bytes[1] = kind;
  bytes.writeUInt16LE(payload.length, 2);
  payload.copy(bytes, 4);
  return bytes;
}

// What the master handed over, from the environment, or null if it was not
// handed to this process. The variables are removed, as sd_listen_fds does:
// a program this one starts must not take our fds for its own.
function inherited() {
  const env = process.env;
  const count = Number(env.LISTEN_FDS);
  const forUs = env.LISTEN_PID === String(pid) && Number.isInteger(count) && count > 0;
  const channel = env.RESPAWN_CHANNEL_FD === undefined ? null : Number(env.RESPAWN_CHANNEL_FD);
  const share = Number(env.RESPAWN_MAX_REQUESTS || 0);
  for (const name of ['LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES', 'RESPAWN_CHANNEL_FD']) {
    delete env[name];
  }
  if (!forUs) return null;
  return {
    fds: Array.from({ length: count }, (_, i) => 3 + i),
    channel: Number.isInteger(channel) && channel >= 0 ? channel : null,
    share: Number.isInteger(share) && share > 0 ? share : 0,
  };
}

// Serves `target` on every listener respawn handed over, for the rest of
// the process's life. Call it once, instead of listen(). `target` is one of:
//
//   an http.Server or https.Server   marks per request (Express:
//                                    http.createServer(app); Koa:
//                                    http.createServer(app.callback()))
//   a net.Server                     it knows no requests: marks per connection
//   a Fastify instance               (or any app with a `server`, `ready()`
//                                    and `close()`): made ready before it
//                                    serves, closed after its last request,
//                                    so that its onClose hooks run
//
// Anything else (an Express or Koa app itself, a request handler, a server
// already listening) is a TypeError, thrown at once, that says what to pass.
//
// options.keepAliveGraceMs: how long a stopping worker keeps a kept-alive
// connection that is between requests (KEEP_ALIVE_GRACE_MS; see stop()).
function serve(target, options = {}) {
  const app = asApp(target);
  const server = app === null ? target : app.server;
  const wrong = misuse(target, app);
  if (wrong !== null) throw new TypeError(wrong);
  if (serving) throw new Error('respawn.serve was called already: call it once, with the one server');
  serving = true;
  const grace = Number.isFinite(options.keepAliveGraceMs) && options.keepAliveGraceMs >= 0
    ? options.keepAliveGraceMs : KEEP_ALIVE_GRACE_MS;

  const handed = inherited();
  if (handed === null) {
    const script = process.argv[1] || 'your-server.js';
    console.error(`worker ${pid}: not started by respawn (no LISTEN_FDS for pid ${pid}); ` +
      `run it as: respawn -- node ${script}`);
    process.exit(SETUP_FAILED);
  }

  const channel = handed.channel === null ? null : openChannel(handed.channel);
  const send = (kind, text) => {
    if (channel !== null) channel.send(kind, text);
  };

  // What is in flight, each with what to do with it if the code serving it
  // throws. `current` follows each HTTP request through its callbacks and
  // promises, so the uncaught exception handler knows which request threw.
  const inFlight = new Set();
  const current = new AsyncLocalStorage();
  let started = 0;
  let stopping = false;
  let exitCode = STOPPED;
  let suicideSent = false;
  const suicide = (reason) => {
    if (!suicideSent) send(SUICIDE, reason);
    suicideSent = true;
  };

  // Listener 3 is `server`'s own; any other gets a plain net.Server that
  // hands each connection to `server`, as an http.Server documents it may.
  const servers = [server, ...handed.fds.slice(1).map(() =>
    net.createServer((socket) => server.emit('connection', socket)))];

  // A request (or connection) starts: counted and marked.
  const begin = (job, line) => {
    started += 1;
    inFlight.add(job);
    send(BUSY, line);
    if (stopping) job.lastOne();
    if (handed.share > 0 && started === handed.share) {
      suicide(`served its ${handed.share} requests`);
      stop(STOPPED);
    }
  };
  const end = (job) => {
    if (!inFlight.delete(job)) return;
    if (job.connection !== undefined) {
      job.connection.open -= 1;
      if (stopping) linger(job.connection);
    }
    if (inFlight.size === 0) {
      send(IDLE);
      if (stopping) leaveWhenDone();
    }
  };

  // Every open connection of an http server: how many requests it has
  // carried, how many of them are in flight, and, once the worker stops,
  // the timer that closes it at the end of its grace (see stop()).
  const connections = new Map();
  const leaveWhenDone = () => {
    if (inFlight.size === 0 && connections.size === 0) leave();
  };
  // A connection between requests, of a worker that stops: closed if no
  // request comes on it within the grace. One that has carried none yet
  // is kept: its first request is on its way, or the client is slow (Node's
  // headersTimeout, then the master's --graceful-timeout, bound it).
  function linger(connection) {
    if (connection.open > 0 || connection.carried === 0 || connection.timer !== null) return;
    connection.timer = setTimeout(() => {
      connection.timer = null;
      if (connection.open === 0) connection.socket.destroy();
    }, grace);
  }

  const isHttp = server instanceof http.Server || server instanceof https.Server;
  if (isHttp) {
    // prependListener: marked before the program's own handler runs, so a
    // handler that throws at once is already in flight.
    server.prependListener('connection', (socket) => {
      const connection = { socket, carried: 0, open: 0, timer: null };
      connections.set(socket, connection);
      socket.once('close', () => {
        clearTimeout(connection.timer);
        connections.delete(socket);
        if (stopping) leaveWhenDone();
      });
    });
    server.prependListener('request', (req, res) => {
      const connection = connections.get(req.socket);
      if (connection !== undefined) {
        connection.carried += 1;
        connection.open += 1;
        clearTimeout(connection.timer);
        connection.timer = null;
      }
      const job = {
        connection,
        // The last answer on this connection: the client opens another,
        // which a worker that is not stopping accepts.
        lastOne: () => { if (!res.headersSent) res.setHeader('Connection', 'close'); },
        // The request threw: answer it if it still can be, else cut it, so
        // that the client is not left waiting and it leaves the count.
        fail: (message) => {
          if (res.writableEnded) return;
          if (res.headersSent) return res.destroy();
          const body = `worker ${pid} panicked: ${message}\n`;
          res.writeHead(500, {
            'Content-Type': 'text/plain',
            'Content-Length': Buffer.byteLength(body),
            Connection: 'close',
          });
          res.end(body);
        },
      };
      // 'close' comes too when the client left first, and after 'finish'.
      res.once('finish', () => end(job));
      res.once('close', () => end(job));
      begin(job, `${req.method} ${req.url} HTTP/${req.httpVersion}${peer(req.socket)}`);
      // The request becomes the store of what runs now (the handlers after
      // this one) and of everything they start. 'request' runs in its
      // connection's own parser context, so the store cannot leak to
      // another connection; a later request on the same one replaces it.
      current.enterWith(job);
    });
  } else {
    // No store here: 'connection' runs in the listener's context, which
    // every later connection inherits, so a store set here would name the
    // wrong connection. A throw is then traced to none: the others finish,
    // and the one that threw holds the worker until its client closes, or
    // the master's --graceful-timeout after the Suicide.
    server.prependListener('connection', (socket) => {
      const job = { lastOne: () => {}, fail: () => socket.destroy() };
      socket.once('close', () => end(job));
      begin(job, `connection${peer(socket)}`);
    });
  }

  // Stop accepting, finish what is in flight, then exit with `code` (a crash
  // stays a crash: 70 wins over a later stop's 0).
  //
  // A kept-alive connection is not cut the moment the worker stops: its
  // client may have sent a request the worker has not read yet (a client
  // sending back to back sends the next one as soon as it has an answer),
  // and a connection closed with a request unread is reset, the request
  // lost. So every request in flight, and every request that arrives on an
  // open connection from now on, is answered with `Connection: close`, and
  // the connection ends with that answer; a connection between requests is
  // closed only after a grace (200 ms) in which no request came on it.
  // A client idle that long is not in the middle of sending: a request it
  // sends later meets the race every keep-alive server has (Node's own
  // keepAliveTimeout too), which browsers answer by retrying.
  function stop(code) {
    exitCode = Math.max(exitCode, code);
    if (stopping) return;
    stopping = true;
    // net.Server's close: stop listening, and keep every connection.
    // (http.Server.close() in Node 19+ also cuts the idle ones at once.)
    for (const s of servers) {
      if (s.listening) net.Server.prototype.close.call(s);
    }
    for (const job of inFlight) job.lastOne();
    for (const connection of connections.values()) linger(connection);
    leaveWhenDone();
  }

  // The last answer was handed to the kernel ('finish') and the last
  // connection is closed: exit once the handlers of this turn have run, the
  // app is closed (its onClose hooks), and the master has been told what
  // it is owed (a Suicide waiting for room in the pipe).
  let leaving = false;
  function leave() {
    if (leaving) return;
    leaving = true;
    const exit = () => process.exit(exitCode);
    const told = () => (channel === null ? exit() : channel.close(exit));
    setImmediate(() => {
      if (app === null) return told();
      // The listener is closed already: Fastify's own server.close() finds
      // nothing to do, and its onClose hooks run.
      Promise.resolve().then(() => app.close()).then(told, (err) => {
        console.error(`worker ${pid}: closing the app: ${describe(err)}`);
        exitCode = Math.max(exitCode, CRASHED);
        told();
      });
    });
  }

  process.on('uncaughtException', (err) => {
    const message = describe(err);
    // First, so that the master forks the replacement while this one answers.
    suicide(`uncaught ${message}`);
    stop(CRASHED);
    const job = current.getStore();
    if (job !== undefined && inFlight.has(job)) {
      try {
        job.fail(errorMessage(err));
      } catch (_) {
        // Its response is in a state no answer fits: it ends with the
        // process, and must not hold the process up.
        end(job);
      }
    }
    // Last: a slow log must hold up neither the handover nor the answer.
    const n = inFlight.size;
    const when = n === 0 ? 'now' : n === 1 ? 'once its request in flight is done'
      : `once its ${n} requests in flight are done`;
    console.error(`worker ${pid} threw ${message}${where(err)}; it exits ${when}`);
  });
  for (const signal of ['SIGTERM', 'SIGQUIT']) process.on(signal, () => stop(STOPPED));
  // Node resets every inherited signal disposition at start: the ones that
  // steer the master would kill (HUP, USR2) or stop (TTIN, TTOU) this
  // worker when sent to its process group. Caught and dropped, they do not.
  for (const signal of ['SIGHUP', 'SIGTTIN', 'SIGTTOU', 'SIGUSR2']) process.on(signal, () => {});

  const listen = () => {
    if (stopping) return;
    let listening = 0;
    servers.forEach((s, i) => {
      const failed = (err) => {
        console.error(`worker ${pid}: listening on fd ${handed.fds[i]}: ${err.message}`);
        process.exit(SETUP_FAILED);
      };
      s.once('error', failed);
      s.listen({ fd: handed.fds[i] }, () => {
        // A later error (accept failing, say) is not a failed start: left
        // unhandled, it is an uncaught exception, and the worker is replaced.
        s.removeListener('error', failed);
        listening += 1;
        if (listening === servers.length) send(READY);
      });
    });
  };
  if (app === null) {
    listen();
  } else {
    // Fastify registers its routes and plugins in ready(): a request served
    // before it would find none, and kill the worker.
    Promise.resolve().then(() => app.ready()).then(listen, (err) => {
      console.error(`worker ${pid}: the app did not get ready: ${describe(err)}${where(err)}`);
      process.exit(SETUP_FAILED);
    });
  }
  return target;
}

// `target` as an app that owns its server (Fastify's shape: `server`,
// `ready()`, `close()`), or null.
function asApp(target) {
  const app = target !== null && typeof target === 'object' && target.server instanceof net.Server &&
    typeof target.ready === 'function' && typeof target.close === 'function';
  return app ? target : null;
}

// Why respawn.serve cannot use `target`, saying what to pass, or null.
function misuse(target, app) {
  const kinds = 'an http.Server, https.Server or net.Server that is not listening, or a Fastify instance';
  if (app !== null) {
    return app.server.listening
      ? 'respawn.serve(fastify): its server is listening already (fastify.listen() was called): ' +
        'respawn hands the worker its listening sockets: call respawn.serve(fastify) instead of listen()'
      : null;
  }
  if (typeof target === 'function') {
    const express = typeof target.handle === 'function' && typeof target.set === 'function';
    return express
      ? 'respawn.serve(app): this is an Express app, a request handler, not a server: ' +
        'pass respawn.serve(http.createServer(app))'
      : `respawn.serve(${target.name || 'handler'}): a function is a request handler, not a server: ` +
        `pass respawn.serve(http.createServer(${target.name || 'handler'}))`;
  }
  if (target !== null && typeof target === 'object' && !(target instanceof net.Server) &&
      typeof target.callback === 'function' && typeof target.use === 'function') {
    return 'respawn.serve(app): this is a Koa app, not a server: ' +
      'pass respawn.serve(http.createServer(app.callback()))';
  }
  if (!(target instanceof net.Server)) return `respawn.serve takes ${kinds}; it was given ${shown(target)}`;
  if (target.listening) {
    return 'respawn.serve(server): the server is listening already (server.listen() was called): ' +
      'respawn hands the worker its listening sockets: call respawn.serve(server) instead of listen()';
  }
  return null;
}

// What a value is, for a message: `undefined`, `a string`, `an object (Foo)`.
function shown(value) {
  if (value === null || value === undefined) return String(value);
  const kind = typeof value;
  const article = /^[aeiou]/.test(kind) ? 'an' : 'a';
  const name = kind === 'object' && value.constructor && value.constructor.name;
  return name ? `${article} ${kind} (${name})` : `${article} ${kind}`;
}

// The pipe to the master, written so that the master can never hold this
// worker up. A master that stalls (a re-exec pauses it up to 1.5 s, a
// SIGSTOP for as long as it lasts) reads nothing; once the pipe's 64 KiB
// are full (about 1,500 requests' marks), a blocking write would stop the
// whole event loop, every request in flight with it, until the master read
// again. So the fd is non-blocking, and a frame the full pipe refuses
// (EAGAIN) waits here instead, while the worker serves on:
//
// - Ready and Suicide are never lost: they wait in order, and go first.
// - Of Busy and Idle, only the newest waits (one slot): each one it replaces
//   is dropped and counted. Once the pipe has room, the newest tells the
//   master where the worker is now, and one line says how many it missed.
//
// Every frame is written with one write(2). A frame is at most 244 bytes,
// under PIPE_BUF (4096), so a non-blocking write of it to a pipe puts it in
// whole or fails with EAGAIN, never in part: a cut frame would be garbage
// to the master, and this code relies on the kernel for that.
function openChannel(fd) {
  const owed = []; // Ready and Suicide frames not written yet, in order
  let newest = null; // the newest Busy or Idle not written yet
  let inLibuv = null; // the frame libuv holds until the pipe has room
  let broken = false;
  let dropped = 0; // marks replaced before they were written, not said yet
  let saidAt = -Infinity;
  let whenDelivered = []; // callbacks of close(), once nothing is owed

  // Node has no fcntl: libuv's pipe handle sets O_NONBLOCK on the fd as it
  // opens it, and writes a frame it is given once the pipe has room, which
  // is the only wait this channel needs. (Reopening /proc/self/fd/N with
  // O_NONBLOCK would leave the fd as it is, but a worker running as
  // --user may not open the master's pipe by its path.) Frames that fit go
  // out at once with fs.writeSync, before the next line runs: a Suicide is
  // in the pipe before the listeners close.
  let pipe = null;
  try {
    pipe = new net.Socket({ fd, readable: false, writable: true });
    pipe.on('error', (err) => fail(err));
  } catch (_) {
    // Not a pipe nor a socket (a file, /dev/null): writes to it never wait,
    // and a write that fails says why below.
  }

  const owes = () => owed.length > 0 || (inLibuv !== null && !isMark(inLibuv));

  // The master is gone (EPIPE) or the fd is not a pipe: say it once;
  // serving on is the best this worker can still do.
  function fail(err) {
    if (broken) return;
    broken = true;
    console.error(`worker ${pid}: writing to the master: ${err.message}`);
    delivered();
  }

  // One write(2): true if the frame is in the pipe (or never will be),
  // false if the pipe is full.
  function tryWrite(bytes) {
    try {
      fs.writeSync(fd, bytes);
      return true;
    } catch (err) {
      if (err.code === 'EAGAIN') return false;
      fail(err);
      return true;
    }
  }

  // Writes what waits, in order, as far as the pipe takes it. The first
  // frame it refuses goes to libuv, which writes it when the pipe has room
  // and comes back here; meanwhile nothing else is written, so no frame
  // overtakes another.
  function flush() {
    while (!broken && inLibuv === null && (owed.length > 0 || newest !== null)) {
      const fromOwed = owed.length > 0;
      const bytes = fromOwed ? owed[0] : newest;
      const written = tryWrite(bytes);
      // Without a pipe handle the fd is blocking and never refuses; if it
      // did, the frame would wait for the next send.
      if (!written && pipe === null) return;
      if (fromOwed) owed.shift();
      else newest = null;
      if (written) continue;
      inLibuv = bytes;
      pipe.write(bytes, (err) => {
        inLibuv = null;
        if (err) return fail(err);
        flush();
      });
      return;
    }
    if (inLibuv === null && newest === null) sayDropped(false);
    if (!owes()) delivered();
  }

  // `worker 4321: 1520 Busy/Idle marks dropped: ...`, at most once a
  // second (the next line counts the rest), and at exit.
  function sayDropped(atExit) {
    if (dropped === 0) return;
    const now = performance.now();
    if (!atExit && now - saidAt < DROPPED_LINE_EVERY_MS) return;
    const marks = dropped === 1 ? 'mark' : 'marks';
    console.error(`worker ${pid}: ${dropped} Busy/Idle ${marks} dropped: the master was not reading its pipe`);
    dropped = 0;
    saidAt = now;
  }

  function delivered() {
    const waiting = whenDelivered;
    whenDelivered = [];
    for (const then of waiting) then();
  }

  return {
    send(kind, text) {
      if (broken) return;
      const bytes = frame(kind, text);
      if (isMark(bytes)) {
        if (newest !== null) dropped += 1;
        newest = bytes;
      } else {
        owed.push(bytes);
      }
      flush();
    },
    // Calls `then` once no Ready or Suicide waits (at once, as a rule), or
    // after OWED_AT_EXIT_MS, saying what the master was not told.
    close(then) {
      const last = () => {
        if (newest !== null || (inLibuv !== null && isMark(inLibuv))) dropped += 1;
        sayDropped(true);
        then();
      };
      if (broken || !owes()) return last();
      const timer = setTimeout(() => {
        const kinds = [inLibuv, ...owed].filter((b) => b !== null && !isMark(b))
          .map((b) => (b[1] === READY ? 'Ready' : 'Suicide')).join(' and ');
        console.error(`worker ${pid}: the master read nothing for ${OWED_AT_EXIT_MS / 1000} s; ` +
          `exiting without sending it ${kinds}`);
        last();
      }, OWED_AT_EXIT_MS);
      whenDelivered.push(() => {
        clearTimeout(timer);
        last();
      });
    },
  };
}

function isMark(bytes) {
  return bytes[1] === BUSY || bytes[1] === IDLE;
}

// ` from ADDR:PORT`, or nothing for a Unix socket's nameless peer.
function peer(socket) {
  if (!socket || socket.remoteAddress === undefined) return '';
  const host = socket.remoteFamily === 'IPv6' ? `[${socket.remoteAddress}]` : socket.remoteAddress;
  return ` from ${host}:${socket.remotePort}`;
}

// ` (at FILE:LINE:COLUMN)`, where it was thrown: one log line says what
// and where, as a Rust panic's does.
function where(err) {
  const stack = err instanceof Error && typeof err.stack === 'string' ? err.stack : '';
  const at = stack.match(/^\s+at (?:.*\()?(.+?:\d+:\d+)\)?$/m);
  return at ? ` (at ${at[1]})` : '';
}

function errorMessage(err) {
  return err instanceof Error ? err.message : String(err);
}

// `Error: message`, or what was thrown if it was not an Error.
function describe(err) {
  return err instanceof Error ? `${err.name}: ${err.message}` : `throw of ${String(err)}`;
}

module.exports = { serve, frame };
