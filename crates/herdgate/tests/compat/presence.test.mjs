// Presence channels: member lists, member_added / member_removed, and
// per-user (not per-socket) membership when one user has several sockets.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  backend,
  connect,
  subscribe,
  disconnect,
  disconnectAll,
  jsonOk,
  uniq,
} from './helpers.mjs';

afterEach(disconnectAll);

const MEMBER_EVENTS = ['pusher:member_added', 'pusher:member_removed'];

test('presence: members, member_added and member_removed between two users', async () => {
  const channelName = uniq('presence-room-');
  const alice = { id: uniq('alice-'), info: { name: 'Alice', role: 'admin' } };
  const bob = { id: uniq('bob-'), info: { name: 'Bob' } };

  const a = await connect('alice', { user: alice });
  const { channel: chA, succeeded } = await subscribe(a, channelName, ...MEMBER_EVENTS);
  // pusher-js hands the Members object to pusher:subscription_succeeded.
  assert.equal(succeeded.data, chA.members);
  assert.equal(chA.members.count, 1, 'alone in the channel: count 1');
  assert.deepEqual(chA.members.me, { id: alice.id, info: alice.info }, 'members.me for alice');

  const b = await connect('bob', { user: bob });
  const { channel: chB } = await subscribe(b, channelName, 'marker', ...MEMBER_EVENTS);
  assert.equal(chB.members.count, 2, 'bob sees both members on subscribe');
  assert.deepEqual(chB.members.me, { id: bob.id, info: bob.info }, 'members.me for bob');
  assert.deepEqual(chB.members.get(alice.id), { id: alice.id, info: alice.info }, 'bob sees alice with her user_info');

  const added = await a.log.waitFor({ channel: channelName, event: 'pusher:member_added' });
  assert.deepEqual(added.data, { id: bob.id, info: bob.info }, 'alice gets member_added for bob');
  assert.equal(chA.members.count, 2, 'alice: count 2 after member_added');
  assert.deepEqual(chA.members.get(bob.id), { id: bob.id, info: bob.info });
  await jsonOk(backend.trigger(channelName, 'marker', {}), 'POST /events (marker)');
  await b.log.assertAbsentBefore(
    { event: 'pusher:member_added' },
    { channel: channelName, event: 'marker' },
    'a member must not get member_added for itself',
  );

  disconnect(b);
  const removed = await a.log.waitFor({ channel: channelName, event: 'pusher:member_removed' });
  assert.deepEqual(removed.data, { id: bob.id, info: bob.info }, 'alice gets member_removed for bob');
  assert.equal(chA.members.count, 1, 'alice: count back to 1');
  assert.equal(chA.members.get(bob.id), null);
});

test('presence: one user on two sockets is one member (one member_added, member_removed after the last socket)', async () => {
  const channelName = uniq('presence-dup-');
  const probeName = uniq('presence-probe-');
  const observerUser = { id: uniq('observer-'), info: { name: 'Observer' } };
  const dupUser = { id: uniq('dup-'), info: { name: 'Twice' } };
  const probeUserId = uniq('probe-');

  const observer = await connect('observer', { user: observerUser });
  const { channel: obsCh } = await subscribe(observer, channelName, 'marker', ...MEMBER_EVENTS);
  await subscribe(observer, probeName, ...MEMBER_EVENTS);

  // First socket of the user joins: the observer sees it once.
  // It also joins a probe channel under a distinct user id, so that the
  // observer can see exactly when herdgate has processed that socket's close.
  const first = await connect('dup socket 1', {
    user: dupUser,
    presenceFor: (name) =>
      name === probeName
        ? { user_id: probeUserId, user_info: {} }
        : { user_id: dupUser.id, user_info: dupUser.info },
  });
  await subscribe(first, channelName);
  await subscribe(first, probeName);
  await observer.log.waitFor({ channel: channelName, event: 'pusher:member_added' });
  await observer.log.waitFor({ channel: probeName, event: 'pusher:member_added' });

  // Second socket of the same user joins.
  const second = await connect('dup socket 2', { user: dupUser });
  const { channel: secondCh } = await subscribe(second, channelName);
  assert.equal(secondCh.members.count, 2, 'the second socket sees 2 members (observer + this user once)');
  assert.deepEqual(secondCh.members.me, { id: dupUser.id, info: dupUser.info });

  await jsonOk(backend.trigger(channelName, 'marker', { n: 1 }), 'POST /events (marker 1)');
  await observer.log.waitFor({ channel: channelName, event: 'marker', data: { n: 1 } });
  assert.equal(
    observer.log.filter({ channel: channelName, event: 'pusher:member_added' }).length,
    1,
    'a second socket of an existing member must not produce another member_added',
  );
  assert.equal(obsCh.members.count, 2);

  // First socket leaves: the user is still present through the second one.
  disconnect(first);
  const probeRemoved = await observer.log.waitFor({ channel: probeName, event: 'pusher:member_removed' });
  assert.equal(probeRemoved.data.id, probeUserId);
  await jsonOk(backend.trigger(channelName, 'marker', { n: 2 }), 'POST /events (marker 2)');
  await observer.log.assertAbsentBefore(
    { channel: channelName, event: 'pusher:member_removed' },
    { channel: channelName, event: 'marker', data: { n: 2 } },
    'member_removed was sent while the user still had another socket in the channel',
  );
  assert.equal(obsCh.members.count, 2);

  // Last socket leaves: now the user is gone.
  disconnect(second);
  const removed = await observer.log.waitFor({ channel: channelName, event: 'pusher:member_removed' });
  assert.deepEqual(removed.data, { id: dupUser.id, info: dupUser.info });
  assert.equal(obsCh.members.count, 1);
});
