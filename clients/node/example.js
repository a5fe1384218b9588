// The demo's routes on a plain http.Server, supervised by respawn:
//
//   respawn --workers 4 -- node clients/node/example.js
//
// GET / answers `handle by child <pid>`, /crash throws inside the handler
// (respawn.js answers 500 and the worker is replaced), /sleep/<ms> answers
// after ms (0 to 60000), /hang spins forever (what respawn's --timeout is
// for), /version says which code answers. Texts as the Rust demo's.

'use strict';
const http = require('node:http');
const respawn = require('./respawn');

const MAX_SLEEP_MS = 60000;

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    return answer(res, 405, `method ${req.method} not allowed: the demo serves GET\n`);
  }
  if (path === '/') return answer(res, 200, `handle by child ${process.pid}\n`);
  if (path === '/version') return answer(res, 200, version());
  if (path === '/crash') throw new Error('crash requested by GET /crash');
  if (path === '/hang') for (;;);
  if (path.startsWith('/sleep/')) {
    const ms = path.slice('/sleep/'.length);
    if (!/^[0-9]+$/.test(ms) || Number(ms) > MAX_SLEEP_MS) {
      return answer(res, 400, `/sleep takes milliseconds, 0 to ${MAX_SLEEP_MS}\n`);
    }
    setTimeout(() => answer(res, 200, `slept ${Number(ms)} ms in child ${process.pid}\n`), Number(ms));
    return;
  }
  answer(res, 404, `no route for ${path}\n`);
});

// One answer per connection, then close, as the Rust demo does: the same
// clients (curl, the tests' harness, wrk) behave the same against both.
function answer(res, status, body) {
  res.writeHead(status, {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
    Connection: 'close',
  });
  res.end(body);
}

// RESPAWN_DEMO_TAG, if set, is added: a wrapper that sets it makes a
// second build out of the same file, to watch a HUP roll it out.
function version() {
  const tag = process.env.RESPAWN_DEMO_TAG ? ` ${process.env.RESPAWN_DEMO_TAG}` : '';
  return `example node ${process.version}${tag}\n`;
}

respawn.serve(server);
