// A webhook receiver for herdgate's webhook tests: a real HTTP server that
// checks every POST with the official Node SDK
// (`pusher.webhook({ headers, rawBody }).isValid()`) and prints one JSON line
// per request on stdout:
//   {"listening": PORT}                         once, when it accepts requests
//   {"t": ms, "valid": bool, "events": [...], "time_ms": n, "raw": "...",
//    "signature": "...", "headers": {...}}      per POST answered 200
//   {"t": ms, "answered": 500}                  per POST refused (mode "500")
//   {"t": ms, "hung": true}                     per POST left hanging (mode "hang")
// POST /mode with a body of "ok", "500" or "hang" switches what it does.
// Environment: HERDGATE_APP_ID, HERDGATE_APP_KEY, HERDGATE_APP_SECRET.

import http from 'node:http';
import PusherServer from 'pusher';

const pusher = new PusherServer({
  appId: process.env.HERDGATE_APP_ID,
  key: process.env.HERDGATE_APP_KEY,
  secret: process.env.HERDGATE_APP_SECRET,
});

let mode = 'ok';
const hanging = [];
const line = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const raw = Buffer.concat(chunks).toString('utf8');
    if (req.url === '/mode') {
      mode = raw.trim();
      for (const h of hanging.splice(0)) h.destroy();
      res.end('ok');
      return;
    }
    const t = Date.now();
    if (mode === 'hang') {
      hanging.push(res);
      line({ t, hung: true });
      return;
    }
    if (mode === '500') {
      res.statusCode = 500;
      res.end();
      line({ t, answered: 500 });
      return;
    }
    const hook = pusher.webhook({ headers: req.headers, rawBody: raw });
    const valid = hook.isValid();
    line({
      t,
      valid,
      events: valid ? hook.getEvents() : [],
      time_ms: valid ? hook.getData().time_ms : null,
      raw,
      signature: req.headers['x-pusher-signature'] || null,
      headers: { 'x-pusher-key': req.headers['x-pusher-key'], 'x-env': req.headers['x-env'] },
      path: req.url,
    });
    res.setHeader('content-type', 'application/json');
    res.end('{}');
  });
});

server.keepAliveTimeout = 60000;
server.listen(0, '127.0.0.1', () => line({ listening: server.address().port }));
