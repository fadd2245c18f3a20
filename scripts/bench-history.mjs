// Costs of channel history (docs/BENCHMARKS.md "History and resume"),
// against a herdgate started by scripts/bench-history (pid, ports, app in
// the environment). Phases, each on a fresh server:
//   memory C E     C channels get E events of ~100 bytes each, no subscriber:
//                  RSS and counted bytes per kept event
//   replay C E     the same, then C sockets (one per channel) resume from
//                  before the first event at once: events replayed per
//                  second and per server CPU-second
// Prints one JSON line. Sockets are Node's own WebSocket client
// (--experimental-websocket); requests are signed with node:crypto here,
// not by herdgate's code.

import crypto from 'node:crypto';
import { appId, cpuSecs, hmac, host, key, metric, port, rssKiB } from './bench-common.mjs';

const [phase, a1, a2] = process.argv.slice(2);

function signed(method, path, params, body = '') {
  const full = `/apps/${appId}${path}`;
  const q = { auth_key: key, auth_timestamp: String(Math.floor(Date.now() / 1000)), auth_version: '1.0', ...params };
  if (body) q.body_md5 = crypto.createHash('md5').update(body).digest('hex');
  const query = Object.keys(q).sort().map((k) => `${k}=${q[k]}`).join('&');
  return `http://${host}:${port}${full}?${query}&auth_signature=${hmac(`${method}\n${full}\n${query}`)}`;
}

async function batch(events) {
  const body = JSON.stringify({ batch: events });
  const r = await fetch(signed('POST', '/batch_events', {}, body), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body,
  });
  if (r.status !== 200) throw new Error(`batch: ${r.status} ${await r.text()}`);
}

async function history(channel, params) {
  const r = await fetch(signed('GET', `/channels/${channel}/history`, params));
  if (r.status !== 200) throw new Error(`history: ${r.status} ${await r.text()}`);
  return r.json();
}

const data = 'x'.repeat(90);
const name = (c) => `chat-${c}`;

async function fill(channels, events) {
  const all = [];
  for (let e = 0; e < events; e++) for (let c = 0; c < channels; c++) all.push({ name: 'msg', channel: name(c), data: `${e}:${data}` });
  const inflight = 16;
  let next = 0;
  await Promise.all(
    Array.from({ length: inflight }, async () => {
      while (next < all.length) {
        const i = next;
        next += 10;
        await batch(all.slice(i, i + 10));
      }
    }),
  );
}

async function settle() {
  // Let the allocator and the workers go quiet before reading RSS.
  await new Promise((r) => setTimeout(r, 1000));
}

if (phase === 'memory' || phase === 'replay') {
  const channels = Number(a1);
  const events = Number(a2);
  await settle();
  const before = rssKiB();
  await fill(channels, events);
  await settle();
  const after = rssKiB();
  const kept = await metric('herdgate_history_events');
  const counted = await metric('herdgate_history_bytes');
  const out = {
    phase,
    channels,
    events_per_channel: events,
    kept_events: kept,
    rss_before_kib: before,
    rss_after_kib: after,
    rss_bytes_per_event: ((after - before) * 1024) / kept,
    counted_bytes_per_event: counted / kept,
  };
  if (phase === 'replay') {
    // Each channel's position just before its first kept event.
    const starts = [];
    for (let c = 0; c < channels; c++) {
      const h = await history(name(c), { since: '0', limit: '1' });
      starts.push({ serial: h.events[0].serial - 1, epoch: h.epoch });
    }
    const sockets = await Promise.all(
      Array.from(
        { length: channels },
        () =>
          new Promise((resolve, reject) => {
            const ws = new WebSocket(`ws://${host}:${port}/app/${key}?protocol=7&client=bench&version=1.0`);
            ws.onerror = () => reject(new Error('websocket error'));
            ws.onmessage = (m) => {
              if (m.data.includes('pusher:connection_established')) resolve(ws);
            };
          }),
      ),
    );
    let replayed = 0;
    let resumed = 0;
    let recovered = 0;
    const done = new Promise((resolve) => {
      sockets.forEach((ws) => {
        ws.onmessage = (m) => {
          if (m.data.includes('"event":"msg"')) replayed++;
          else if (m.data.includes('herdgate:resumed')) {
            resumed++;
            if (m.data.includes('\\"recovered\\":true')) recovered++;
            if (resumed === channels) resolve();
          }
        };
      });
    });
    const cpu0 = cpuSecs();
    const t0 = performance.now();
    sockets.forEach((ws, c) =>
      ws.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel: name(c), resume: starts[c] } })),
    );
    await done;
    const secs = (performance.now() - t0) / 1000;
    const cpu = cpuSecs() - cpu0;
    Object.assign(out, {
      resumed,
      recovered,
      replayed,
      replay_seconds: secs,
      replayed_per_second: replayed / secs,
      server_cpu_seconds: cpu,
      replayed_per_cpu_second: cpu > 0 ? replayed / cpu : null,
    });
    sockets.forEach((ws) => ws.close());
  }
  console.log(JSON.stringify(out));
} else {
  throw new Error(`unknown phase ${phase}`);
}
