// HTTP API through the official server SDK: channel queries and authentication.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import PusherServer from 'pusher';
import {
  backend,
  connect,
  subscribe,
  disconnect,
  disconnectAll,
  jsonOk,
  makeServer,
  uniq,
} from './helpers.mjs';

afterEach(disconnectAll);

test('channel queries: /channels, /channels/{name} and /channels/{name}/users', async () => {
  const presence = uniq('presence-query-');
  const publicName = uniq('query-public-');
  const unused = uniq('query-unused-');
  const alice = { id: uniq('alice-'), info: { name: 'Alice' } };
  const bob = { id: uniq('bob-'), info: { name: 'Bob' } };

  const a1 = await connect('alice socket 1', { user: alice });
  const a2 = await connect('alice socket 2', { user: alice });
  const b = await connect('bob', { user: bob });
  await subscribe(a1, presence, 'pusher:member_removed');
  await subscribe(a2, presence);
  await subscribe(b, presence);
  await subscribe(a1, publicName);

  // List presence channels with their user counts.
  const list = await jsonOk(
    backend.get({ path: '/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' } }),
    'GET /channels?filter_by_prefix=presence-&info=user_count',
  );
  assert.equal(typeof list.channels, 'object', `expected {"channels": {...}}, got ${JSON.stringify(list)}`);
  assert.deepEqual(list.channels[presence], { user_count: 2 }, 'two distinct users on three sockets');
  assert.ok(!(publicName in list.channels), 'filter_by_prefix=presence- must exclude public channels');
  for (const name of Object.keys(list.channels)) {
    assert.ok(name.startsWith('presence-'), `unexpected channel ${name} in presence- listing`);
  }

  // Unfiltered listing includes both occupied channels.
  const all = await jsonOk(backend.get({ path: '/channels' }), 'GET /channels');
  assert.ok(presence in all.channels && publicName in all.channels, 'unfiltered listing has both channels');
  assert.ok(!(unused in all.channels), 'unoccupied channels are not listed');

  // One presence channel with user and subscription counts.
  const info = await jsonOk(
    backend.get({ path: '/channels/' + presence, params: { info: 'user_count,subscription_count' } }),
    `GET /channels/${presence}?info=user_count,subscription_count`,
  );
  assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 3 });

  // Public channel without info, and an unoccupied channel.
  const pub = await jsonOk(backend.get({ path: '/channels/' + publicName }), `GET /channels/${publicName}`);
  assert.equal(pub.occupied, true);
  const empty = await jsonOk(backend.get({ path: '/channels/' + unused }), `GET /channels/${unused}`);
  assert.equal(empty.occupied, false);

  // Users of the presence channel.
  const users = await jsonOk(backend.get({ path: `/channels/${presence}/users` }), `GET /channels/${presence}/users`);
  assert.ok(Array.isArray(users.users), `expected {"users": [...]}, got ${JSON.stringify(users)}`);
  assert.deepEqual(
    users.users.map((u) => u.id).sort(),
    [alice.id, bob.id].sort(),
    'each user listed once, by id',
  );

  // After bob leaves (alice has seen member_removed) the counts follow.
  disconnect(b);
  await a1.log.waitFor({ channel: presence, event: 'pusher:member_removed' });
  const after = await jsonOk(
    backend.get({ path: '/channels/' + presence, params: { info: 'user_count,subscription_count' } }),
    `GET /channels/${presence} after bob left`,
  );
  assert.deepEqual(after, { occupied: true, user_count: 1, subscription_count: 2 });
  const usersAfter = await jsonOk(backend.get({ path: `/channels/${presence}/users` }), 'GET users after bob left');
  assert.deepEqual(usersAfter.users.map((u) => u.id), [alice.id]);
});

test('requests signed with the wrong secret are rejected with 401', async () => {
  const channelName = uniq('auth-check-');
  const a = await connect('subscriber');
  await subscribe(a, channelName, 'forged', 'marker');

  const forger = makeServer({ secret: 'definitely-not-the-secret' });
  await assert.rejects(
    forger.trigger(channelName, 'forged', { evil: true }),
    (err) => {
      assert.ok(err instanceof PusherServer.RequestError, `expected a RequestError, got ${err}`);
      assert.equal(err.status, 401, `expected HTTP 401, got ${err.status}: ${err.body}`);
      return true;
    },
  );
  await assert.rejects(forger.get({ path: '/channels' }), (err) => {
    assert.ok(err instanceof PusherServer.RequestError);
    assert.equal(err.status, 401, `GET /channels with a wrong secret: expected 401, got ${err.status}`);
    return true;
  });

  // The forged event must not have been published.
  await jsonOk(backend.trigger(channelName, 'marker', {}), 'POST /events (marker)');
  await a.log.assertAbsentBefore(
    { event: 'forged' },
    { channel: channelName, event: 'marker' },
    'an event from a request with a bad signature was delivered',
  );
});
