// The baseline: an idiomatic Node.js cluster server with respawn's demo
// routes, as the article's reader would write it with the cluster module.
//
//   node server.js [--workers N] [--listen HOST:PORT]
//
// The primary forks N workers and replaces one on 'exit'. A worker whose
// handler throws answers 500, tells the primary it is going (disconnect),
// stops accepting (server.close) and exits once its connections are done,
// with a deadline: the graceful path Node's documentation recommends for
// uncaughtException.
//
// Log lines mirror respawn's so the harness can read both:
//   listening on HOST:PORT / worker PID ready / worker PID exited (...)

'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const os = require('node:os');

function flag(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const workers = Number(flag('--workers', os.availableParallelism()));
const [host, port] = (() => {
  const listen = flag('--listen', '127.0.0.1:8080');
  const at = listen.lastIndexOf(':');
  return [listen.slice(0, at), Number(listen.slice(at + 1))];
})();

if (cluster.isPrimary) {
  let stopping = false;
  const fork = () => {
    const worker = cluster.fork();
    worker.on('listening', (address) => {
      if (!primaryAnnounced) {
        primaryAnnounced = true;
        console.error(`listening on ${address.address}:${address.port}`);
      }
      console.error(`worker ${worker.process.pid} ready`);
    });
  };
  let primaryAnnounced = false;
  cluster.on('exit', (worker, code, signal) => {
    console.error(`worker ${worker.process.pid} exited (${signal ? 'signal ' + signal : 'code ' + code})`);
    if (!stopping) fork();
  });
  const stop = () => {
    stopping = true;
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGTERM');
    setTimeout(() => process.exit(0), 200).unref();
    if (Object.keys(cluster.workers).length === 0) process.exit(0);
    cluster.on('exit', () => {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
    });
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  for (let i = 0; i < workers; i++) fork();
} else {
  // The response in hand, so that a throw can still answer it; registered
  // before the handler so that it runs first.
  let current = null;
  const server = http.createServer();
  server.on('request', (req, res) => { current = res; });
  server.on('request', (req, res) => {
    const path = req.url.split('?')[0];
    if (path === '/') {
      res.writeHead(200, { 'Content-Type': 'text/plain' });
      res.end(`handle by child ${process.pid}\n`);
    } else if (path === '/crash') {
      throw new Error('crash requested by GET /crash');
    } else if (path.startsWith('/sleep/')) {
      const ms = Number(path.slice('/sleep/'.length));
      if (!Number.isInteger(ms) || ms < 0 || ms > 60000) {
        res.writeHead(400, { 'Content-Type': 'text/plain' });
        res.end('/sleep takes milliseconds, 0 to 60000\n');
        return;
      }
      setTimeout(() => {
        res.writeHead(200, { 'Content-Type': 'text/plain' });
        res.end(`slept ${ms} ms in child ${process.pid}\n`);
      }, ms);
    } else {
      res.writeHead(404, { 'Content-Type': 'text/plain' });
      res.end(`no route for ${path}\n`);
    }
  });

  // The handler's throw reaches here: the request that caused it gets a
  // 500, then the worker leaves gracefully, as Node's docs recommend.
  process.on('uncaughtException', (err) => {
    console.error(`worker ${process.pid} panicked: ${err.message}`);
    if (current && !current.headersSent) {
      current.writeHead(500, { 'Content-Type': 'text/plain', Connection: 'close' });
      current.end(`worker ${process.pid} panicked: ${err.message}\n`);
    }
    setTimeout(() => process.exit(1), 5000).unref();
    server.close(() => process.exit(1));
    server.closeIdleConnections();
    cluster.worker.disconnect();
  });
  process.on('SIGTERM', () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  });
  server.listen(port, host);
}
