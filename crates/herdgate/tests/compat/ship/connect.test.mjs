// A real pusher-js client and the official Node SDK against a herdgate
// started from a shipped artifact (the container image's root filesystem,
// the Debian package's installed files): tests/ops/ship.rs starts it and points
// HERDGATE_* at it. Connect, a private and a presence subscription signed
// with the app secret the artifact was given, a server event, a client event.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { backend, connect, disconnectAll, subscribe, uniq } from '../helpers.mjs';

afterEach(() => disconnectAll());

test('pusher-js connects, subscribes and receives through the shipped herdgate', async () => {
  const a = await connect('shipped-a');
  const b = await connect('shipped-b');
  assert.match(a.client.connection.socket_id, /^\d+\.\d+$/, 'a Pusher socket id');

  const priv = uniq('private-shipped-');
  await subscribe(a, priv, 'news', 'client-wave');
  await subscribe(b, priv, 'client-wave');
  await backend.trigger(priv, 'news', { headline: 'from the shipped build' });
  const got = await a.log.waitFor({ channel: priv, event: 'news' });
  assert.deepEqual(got.data, { headline: 'from the shipped build' });

  b.client.channel(priv).trigger('client-wave', { from: 'b' });
  await a.log.waitFor({ channel: priv, event: 'client-wave', data: { from: 'b' } });

  const pres = uniq('presence-shipped-');
  await subscribe(a, pres, 'pusher:member_added');
  await subscribe(b, pres);
  await a.log.waitFor({ channel: pres, event: 'pusher:member_added', data: (d) => d.id === b.user.id });
});
