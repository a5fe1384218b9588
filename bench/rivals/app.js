// The Node application of bench/rivals.py: the same code under respawn and
// under PM2's cluster mode, so that only the supervisor differs.
//
//   respawn --workers 2 -- node app.js --respawn       respawn.serve(server)
//   pm2 start app.js -i 2 -- --port 8080               server.listen(8080)
//
// GET / answers `handle by child <pid>`. Four routes throw, each where a
// real bug does: in the handler (/throw/sync), after an await
// (/throw/async), in a timer (/throw/timeout), and in a promise nobody
// awaits (/throw/rejection); /exit calls process.exit(1) in the handler.
// Answers keep the connection alive unless the client says otherwise.

'use strict';
const http = require('node:http');
const path = require('node:path');

const server = http.createServer((req, res) => {
  const route = req.url.split('?')[0];
  if (route === '/') {
    const body = `handle by child ${process.pid}\n`;
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
    return res.end(body);
  }
  if (route === '/throw/sync') throw new Error('thrown in the handler');
  if (route === '/throw/async') {
    return (async () => {
      await new Promise((resolve) => setImmediate(resolve));
      throw new Error('thrown after an await');
    })();
  }
  if (route === '/throw/timeout') {
    return setTimeout(() => { throw new Error('thrown in a timer'); }, 1);
  }
  if (route === '/throw/rejection') {
    Promise.reject(new Error('a rejection nobody awaits'));
    return;
  }
  if (route === '/exit') process.exit(1);
  res.writeHead(404, { 'Content-Type': 'text/plain' });
  res.end(`no route for ${route}\n`);
});

const port = process.argv.indexOf('--port');
if (process.argv.includes('--respawn')) {
  require(path.join(__dirname, '..', '..', 'clients', 'node', 'respawn')).serve(server);
} else if (port > 0) {
  server.listen(Number(process.argv[port + 1]), '127.0.0.1');
} else {
  console.error('usage: node app.js --respawn | --port PORT');
  process.exit(2);
}
