// permessage-deflate (RFC 7692) against a real herdgate, with clients that
// do not share herdgate's code: Node's `ws` (its own zlib use) and a raw
// socket client written here that reads every frame's header bits and
// inflates with Node's zlib. Run by tests/integration/deflate.rs, which
// starts herdgate with `limits.max_message_bytes = 65536` and an admin
// listener (HERDGATE_ADMIN_URL) for the compression counters. With
// HERDGATE_DEFLATE_TLS=1 every client speaks TLS to a herdgate with [tls]
// (trusting its CA through NODE_EXTRA_CA_CERTS): TLS sockets compress too.

import test from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { randomBytes } from 'node:crypto';
import zlib from 'node:zlib';
import WebSocket from 'ws';
import { env, makeServer, uniq, withTimeout } from '../helpers.mjs';

const TAIL = Buffer.from([0x00, 0x00, 0xff, 0xff]);
const path = `/app/${env.key}?protocol=7&client=js&version=8.6.0`;
const overTls = process.env.HERDGATE_DEFLATE_TLS === '1';
const api = makeServer({ useTLS: overTls });

/** A deflate stream for one message, sync-flushed, its tail removed (§7.2.1). */
function deflateMessage(text) {
  const z = zlib.deflateRawSync(Buffer.from(text), { finishFlush: zlib.constants.Z_SYNC_FLUSH });
  assert.deepEqual(z.subarray(-4), TAIL);
  return z.subarray(0, -4);
}

function inflateMessage(payload) {
  return zlib.inflateRawSync(Buffer.concat([payload, TAIL]), { finishFlush: zlib.constants.Z_SYNC_FLUSH }).toString();
}

/** A masked client frame; `rsv1` marks a compressed message. */
function clientFrame(opcode, payload, rsv1 = false) {
  const len = payload.length;
  const head = [0x80 | (rsv1 ? 0x40 : 0) | opcode];
  if (len < 126) head.push(0x80 | len);
  else if (len < 65536) head.push(0x80 | 126, len >> 8, len & 255);
  else {
    head.push(0x80 | 127, 0, 0, 0, 0);
    head.push((len >>> 24) & 255, (len >>> 16) & 255, (len >>> 8) & 255, len & 255);
  }
  const mask = randomBytes(4);
  const body = Buffer.from(payload);
  for (let i = 0; i < body.length; i++) body[i] ^= mask[i % 4];
  return Buffer.concat([Buffer.from(head), mask, body]);
}

/**
 * A websocket client on a bare TCP socket: every server frame is kept with
 * its RSV1 bit and its size on the wire; compressed ones are inflated here.
 */
class RawClient {
  static async open(label, { offer }) {
    const c = new RawClient(label);
    await c.handshake(offer);
    return c;
  }

  constructor(label) {
    this.label = label;
    this.messages = [];
    this.closeCode = null;
    this.waiters = [];
    this.buf = Buffer.alloc(0);
  }

  handshake(offer) {
    return withTimeout(`${this.label}: handshake`, (resolve, reject) => {
      this.sock = overTls ? tls.connect({ host: env.host, port: env.port }) : net.connect(env.port, env.host);
      this.sock.on('error', reject);
      const key = randomBytes(16).toString('base64');
      this.sock.on(overTls ? 'secureConnect' : 'connect', () => {
        this.sock.write(
          `GET ${path} HTTP/1.1\r\nHost: ${env.host}:${env.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
            `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n` +
            (offer ? `Sec-WebSocket-Extensions: ${offer}\r\n` : '') +
            '\r\n',
        );
      });
      let head = Buffer.alloc(0);
      const onHead = (chunk) => {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        this.sock.off('data', onHead);
        const lines = head.subarray(0, end).toString().split('\r\n');
        if (!lines[0].includes(' 101 ')) return reject(new Error(`${this.label}: ${lines[0]}`));
        this.headers = Object.fromEntries(
          lines.slice(1).map((l) => [l.slice(0, l.indexOf(':')).toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]),
        );
        this.sock.on('data', (d) => this.onData(d));
        this.sock.on('close', () => this.wake());
        this.onData(head.subarray(end + 4));
        resolve();
      };
      this.sock.on('data', onHead);
    });
  }

  onData(chunk) {
    this.buf = Buffer.concat([this.buf, chunk]);
    for (;;) {
      if (this.buf.length < 2) break;
      const b0 = this.buf[0];
      let len = this.buf[1] & 0x7f;
      let at = 2;
      if (len === 126) {
        if (this.buf.length < 4) break;
        len = this.buf.readUInt16BE(2);
        at = 4;
      } else if (len === 127) {
        if (this.buf.length < 10) break;
        len = Number(this.buf.readBigUInt64BE(2));
        at = 10;
      }
      if (this.buf.length < at + len) break;
      const payload = this.buf.subarray(at, at + len);
      this.buf = this.buf.subarray(at + len);
      const opcode = b0 & 0x0f;
      assert.equal(b0 & 0x80, 0x80, `${this.label}: herdgate sends whole messages in one frame`);
      assert.equal(b0 & 0x30, 0, `${this.label}: RSV2 and RSV3 are never set`);
      const compressed = (b0 & 0x40) !== 0;
      if (opcode === 0x1) {
        const text = compressed ? inflateMessage(payload) : payload.toString();
        this.messages.push({ compressed, wire: payload.length, text, json: JSON.parse(text) });
      } else if (opcode === 0x8) {
        assert.ok(!compressed, 'control frames are never compressed');
        this.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      } else if (opcode === 0x9) {
        this.sock.write(clientFrame(0xa, payload));
      }
    }
    this.wake();
  }

  wake() {
    for (const w of this.waiters.splice(0)) w();
  }

  /** The first message (from `from` on) for which `pred(json)` holds. */
  next(what, pred, from = 0) {
    return withTimeout(`${this.label}: ${what}`, (resolve, reject) => {
      const look = () => {
        const m = this.messages.slice(from).find((x) => pred(x.json));
        if (m) return resolve(m);
        if (this.sock.destroyed) return reject(new Error(`${this.label}: closed (${this.closeCode}) before ${what}`));
        this.waiters.push(look);
      };
      look();
    });
  }

  closed(what) {
    return withTimeout(`${this.label}: ${what}`, (resolve) => {
      const look = () => (this.closeCode !== null ? resolve(this.closeCode) : this.waiters.push(look));
      look();
    });
  }

  send(text, { compress = false } = {}) {
    this.sock.write(compress ? clientFrame(0x1, deflateMessage(text), true) : clientFrame(0x1, Buffer.from(text)));
  }

  async socketId() {
    const m = await this.next('connection_established', (x) => x.event === 'pusher:connection_established');
    return JSON.parse(m.json.data).socket_id;
  }

  /** Join a presence channel as `user`, signed by the official SDK; the snapshot message. */
  async join(channel, user) {
    const auth = api.authorizeChannel(await this.socketId(), channel, user);
    const from = this.messages.length;
    this.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel, ...auth } }));
    return this.next(`joined ${channel}`, (m) => m.event === 'pusher_internal:subscription_succeeded' && m.channel === channel, from);
  }

  async subscribe(channel, opts) {
    const from = this.messages.length;
    this.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel } }), opts);
    await this.next(`subscribed to ${channel}`, (m) => m.event === 'pusher_internal:subscription_succeeded' && m.channel === channel, from);
  }

  end() {
    this.sock.destroy();
  }
}

/** Node's `ws`, with or without permessage-deflate, collecting texts. */
async function wsClient(label, perMessageDeflate) {
  const ws = new WebSocket(`${overTls ? 'wss' : 'ws'}://${env.host}:${env.port}${path}`, { perMessageDeflate });
  const texts = [];
  const waiters = [];
  ws.on('message', (data, isBinary) => {
    assert.ok(!isBinary);
    texts.push(data.toString());
    for (const w of waiters.splice(0)) w();
  });
  await withTimeout(`${label}: open`, (resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  const next = (what, pred, from = 0) =>
    withTimeout(`${label}: ${what}`, (resolve) => {
      const look = () => {
        const t = texts.slice(from).find((x) => pred(JSON.parse(x)));
        return t ? resolve(t) : waiters.push(look);
      };
      look();
    });
  return {
    ws,
    texts,
    next,
    async subscribe(channel) {
      const from = texts.length;
      ws.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel } }));
      await next(`subscribed to ${channel}`, (m) => m.event === 'pusher_internal:subscription_succeeded', from);
    },
  };
}

/** `herdgate_compression_bytes_total{stage}` from the admin listener. */
async function compressedBytes(stage) {
  const body = await (await fetch(`${process.env.HERDGATE_ADMIN_URL}/metrics`)).text();
  const line = body.split('\n').find((l) => l.startsWith(`herdgate_compression_bytes_total{stage="${stage}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** A JSON event of about 2 KB, as a scoreboard would send. */
function scoreboard() {
  const players = [];
  for (let i = 0; i < 18; i++) {
    players.push({ id: `player-${i}`, name: `Player number ${i}`, team: i % 2 ? 'home' : 'away', goals: i % 3, assists: i % 4, minutes: 44 + i });
  }
  return { match: 'final', minute: 44, score: { home: 2, away: 1 }, players };
}

test('a 2 KB event reaches compressing and plain clients identical, compressed once, and small ones go plain', async () => {
  const channel = uniq('deflate-');
  const r = await RawClient.open('raw deflate', { offer: 'permessage-deflate; client_max_window_bits' });
  const q = await RawClient.open('raw plain', { offer: null });
  const d = await wsClient('ws deflate', true);
  const p = await wsClient('ws plain', false);
  try {
    const answer = r.headers['sec-websocket-extensions'];
    assert.match(answer, /^permessage-deflate/);
    assert.match(answer, /server_no_context_takeover/);
    assert.match(answer, /client_no_context_takeover/);
    assert.equal(q.headers['sec-websocket-extensions'], undefined, 'no offer, no extension');
    assert.match(d.ws.extensions, /permessage-deflate/, 'ws negotiated it');
    assert.equal(p.ws.extensions, '', 'ws without it did not');

    // The raw client's subscribe goes compressed: herdgate inflates it.
    await r.subscribe(channel, { compress: true });
    await q.subscribe(channel);
    await d.subscribe(channel);
    await p.subscribe(channel);

    const before = await compressedBytes('in');
    const data = scoreboard();
    await api.trigger(channel, 'score', data);
    const big = (m) => m.event === 'score' && m.channel === channel;
    const [rm, qm, dt, pt] = await Promise.all([
      r.next('the 2 KB event', big),
      q.next('the 2 KB event', big),
      d.next('the 2 KB event', big),
      p.next('the 2 KB event', big),
    ]);
    assert.ok(rm.compressed, 'RSV1 set for the compressing client');
    assert.ok(!qm.compressed, 'plain for the client without the extension');
    assert.equal(rm.text, qm.text, 'identical after inflate');
    assert.equal(dt, qm.text);
    assert.equal(pt, qm.text);
    assert.deepEqual(JSON.parse(qm.json.data), data);
    const textBytes = Buffer.byteLength(qm.text);
    assert.ok(textBytes > 1800 && textBytes < 2600, `a 2 KB event (${textBytes} bytes)`);
    const ratio = textBytes / rm.wire;
    console.log(`# 2 KB event: ${textBytes} bytes as text, ${rm.wire} compressed (${ratio.toFixed(2)}x fewer)`);
    assert.ok(ratio >= 2.5, `at least 2.5x fewer bytes: ${ratio.toFixed(2)}`);
    const after = await compressedBytes('in');
    assert.equal(after - before, textBytes, 'compressed once for two compressing sockets');

    // Under compression.min_bytes (256): sent plain to everyone.
    await api.trigger(channel, 'small', { n: 1 });
    const small = await r.next('the small event', (m) => m.event === 'small');
    assert.ok(!small.compressed, 'a small message goes uncompressed');
    await d.next('the small event', (m) => m.event === 'small');
  } finally {
    r.end();
    q.end();
    d.ws.terminate();
    p.ws.terminate();
  }
});

test('a 10 KB presence snapshot goes compressed to the joiner that offered deflate', async () => {
  const channel = uniq('presence-deflate-');
  const members = [];
  try {
    for (let i = 0; i < 60; i++) {
      const m = await RawClient.open(`member ${i}`, { offer: null });
      members.push(m);
      await m.join(channel, {
        user_id: `attendee-${i}`,
        user_info: { name: `Attendee ${i}`, title: i % 3 ? 'Engineer' : 'Product manager', company: `Company ${i % 7}`, avatar: `https://cdn.example/avatars/${1000 + i}.png` },
      });
    }
    const user = { user_id: 'joiner', user_info: { name: 'Joiner' } };
    const z = await RawClient.open('joiner deflate', { offer: 'permessage-deflate' });
    const p = await RawClient.open('joiner plain', { offer: null });
    members.push(z, p);
    const [zs, ps] = [await z.join(channel, user), await p.join(channel, { ...user, user_id: 'joiner-2' })];
    assert.ok(zs.compressed && !ps.compressed);
    const snapshot = JSON.parse(zs.json.data);
    assert.equal(snapshot.presence.count, 61, 'the snapshot lists every member');
    const ratio = ps.wire / zs.wire;
    console.log(`# presence snapshot: ${ps.wire} bytes plain, ${zs.wire} compressed (${ratio.toFixed(2)}x fewer)`);
    assert.ok(ps.wire > 9000, `a ~10 KB snapshot (${ps.wire})`);
    assert.ok(ratio >= 2.5, `at least 2.5x fewer bytes: ${ratio.toFixed(2)}`);
  } finally {
    for (const m of members) m.end();
  }
});

test('a deflate bomb is closed 1009, garbage 1007, and the room goes on', async () => {
  const channel = uniq('bomb-');
  const honest = await wsClient('honest ws deflate', true);
  const watcher = await RawClient.open('honest raw', { offer: 'permessage-deflate' });
  const bomber = await RawClient.open('bomber', { offer: 'permessage-deflate' });
  const garbler = await RawClient.open('garbler', { offer: 'permessage-deflate' });
  try {
    await honest.subscribe(channel);
    await watcher.subscribe(channel);
    await bomber.subscribe(channel);
    // 4 MiB of a client event inflated from a frame of a few KiB, against
    // max_message_bytes = 64 KiB.
    const huge = JSON.stringify({ event: 'client-x', channel, data: { pad: 'a'.repeat(4 << 20) } });
    const bomb = deflateMessage(huge);
    assert.ok(bomb.length < 16 << 10, `the bomb is small on the wire (${bomb.length})`);
    bomber.sock.write(clientFrame(0x1, bomb, true));
    assert.equal(await bomber.closed('closed for the bomb'), 1009);
    garbler.sock.write(clientFrame(0x1, Buffer.alloc(40, 0xff), true));
    assert.equal(await garbler.closed('closed for data that does not inflate'), 1007);

    await api.trigger(channel, 'after', scoreboard());
    const m = await watcher.next('the event after the attack', (x) => x.event === 'after');
    assert.ok(m.compressed);
    await honest.next('the event after the attack', (x) => x.event === 'after');
  } finally {
    honest.ws.terminate();
    watcher.end();
    bomber.end();
    garbler.end();
  }
});
