// respawn.js: make a Node.js server a worker of respawn. No dependencies;
// Node 18 or newer.
//
//   const respawn = require('./respawn');
//   respawn.serve(http.createServer(handler));
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
// It is the pattern of the Node.js article respawn comes from, done right:
// on an uncaught exception the worker says Suicide first, stops accepting,
// answers the request that threw with a 500, lets every other request in
// flight finish, and only then exits (70). The article's worker exited at
// once, dropping whatever it was serving beside the request that threw.
//
// Not started by respawn (no LISTEN_FDS for this pid), serve() says so and
// exits 3, the code of a worker that could not set up: a worker that bound
// a port of its own would look healthy and never hand over. Exit codes: 0
// stopped (SIGTERM, SIGQUIT, or its share of RESPAWN_MAX_REQUESTS served),
// 70 after an uncaught exception, 3 could not set up.

'use strict';
const fs = require('node:fs');
const http = require('node:http');
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

const STOPPED = 0;
const SETUP_FAILED = 3;
const CRASHED = 70;

const pid = process.pid;

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

// Serves `server` (an http.Server, https.Server or net.Server) on every
// listener respawn handed over, for the rest of the process's life. Call it
// once, instead of server.listen(). An http server's marks are per request;
// a net.Server's, which knows no requests, per connection.
function serve(server) {
  const handed = inherited();
  if (handed === null) {
    const script = process.argv[1] || 'your-server.js';
    console.error(`worker ${pid}: not started by respawn (no LISTEN_FDS for pid ${pid}); ` +
      `run it as: respawn -- node ${script}`);
    process.exit(SETUP_FAILED);
  }

  let channelBroken = false;
  const send = (kind, text) => {
    if (handed.channel === null || channelBroken) return;
    try {
      // writeSync: one write(2), done before the next line runs, so a
      // Suicide is out before the listeners close.
      fs.writeSync(handed.channel, frame(kind, text));
    } catch (err) {
      // The master is gone (EPIPE) or the fd is not a pipe: say it once;
      // serving on is the best this worker can still do.
      channelBroken = true;
      console.error(`worker ${pid}: writing to the master: ${err.message}`);
    }
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
    if (inFlight.size === 0) {
      send(IDLE);
      if (stopping) leaveWhenDone();
    }
  };

  // Every open connection, and how many requests it has carried. A worker
  // that stops must not cut a connection it accepted whose request it has
  // not read yet: that client did nothing wrong, and would see a reset.
  // (http.Server.close() in Node 19+ closes such "idle" connections too, so
  // the listening handle is closed with net.Server's close instead.)
  const connections = new Map();
  const leaveWhenDone = () => {
    if (inFlight.size === 0 && connections.size === 0) leave();
  };

  const isHttp = server instanceof http.Server || server instanceof require('node:https').Server;
  if (isHttp) {
    // prependListener: marked before the program's own handler runs, so a
    // handler that throws at once is already in flight.
    server.prependListener('connection', (socket) => {
      connections.set(socket, 0);
      socket.once('close', () => {
        connections.delete(socket);
        if (stopping) leaveWhenDone();
      });
    });
    server.prependListener('request', (req, res) => {
      if (connections.has(req.socket)) connections.set(req.socket, connections.get(req.socket) + 1);
      const job = {
        socket: req.socket,
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
  function stop(code) {
    exitCode = Math.max(exitCode, code);
    if (!stopping) {
      stopping = true;
      // net.Server's close: stop listening, and keep every connection.
      for (const s of servers) net.Server.prototype.close.call(s);
      for (const job of inFlight) job.lastOne();
    }
    // A kept-alive connection between requests holds nothing to finish; one
    // that has carried no request yet holds one about to be read.
    const busy = new Set([...inFlight].map((job) => job.socket));
    for (const [socket, carried] of connections) {
      if (carried > 0 && !busy.has(socket)) socket.destroy();
    }
    leaveWhenDone();
  }

  // The last answer was handed to the kernel ('finish'); exit once the
  // handlers of this turn have run.
  function leave() {
    setImmediate(() => process.exit(exitCode));
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
  return server;
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
