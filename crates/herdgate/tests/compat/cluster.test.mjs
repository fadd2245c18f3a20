// pusher-js clients on two different edges of a cluster (2 edges, 3 workers,
// real processes started by tests/integration/compat.rs): shared presence and private
// rooms, member and client events across edges, publishes through either
// edge reaching everyone exactly once, the same query answers on both edges.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { connect, subscribe, disconnectAll, jsonOk, makeServer, uniq } from './helpers.mjs';

afterEach(disconnectAll);

const edgePorts = [Number(process.env.HERDGATE_EDGE1_PORT), Number(process.env.HERDGATE_EDGE2_PORT)];
const onEdge = (i) => ({ clientOptions: { wsPort: edgePorts[i] } });
const servers = edgePorts.map((port) => makeServer({ port }));

test('cluster: pusher-js on two edges share presence and private rooms', async () => {
  assert.ok(edgePorts.every((p) => p > 0), 'HERDGATE_EDGE1_PORT and HERDGATE_EDGE2_PORT name the edges');
  const presence = uniq('presence-cluster-');
  const priv = uniq('private-cluster-');
  const alice = { id: uniq('alice-'), info: { name: 'Alice' } };
  const bob = { id: uniq('bob-'), info: { name: 'Bob' } };

  const a = await connect('alice@edge1', { user: alice, ...onEdge(0) });
  const b = await connect('bob@edge2', { user: bob, ...onEdge(1) });
  const { channel: presA } = await subscribe(a, presence, 'pusher:member_added', 'client-wave');
  const { channel: presB } = await subscribe(b, presence, 'client-wave');
  assert.equal(presB.members.count, 2, 'bob (edge 2) sees alice (edge 1) in the member list');
  const added = await a.log.waitFor({ channel: presence, event: 'pusher:member_added' });
  assert.deepEqual(added.data, { id: bob.id, info: bob.info }, 'alice gets member_added for bob across edges');
  assert.equal(presA.members.count, 2);

  // Client events cross edges; on presence they carry the sender's user_id.
  presA.trigger('client-wave', { hi: 'from edge 1' });
  const wave = await b.log.waitFor({ channel: presence, event: 'client-wave' });
  assert.deepEqual(wave.data, { hi: 'from edge 1' });
  assert.equal(wave.metadata.user_id, alice.id);

  await subscribe(a, priv, 'news', 'client-note');
  const { channel: privB } = await subscribe(b, priv, 'news');
  privB.trigger('client-note', { n: 1 });
  await a.log.waitFor({ channel: priv, event: 'client-note' });

  // A publish through either edge reaches both sockets exactly once.
  for (const [i, server] of servers.entries()) {
    await jsonOk(server.trigger(priv, 'news', { via: i }), `POST /events via edge ${i + 1}`);
    for (const c of [a, b]) {
      const e = await c.log.waitFor((ev) => ev.channel === priv && ev.event === 'news' && ev.data.via === i);
      assert.deepEqual(e.data, { via: i });
    }
  }
  for (const c of [a, b]) {
    assert.equal(c.log.entries.filter((e) => e.channel === priv && e.event === 'news').length, 2, `${c.label}: each publish once`);
  }

  // The same answers from both edges.
  const answers = [];
  for (const server of servers) {
    const info = await jsonOk(server.get({ path: `/channels/${presence}`, params: { info: 'user_count,subscription_count' } }), 'GET channel');
    const users = await jsonOk(server.get({ path: `/channels/${presence}/users` }), 'GET users');
    answers.push({ info, users: users.users.map((u) => u.id).sort() });
  }
  assert.deepEqual(answers[0], answers[1], 'both edges answer the same');
  assert.deepEqual(answers[0].info, { occupied: true, user_count: 2, subscription_count: 2 });
});
