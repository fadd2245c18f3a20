// User sign-in, server-to-user events and terminating a user's connections.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  backend,
  connect,
  subscribe,
  disconnectAll,
  jsonOk,
  signIn,
  uniq,
  waitForStateChangeFrom,
  withTimeout,
} from './helpers.mjs';

afterEach(disconnectAll);


test('user sign-in succeeds and sendToUser reaches only that user', async () => {
  const alice = await connect('alice', { user: { id: uniq('alice-'), info: { name: 'Alice' } } });
  const bob = await connect('bob', { user: { id: uniq('bob-'), info: { name: 'Bob' } } });
  await signIn(alice);
  await signIn(bob);

  for (const c of [alice, bob]) {
    c.client.user.bind('notice', (data) => c.log.push({ event: 'notice', data }));
  }

  await jsonOk(backend.sendToUser(alice.user.id, 'notice', { for: 'alice' }), 'POST /events to #server-to-user');
  const got = await alice.log.waitFor({ event: 'notice' });
  assert.deepEqual(got.data, { for: 'alice' });

  // A later event to bob arrives at bob after anything wrongly sent to him for alice.
  await jsonOk(backend.sendToUser(bob.user.id, 'notice', { for: 'bob' }), 'POST /events to #server-to-user (bob)');
  await bob.log.assertAbsentBefore(
    { event: 'notice', data: { for: 'alice' } },
    { event: 'notice', data: { for: 'bob' } },
    "bob received an event sent to alice's user channel",
  );
});

test('terminateUserConnections closes that user (code 4009, no reconnect) and leaves others connected', async () => {
  const channelName = uniq('terminate-');
  const victim = await connect('terminated user', { user: { id: uniq('victim-'), info: {} } });
  const bystander = await connect('other user', { user: { id: uniq('bystander-'), info: {} } });
  await signIn(victim);
  await signIn(bystander);
  await subscribe(victim, channelName, 'after');
  await subscribe(bystander, channelName, 'after');

  const since = victim.states.length;
  await jsonOk(backend.terminateUserConnections(victim.user.id), 'POST /users/{id}/terminate_connections');

  const change = await waitForStateChangeFrom(victim, 'connected', since);
  // pusher-js maps close codes 4000-4099 to "refused": straight to 'disconnected', no retry.
  // Any other close (1000, 1006, 42xx, ...) would leave it 'connected' and retry, or go 'connecting'.
  assert.deepEqual(
    change,
    { previous: 'connected', current: 'disconnected' },
    `the terminated client should go straight to 'disconnected' (close code 4009); errors: ${JSON.stringify(victim.errors)}`,
  );
  const codes = victim.errors.flatMap((e) => [e?.data?.code, e?.error?.data?.code]).filter((c) => c !== undefined);
  assert.ok(codes.includes(4009), `expected close code 4009 in pusher-js errors, got ${JSON.stringify(victim.errors)}`);
  assert.ok(!victim.client.connection.retryTimer, 'pusher-js must not have scheduled a reconnect');

  // The other user's connection is untouched and still receives events.
  assert.equal(bystander.client.connection.state, 'connected');
  await jsonOk(backend.trigger(channelName, 'after', { still: 'here' }), 'POST /events after terminate');
  const got = await bystander.log.waitFor({ channel: channelName, event: 'after' });
  assert.deepEqual(got.data, { still: 'here' });
  assert.equal(bystander.client.connection.state, 'connected');

  // Still no reconnect attempt by the terminated client.
  assert.equal(victim.client.connection.state, 'disconnected');
  assert.deepEqual(
    victim.states.slice(since).map((s) => s.current),
    ['disconnected'],
    'the terminated client must not try to reconnect',
  );
  assert.equal(victim.log.filter({ event: 'after' }).length, 0, 'the terminated client got no later event');
});
