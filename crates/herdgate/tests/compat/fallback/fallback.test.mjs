// pusher-js over its HTTP fallback transports (xhr_streaming, xhr_polling),
// as on a network that breaks websockets, against a real herdgate; the
// official Node SDK publishes. HERDGATE_CAPPED_PORT is a herdgate with
// max_connections = 1 and a 1 s write timeout.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { backend, connect, disconnectAll, env, makeServer, subscribe, uniq, withTimeout } from '../helpers.mjs';

afterEach(() => disconnectAll());

const capped = Number(process.env.HERDGATE_CAPPED_PORT);

function over(transport, port = env.port) {
  return {
    clientOptions: {
      enabledTransports: [transport],
      httpHost: env.host,
      httpPort: port,
      wsPort: port,
      forceTLS: false,
    },
  };
}

for (const transport of ['xhr_streaming', 'xhr_polling']) {
  test(`${transport}: connect, subscribe (public, private, presence), receive, client events, disconnect`, async () => {
    const a = await connect(`${transport}-a`, over(transport));
    assert.equal(a.client.connection.connection.transport.name, transport, 'the fallback transport is the one in use');
    const b = await connect(`ws-b`); // a websocket peer in the same rooms

    const pub = uniq('news-');
    const priv = uniq('private-chat-');
    const pres = uniq('presence-room-');
    await subscribe(a, pub, 'headline');
    await subscribe(a, priv, 'client-typing');
    await subscribe(a, pres, 'pusher:member_added', 'pusher:member_removed', 'client-wave');
    await subscribe(b, priv, 'client-typing');
    await subscribe(b, pres, 'pusher:member_added', 'pusher:member_removed', 'client-wave');

    // Server events reach the fallback client, in order.
    for (let i = 0; i < 5; i++) await backend.trigger(pub, 'headline', { i });
    await a.log.waitFor({ channel: pub, event: 'headline', data: { i: 4 } });
    assert.deepEqual(a.log.filter({ channel: pub, event: 'headline' }).map((e) => e.data.i), [0, 1, 2, 3, 4]);

    // Presence: the fallback client is a member; it sees the websocket one join.
    await a.log.waitFor({ channel: pres, event: 'pusher:member_added', data: (d) => d.id === b.user.id });
    assert.ok(a.client.channel(pres).members.get(b.user.id), 'b is a member as a sees it');

    // Client events both ways (xhr_send carries a's).
    a.client.channel(priv).trigger('client-typing', { who: 'a' });
    await b.log.waitFor({ channel: priv, event: 'client-typing', data: { who: 'a' } });
    b.client.channel(pres).trigger('client-wave', { who: 'b' });
    await a.log.waitFor({ channel: pres, event: 'client-wave', data: { who: 'b' } });

    // A large burst crosses the transport whole.
    const big = 'x'.repeat(8000);
    for (let i = 0; i < 40; i++) await backend.trigger(pub, 'headline', { i: 100 + i, big });
    await a.log.waitFor({ channel: pub, event: 'headline', data: (d) => d.i === 139 });
    assert.equal(a.log.filter({ channel: pub, event: 'headline' }).length, 45);

    // Disconnecting ends the session: the websocket peer sees the member leave.
    a.client.disconnect();
    await b.log.waitFor({ channel: pres, event: 'pusher:member_removed', data: (d) => d.id === a.user.id });
  });
}

/** A session id as pusher-js makes them (letters and digits). */
const sid = () => Math.random().toString(36).slice(2, 10);

/** A raw fallback request, as pusher-js makes it. */
function raw(kind, session, { port = env.port, body, query = '?protocol=7&client=js&version=8.6.0' } = {}) {
  const url = `http://${env.host}:${port}/pusher/app/${env.key}/1/${session}/${kind}${kind === 'xhr_send' ? '' : query}`;
  return fetch(url, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body });
}

test('admission counts HTTP sessions like websockets: over the cap, 503 with Retry-After', async () => {
  const first = await connect('holder', over('xhr_polling', capped));
  const res = await raw('xhr_streaming', sid(), { port: capped });
  assert.equal(res.status, 503);
  assert.ok(Number(res.headers.get('retry-after')) > 0, 'Retry-After');
  await res.body?.cancel();
  first.client.disconnect();
});

test('bad input: malformed and oversized xhr_send bodies, unknown sessions, a wrong key', async () => {
  const session = sid();
  const open = await raw('xhr', session);
  assert.equal(open.status, 200);
  assert.equal(await open.text(), 'o\n');
  for (const body of ['{"event":"pusher:ping"}', '[1,2]', 'not json', '["x"']) {
    const r = await raw('xhr_send', session, { body });
    assert.equal(r.status, 400, body);
    await r.text();
  }
  const tooBig = await raw('xhr_send', session, { body: JSON.stringify(['x'.repeat(70000)]) });
  assert.equal(tooBig.status, 413);
  await tooBig.text();
  const unknown = await raw('xhr_send', sid(), { body: '[]' });
  assert.equal(unknown.status, 404);
  await unknown.text();
  // A frame the session refuses is answered on the stream, like on a websocket.
  const ok = await raw('xhr_send', session, { body: JSON.stringify(['{"event":"pusher:nonsense"}']) });
  assert.equal(ok.status, 204);
  // Poll as pusher-js does until the answer comes (connection_established first).
  let seen = '';
  await withTimeout('pusher:error over the poll', async (resolve) => {
    while (!seen.includes('pusher:error')) seen += await (await raw('xhr', session)).text();
    resolve();
  });
  assert.match(seen, /^a\[.*connection_established.*\]\n(a\[.*\n)*a\[.*pusher:error/s);
  // An unknown app key: opened, told 4001, closed.
  const wrong = await fetch(`http://${env.host}:${env.port}/pusher/app/nokey/1/${sid()}/xhr?protocol=7`, { method: 'POST' });
  const text = await wrong.text();
  assert.match(text, /^o\na\[.*4001.*\]\nc\[4001,/);
});

test('a client that stops polling is closed by its write deadline and frees its slot', async () => {
  const session = sid();
  // The last test's client may still hold the only slot (until its session
  // notices it is gone): open as soon as the slot is free.
  let opened = '';
  await withTimeout('a free slot', async (resolve) => {
    for (;;) {
      const r = await raw('xhr', session, { port: capped });
      opened = await r.text();
      if (r.status === 200) break;
      assert.equal(r.status, 503, opened);
      await new Promise((r) => setTimeout(r, 100));
    }
    resolve();
  });
  assert.equal(opened, 'o\n');
  const channel = uniq('news-');
  const sub = await raw('xhr_send', session, { port: capped, body: JSON.stringify([JSON.stringify({ event: 'pusher:subscribe', data: { channel } })]) });
  assert.equal(sub.status, 204);
  // The server has frames for it (connection_established, subscription_succeeded)
  // that nobody takes: after the 1 s write timeout the session ends.
  const server = makeServer({ port: capped });
  await withTimeout('the stalled session to end and its slot to free', async (resolve, reject) => {
    for (;;) {
      const r = await raw('xhr_send', session, { port: capped, body: '[]' });
      await r.text();
      if (r.status === 404) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    resolve();
  });
  // The slot is free again: a new client connects under max_connections = 1.
  const next = await connect('after', over('xhr_polling', capped));
  next.client.disconnect();
  await server.trigger(channel, 'x', {}).catch(() => {});
});
