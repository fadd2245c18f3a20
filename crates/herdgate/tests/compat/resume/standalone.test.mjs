// Missed-message recovery with the real pusher-js and the herdgate-resume
// plugin, against one herdgate (history on) and one with history off
// (HERDGATE_PLAIN_PORT) for the byte-identical frames check. Events are
// published with the official Node SDK.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import PusherClient from 'pusher-js';
import withResume from '../../../../../clients/js/herdgate-resume/index.js';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect, disconnectAll, makeServer, subscribe, uniq, withTimeout, env } from '../helpers.mjs';

afterEach(() => disconnectAll());

const api = makeServer();

/** Wait until pusher-js reports `state`. */
function reach(c, state) {
  return withTimeout(`${c.label} to reach '${state}'`, (resolve) => {
    const check = () => {
      if (c.client.connection.state === state) {
        c.client.connection.unbind('state_change', check);
        resolve();
      }
    };
    c.client.connection.bind('state_change', check);
    check();
  });
}

async function publish(channel, from, to) {
  for (let i = from; i < to; i++) {
    await api.trigger(channel, 'msg', { n: i });
  }
}

/** The `msg` numbers the channel received, in order, after log index `from`. */
function numbers(c, channel, from = 0) {
  return c.log.entries.slice(from).filter((e) => e.channel === channel && e.event === 'msg').map((e) => e.data.n);
}

async function resumedAfter(c, channel, from) {
  return c.log.waitFor(
    (e) => e.channel === channel && e.event === 'herdgate:resumed' && c.log.entries.indexOf(e) >= from,
    `herdgate:resumed on ${channel}`,
  );
}

test('a reconnect gets exactly the 50 events it missed, in order, then recovered: true', async () => {
  const c = withResumeClient(await connect('resumer'));
  const channel = uniq('chat-');
  await subscribe(c, channel, 'msg', 'herdgate:resumed');
  await publish(channel, 0, 3);
  await c.log.waitFor({ channel, event: 'msg', data: { n: 2 } });

  c.client.disconnect();
  await reach(c, 'disconnected');
  await publish(channel, 3, 53);
  const mark = c.log.entries.length;
  c.client.connect();
  const resumed = await resumedAfter(c, channel, mark);
  assert.equal(resumed.data.recovered, true, JSON.stringify(resumed.data));
  const idx = c.log.entries.indexOf(resumed);
  const replayed = numbers(c, channel, mark).slice(0, c.log.entries.slice(mark, idx).filter((e) => e.event === 'msg').length);
  assert.deepEqual(replayed, Array.from({ length: 50 }, (_, i) => i + 3), 'exactly the missed events, in order');

  // Live events go on after the replay, none twice.
  await publish(channel, 53, 55);
  await c.log.waitFor({ channel, event: 'msg', data: { n: 54 } });
  assert.deepEqual(numbers(c, channel), Array.from({ length: 55 }, (_, i) => i), 'every event once, in order');
});

test('past the history bound the reconnect is told recovered: false and gets no partial replay', async () => {
  const c = withResumeClient(await connect('far-behind'));
  const channel = uniq('chat-');
  await subscribe(c, channel, 'msg', 'herdgate:resumed');
  await publish(channel, 0, 1);
  await c.log.waitFor({ channel, event: 'msg', data: { n: 0 } });
  c.client.disconnect();
  await reach(c, 'disconnected');
  await publish(channel, 1, 131); // history_max_events is 100
  const mark = c.log.entries.length;
  c.client.connect();
  const resumed = await resumedAfter(c, channel, mark);
  assert.equal(resumed.data.recovered, false);
  assert.deepEqual(numbers(c, channel, mark), [], 'nothing replayed: the app reloads instead');
  // The position it was given works for the next reconnect.
  c.client.disconnect();
  await reach(c, 'disconnected');
  await publish(channel, 131, 136);
  const again = c.log.entries.length;
  c.client.connect();
  const next = await resumedAfter(c, channel, again);
  assert.equal(next.data.recovered, true);
  assert.deepEqual(numbers(c, channel, again), [131, 132, 133, 134, 135]);
});

test('private and presence channels resume too; the history API agrees with what was replayed', async () => {
  const c = withResumeClient(await connect('private-resumer'));
  const priv = uniq('private-inbox-');
  const pres = uniq('presence-room-');
  await subscribe(c, priv, 'msg', 'herdgate:resumed');
  await subscribe(c, pres, 'msg', 'herdgate:resumed');
  c.client.disconnect();
  await reach(c, 'disconnected');
  await publish(priv, 0, 5);
  await publish(pres, 0, 3);
  const mark = c.log.entries.length;
  c.client.connect();
  assert.equal((await resumedAfter(c, priv, mark)).data.recovered, true);
  assert.equal((await resumedAfter(c, pres, mark)).data.recovered, true);
  assert.deepEqual(numbers(c, priv, mark), [0, 1, 2, 3, 4]);
  assert.deepEqual(numbers(c, pres, mark), [0, 1, 2]);

  // The same events over the signed HTTP API, paged by serial.
  const res = await api.get({ path: `/channels/${priv}/history`, params: { since: 0, limit: 3 } });
  assert.equal(res.status, 200);
  const page = await res.json();
  assert.equal(typeof page.epoch, 'string');
  assert.equal(page.more, true);
  assert.deepEqual(page.events.map((e) => JSON.parse(e.data).n), [0, 1, 2]);
  assert.ok(page.events.every((e) => e.name === 'msg'));
  const last = page.events[2].serial;
  const rest = await (await api.get({ path: `/channels/${priv}/history`, params: { since: last, epoch: page.epoch } })).json();
  assert.equal(rest.complete, true);
  assert.equal(rest.more, false);
  assert.deepEqual(rest.events.map((e) => JSON.parse(e.data).n), [3, 4]);
  const stale = await (await api.get({ path: `/channels/${priv}/history`, params: { since: last, epoch: 'not-this-one' } })).json();
  assert.equal(stale.complete, false, 'a position from another epoch is not complete');
});

test('the history API refuses bad input with 400', async () => {
  const channel = uniq('chat-');
  for (const params of [{ limit: 1001 }, { limit: 0 }, { since: -1 }, { since: 'x' }]) {
    await assert.rejects(api.get({ path: `/channels/${channel}/history`, params }), (e) => {
      assert.equal(e.status, 400, `${JSON.stringify(params)}: ${e.body}`);
      return true;
    });
  }
});

test('forged serials and stale epochs on the wire are answered recovered: false', async () => {
  const c = await connect('forger');
  const channel = uniq('chat-');
  await publish(channel, 0, 2);
  const sent = [];
  const transport = c.client.connection.connection.transport;
  transport.bind('message', (m) => sent.push(JSON.parse(m.data)));
  const resumedOn = (name) =>
    withTimeout(`herdgate:resumed on ${name}`, (resolve) => {
      const check = () => {
        const r = sent.find((m) => m.channel === name && m.event === 'herdgate:resumed');
        if (r) resolve(JSON.parse(r.data));
        else setTimeout(check, 5);
      };
      check();
    });
  // A far-future serial in the right epoch.
  const h = await (await api.get({ path: `/channels/${channel}/history`, params: {} })).json();
  c.client.send_event('pusher:subscribe', { channel, resume: { serial: 2 ** 52, epoch: h.epoch } });
  assert.equal((await resumedOn(channel)).recovered, false);
  const other = uniq('chat-');
  c.client.send_event('pusher:subscribe', { channel: other, resume: { serial: 0, epoch: 'x'.repeat(100) } });
  assert.equal((await resumedOn(other)).recovered, false);
  // A malformed resume is a pusher:error, and the socket stays usable.
  c.client.send_event('pusher:subscribe', { channel: uniq('chat-'), resume: { serial: 'ten' } });
  await withTimeout('pusher:error for a malformed resume', (resolve) => {
    const check = () => (sent.some((m) => m.event === 'pusher:error') ? resolve() : setTimeout(check, 5));
    check();
  });
  assert.equal(c.client.connection.state, 'connected');
});

test('plain pusher-js sees byte-identical frames with history on and off', async () => {
  const frames = async (port) => {
    const c = await connect(`plain-${port}`, { clientOptions: { wsPort: port } });
    const raw = [];
    c.client.connection.connection.transport.bind('message', (m) => raw.push(m.data));
    const channel = 'chat-identical';
    await subscribe(c, channel, 'msg');
    const server = makeServer({ port });
    for (let i = 0; i < 3; i++) await server.trigger(channel, 'msg', { n: i });
    await c.log.waitFor({ channel, event: 'msg', data: { n: 2 } });
    c.client.disconnect();
    return raw;
  };
  const on = await frames(env.port);
  const off = await frames(Number(process.env.HERDGATE_PLAIN_PORT));
  assert.deepEqual(on, off);
  assert.ok(on.every((f) => !f.includes('"serial"') && !f.includes('"epoch"')), on.join('\n'));
});

test('a reconnect resuming many channels at once is never closed for its replays', async () => {
  const c = withResumeClient(await connect('many'));
  const channels = Array.from({ length: 5 }, () => uniq('chat-'));
  for (const ch of channels) await subscribe(c, ch, 'msg', 'herdgate:resumed');
  c.client.disconnect();
  await reach(c, 'disconnected');
  // 5 × 100 events: more than the socket's queue (256 frames) holds at once.
  for (const ch of channels) await publish(ch, 0, 100);
  const mark = c.log.entries.length;
  const states = c.states.length;
  c.client.connect();
  for (const ch of channels) {
    const r = await resumedAfter(c, ch, mark);
    const got = numbers(c, ch, mark);
    if (r.data.recovered) assert.deepEqual(got, Array.from({ length: 100 }, (_, i) => i), ch);
    else assert.deepEqual(got, [], `${ch}: not recovered, so nothing replayed`);
  }
  const closes = c.states.slice(states).filter((s) => s.previous === 'connected');
  assert.deepEqual(closes, [], 'the socket stayed connected through the replays');
  // Each resume may use half of the room the queue has left when it is
  // read, so the first one (100 of 120 frames) always fits; how many more
  // do depends on how far the writer got meanwhile.
  const recovered = channels.map((ch) => c.log.filter({ channel: ch, event: 'herdgate:resumed' }).at(-1).data.recovered);
  assert.equal(recovered[0], true, `the first replay fits the queue (recovered: ${recovered})`);
});

test('history turned off and on again by a reload: an old position is not recovered', async () => {
  const port = Number(process.env.HERDGATE_RELOAD_PORT);
  const path = process.env.HERDGATE_RELOAD_CONFIG;
  const pid = Number(process.env.HERDGATE_RELOAD_PID);
  const server = makeServer({ port });
  const original = readFileSync(path, 'utf8');
  const probe = uniq('probe-');
  /** Reload with `text` and wait until a probe event is kept (or not). */
  const reload = async (text, kept) => {
    writeFileSync(path, text);
    process.kill(pid, 'SIGHUP');
    await withTimeout(`history ${kept ? 'on' : 'off'} after the reload`, async (resolve) => {
      for (;;) {
        await server.trigger(probe, 'p', {});
        const h = await (await server.get({ path: `/channels/${probe}/history`, params: { limit: 1 } })).json();
        if ((h.events.length > 0) === kept && (kept || h.complete === false)) break;
        await server.get({ path: '/channels' }); // one round trip, then look again
      }
      resolve();
    });
  };
  const c = withResumeClient(await connect('reloaded', { clientOptions: { wsPort: port } }));
  const channel = uniq('chat-');
  await subscribe(c, channel, 'msg', 'herdgate:resumed');
  await server.trigger(channel, 'msg', { n: 0 });
  await c.log.waitFor({ channel, event: 'msg', data: { n: 0 } });
  c.client.disconnect();
  await reach(c, 'disconnected');
  await reload(original.replace('history_max_events = 100', 'history_max_events = 0'), false);
  for (let n = 1; n < 4; n++) await server.trigger(channel, 'msg', { n });
  await reload(original, true);
  const mark = c.log.entries.length;
  c.client.connect();
  const r = await resumedAfter(c, channel, mark);
  assert.equal(r.data.recovered, false, 'events 1-3 were kept nowhere');
});

function withResumeClient(c) {
  withResume(c.client);
  return c;
}
