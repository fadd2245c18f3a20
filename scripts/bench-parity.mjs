// The memory and frame costs of the Pusher-parity features
// (docs/BENCHMARKS.md "Pusher parity"), against a herdgate started by
// scripts/bench-parity, which passes its pid, ports and app. One phase per
// run, on a fresh server:
//   cache N        N cache channels get one 100-byte event each, no subscriber
//   signin N W     N sockets sign in, each watching W users (W = 0: none)
//   counts N S     N sockets in one room, 1 % of them replaced every second
//                  for S seconds: subscription_count frames per second
// Prints one JSON line. Sockets are Node's own WebSocket client
// (--experimental-websocket); requests are signed with node:crypto here,
// not by herdgate's code.

import crypto from 'node:crypto';
import { appId, hmac, host, key, metric, port, rssKiB } from './bench-common.mjs';

const [phase, a1, a2] = process.argv.slice(2);

async function api(path, body) {
  const text = JSON.stringify(body);
  const full = `/apps/${appId}${path}`;
  const md5 = crypto.createHash('md5').update(text).digest('hex');
  const q = `auth_key=${key}&auth_timestamp=${Math.floor(Date.now() / 1000)}&auth_version=1.0&body_md5=${md5}`;
  const sig = hmac(`POST\n${full}\n${q}`);
  const r = await fetch(`http://${host}:${port}${full}?${q}&auth_signature=${sig}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: text,
  });
  if (r.status !== 200) throw new Error(`${path}: ${r.status} ${await r.text()}`);
}

/** A socket that resolves once connected; `onEvent(frame)` sees every event after. */
function open(onEvent = () => {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://${host}:${port}/app/${key}?protocol=7&client=bench&version=1.0`);
    ws.onerror = () => reject(new Error('websocket error'));
    ws.onmessage = (m) => {
      const f = JSON.parse(m.data);
      if (f.event === 'pusher:connection_established') {
        ws.socketId = JSON.parse(f.data).socket_id;
        resolve(ws);
      } else onEvent(f, ws);
    };
  });
}

/** Run `fn(i)` for i in 0..n, `width` at a time. */
async function pool(n, width, fn) {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < n) await fn(next++);
    }),
  );
}

const settle = () => new Promise((r) => setTimeout(r, 1000));

async function cache(n) {
  await settle();
  const before = rssKiB();
  const data = 'x'.repeat(100);
  await pool(n / 10, 8, (i) =>
    api('/batch_events', {
      batch: Array.from({ length: 10 }, (_, j) => ({ channel: `cache-c${i * 10 + j}`, name: 'state', data })),
    }),
  );
  await settle();
  const after = rssKiB();
  const counted = await metric('herdgate_cache_bytes');
  return { phase, channels: n, rss_kib_before: before, rss_kib_after: after, bytes_per_channel: ((after - before) * 1024) / n, counted_bytes_per_channel: counted / n };
}

async function signin(n, w) {
  const sockets = [];
  await pool(n, 200, async (i) => {
    let done;
    const ok = new Promise((r) => (done = r));
    const ws = await open((f) => {
      if (f.event === 'pusher:signin_success') done();
    });
    const watchlist = Array.from({ length: w }, (_, j) => `u${(i + 1 + j * 97) % n}`);
    const userData = JSON.stringify(w ? { id: `u${i}`, watchlist } : { id: `u${i}` });
    const auth = `${key}:${hmac(`${ws.socketId}::user::${userData}`)}`;
    ws.send(JSON.stringify({ event: 'pusher:signin', data: { auth, user_data: userData } }));
    await ok;
    sockets.push(ws);
  });
  await settle();
  return { phase, sockets: n, watching: w, rss_kib: rssKiB(), watchlist_events: await metric('herdgate_watchlist_events_total') };
}

async function counts(n, secs) {
  const subscribe = (ws) => ws.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel: 'room' } }));
  let seen = 0;
  const observer = await open((f) => {
    if (f.event === 'pusher_internal:subscription_count') seen++;
  });
  subscribe(observer);
  const sockets = [];
  const join = async () => {
    const ws = await open();
    subscribe(ws);
    sockets.push(ws);
  };
  await pool(n - 1, 200, join);
  await settle();
  const t0 = Date.now();
  const seen0 = seen;
  const sent0 = await metric('herdgate_subscription_count_events_total');
  const churn = Math.max(1, Math.round(n / 100));
  for (let s = 0; s < secs; s++) {
    const tick = Date.now();
    for (let i = 0; i < churn; i++) sockets.splice(Math.floor(Math.random() * sockets.length), 1)[0].close();
    await pool(churn, 50, join);
    await new Promise((r) => setTimeout(r, Math.max(0, 1000 - (Date.now() - tick))));
  }
  const elapsed = (Date.now() - t0) / 1000;
  const sent = (await metric('herdgate_subscription_count_events_total')) - sent0;
  return {
    phase,
    room: n,
    churn_per_second: churn,
    seconds: elapsed,
    frames_per_second_per_socket: (seen - seen0) / elapsed,
    broadcasts_per_second: sent / elapsed,
    changes_per_second: (2 * churn * secs) / elapsed,
  };
}

const run = { cache: () => cache(Number(a1)), signin: () => signin(Number(a1), Number(a2)), counts: () => counts(Number(a1), Number(a2)) }[phase];
if (!run) throw new Error(`unknown phase ${phase}`);
console.log(JSON.stringify(await run()));
process.exit(0);
