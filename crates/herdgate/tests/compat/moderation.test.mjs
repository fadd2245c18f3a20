// Moderation (docs/PROTOCOL.md "Moderation") with pusher-js and the official
// Node SDK as the moderator: a user taken out of one channel on every socket,
// banned for a while, and let back in; on a presence channel, a private
// channel (a signed-in user), and across the two edges of a cluster.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import PusherServer from 'pusher';
import {
  backend,
  connect,
  subscribe,
  signIn,
  disconnectAll,
  jsonOk,
  makeServer,
  uniq,
} from './helpers.mjs';

afterEach(disconnectAll);

const removeUser = (server, channel, user, body) =>
  jsonOk(server.post({ path: `/channels/${channel}/users/${user}/remove`, ...(body ? { body } : {}) }), `remove ${user}`);
const unban = (server, channel, user) =>
  jsonOk(server.post({ path: `/channels/${channel}/users/${user}/unban` }), `unban ${user}`);

/** The HTTP status an SDK call was refused with. */
async function refusal(promise) {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof PusherServer.RequestError, `expected a RequestError, got ${err}`);
    return err.status;
  }
  assert.fail('expected the request to be refused');
}

const removedNotice = (channel) => (e) =>
  e.channel === channel && e.event === 'pusher:subscription_error' && e.data?.type === 'Removed';

/** Subscribe `c` to `name` again and resolve with the outcome:
 * pusher:subscription_succeeded or _error. pusher-js leaves a channel the
 * server refused "pending" for good (its unsubscribe + subscribe then sends
 * nothing): such a channel is dropped from `pusher.channels` first, as
 * docs/PROTOCOL.md "Moderation" tells apps to. */
async function subscribeAgain(c, name, ...events) {
  if (c.client.channel(name)?.subscriptionPending) c.client.channels.remove(name);
  else c.client.unsubscribe(name);
  const before = c.log.entries.length;
  const channel = c.client.subscribe(name);
  c.log.watch(channel, 'pusher:subscription_succeeded', 'pusher:subscription_error', ...events);
  await c.log.waitFor(
    (e) => e.channel === name && ['pusher:subscription_succeeded', 'pusher:subscription_error'].includes(e.event) &&
      c.log.entries.indexOf(e) >= before,
    `an answer to subscribing to ${name} again`,
  );
  return c.log.entries.slice(before).find((e) => e.channel === name && e.event.startsWith('pusher:subscription_'));
}

test('moderation: a removed presence member leaves on every socket, stays out while banned, and comes back once unbanned', async () => {
  const room = uniq('presence-qa-');
  const alice = { id: uniq('alice-'), info: { name: 'Alice' } };
  const a1 = await connect('alice-1', { user: alice });
  const a2 = await connect('alice-2', { user: alice });
  const bob = await connect('bob');
  await subscribe(a1, room, 'question');
  await subscribe(a2, room, 'question');
  await subscribe(bob, room, 'pusher:member_removed', 'pusher:member_added', 'question');

  const res = await removeUser(backend, room, alice.id, { ban_seconds: 60 });
  assert.deepEqual(res, { removed: 2, ban_seconds: 60 }, 'both of her sockets were taken out');
  for (const a of [a1, a2]) {
    const notice = await a.log.waitFor(removedNotice(room), `${a.label}: the removal notice`);
    assert.deepEqual(notice.data, {
      type: 'Removed',
      error: 'removed from the channel by a moderator',
      status: 403,
      ban_seconds: 60,
    });
  }
  const gone = await bob.log.waitFor({ channel: room, event: 'pusher:member_removed' });
  assert.equal(gone.data.id, alice.id, 'the other members see her leave');
  const users = await jsonOk(backend.get({ path: `/channels/${room}/users` }), 'GET users');
  assert.deepEqual(users.users.map((u) => u.id), [bob.user.id]);

  // Published while she is out: not hers (her sockets left the room).
  await jsonOk(backend.trigger(room, 'question', { n: 1 }), 'trigger n=1');
  await bob.log.waitFor({ channel: room, event: 'question', data: { n: 1 } });

  // Her app still authorizes her, but the ban refuses her, with the time left.
  const refused = await subscribeAgain(a1, room, 'question');
  assert.equal(refused.event, 'pusher:subscription_error');
  assert.equal(refused.data.type, 'Banned', JSON.stringify(refused.data));
  assert.equal(refused.data.status, 403);
  assert.ok(refused.data.retry_after >= 1 && refused.data.retry_after <= 60, `retry_after ${refused.data.retry_after}`);
  // A new connection is the same user: refused too.
  const a3 = await connect('alice-3', { user: alice });
  const fresh = await subscribeAgain(a3, room);
  assert.equal(fresh.data?.type, 'Banned');

  // Lifted early: she joins again, and members see her come back.
  assert.deepEqual(await unban(backend, room, alice.id), { lifted: true });
  assert.deepEqual(await unban(backend, room, alice.id), { lifted: false }, 'lifted once');
  const back = await subscribeAgain(a1, room, 'question');
  assert.equal(back.event, 'pusher:subscription_succeeded', JSON.stringify(back.data));
  const added = await bob.log.waitFor({ channel: room, event: 'pusher:member_added' });
  assert.equal(added.data.id, alice.id);
  await jsonOk(backend.trigger(room, 'question', { n: 2 }), 'trigger n=2');
  await a1.log.waitFor({ channel: room, event: 'question', data: { n: 2 } });
  for (const a of [a1, a2]) {
    assert.equal(a.log.filter({ channel: room, event: 'question', data: { n: 1 } }).length, 0,
      `${a.label} got nothing published while she was out`);
  }
});

test('moderation: on a private channel a removal names the signed-in user; without a ban they may come back', async () => {
  const room = uniq('private-chat-');
  const carol = await connect('carol');
  await signIn(carol);
  const dave = await connect('dave');
  await subscribe(carol, room, 'msg');
  await subscribe(dave, room, 'msg');

  const nobody = await removeUser(backend, room, uniq('nobody-'));
  assert.deepEqual(nobody, { removed: 0, ban_seconds: 0 }, 'a user not in the channel: nothing to do');

  assert.deepEqual(await removeUser(backend, room, carol.user.id), { removed: 1, ban_seconds: 0 });
  const notice = await carol.log.waitFor(removedNotice(room));
  assert.equal(notice.data.ban_seconds, 0);
  await jsonOk(backend.trigger(room, 'msg', { n: 1 }), 'trigger');
  await dave.log.waitFor({ channel: room, event: 'msg', data: { n: 1 } });
  const info = await jsonOk(backend.get({ path: `/channels/${room}`, params: { info: 'subscription_count' } }), 'GET channel');
  assert.equal(info.subscription_count, 1, 'only dave is left');

  const back = await subscribeAgain(carol, room, 'msg');
  assert.equal(back.event, 'pusher:subscription_succeeded', 'no ban: the app lets her back in');
  await jsonOk(backend.trigger(room, 'msg', { n: 2 }), 'trigger');
  await carol.log.waitFor({ channel: room, event: 'msg', data: { n: 2 } });
  assert.equal(carol.log.filter({ channel: room, event: 'msg', data: { n: 1 } }).length, 0);
});

test('moderation: bad removals get a 400 and change nothing', async () => {
  const room = uniq('presence-qa-');
  const erin = await connect('erin');
  await subscribe(erin, room);
  const path = `/channels/${room}/users/${erin.user.id}/remove`;
  assert.equal(await refusal(backend.post({ path, body: { ban_seconds: 7 * 86400 + 1 } })), 400, 'over 7 days');
  assert.equal(await refusal(backend.post({ path, body: { ban: 60 } })), 400, 'an unknown field');
  assert.equal(await refusal(backend.post({ path, body: { ban_seconds: -1 } })), 400, 'negative');
  assert.equal(await refusal(backend.post({ path: `/channels/bad!channel/users/x/remove` })), 400, 'a bad channel name');
  assert.equal(await refusal(makeServer({ secret: 'not-the-secret' }).post({ path })), 401, 'unsigned');
  const users = await jsonOk(backend.get({ path: `/channels/${room}/users` }), 'GET users');
  assert.deepEqual(users.users.map((u) => u.id), [erin.user.id], 'still there');
});

const edgePorts = [Number(process.env.HERDGATE_EDGE1_PORT), Number(process.env.HERDGATE_EDGE2_PORT)];

test('moderation: a removal and ban through one edge hold on the other', { skip: !(edgePorts[0] > 0) }, async () => {
  const onEdge = (i) => ({ clientOptions: { wsPort: edgePorts[i] } });
  const [viaEdge1, viaEdge2] = edgePorts.map((port) => makeServer({ port }));
  const room = uniq('presence-cluster-qa-');
  const alice = { id: uniq('alice-'), info: { name: 'Alice' } };
  const a = await connect('alice@edge1', { user: alice, ...onEdge(0) });
  const b = await connect('bob@edge2', onEdge(1));
  await subscribe(a, room, 'question', 'client-hi');
  await subscribe(b, room, 'pusher:member_removed', 'pusher:member_added', 'question', 'client-hi');
  await a.log.waitFor({ channel: room, event: 'pusher:subscription_succeeded' });

  assert.deepEqual(await removeUser(viaEdge2, room, alice.id, { ban_seconds: 120 }), { removed: 1, ban_seconds: 120 });
  await a.log.waitFor(removedNotice(room), 'the notice, through the owner and edge 1');
  const gone = await b.log.waitFor({ channel: room, event: 'pusher:member_removed' });
  assert.equal(gone.data.id, alice.id);

  // Through either edge, on the old socket or a new one: banned.
  assert.equal((await subscribeAgain(a, room)).data?.type, 'Banned', 'on edge 1');
  const a2 = await connect('alice@edge2', { user: alice, ...onEdge(1) });
  assert.equal((await subscribeAgain(a2, room)).data?.type, 'Banned', 'on edge 2');

  // Lifted through the other edge: back in.
  assert.deepEqual(await unban(viaEdge1, room, alice.id), { lifted: true });
  const back = await subscribeAgain(a2, room, 'question');
  assert.equal(back.event, 'pusher:subscription_succeeded', JSON.stringify(back.data));
  const added = await b.log.waitFor({ channel: room, event: 'pusher:member_added' });
  assert.equal(added.data.id, alice.id);
  await jsonOk(viaEdge1.trigger(room, 'question', { n: 1 }), 'trigger');
  await a2.log.waitFor({ channel: room, event: 'question', data: { n: 1 } });
  assert.equal(a.log.filter({ channel: room, event: 'question' }).length, 0, 'the removed socket got nothing');
});
