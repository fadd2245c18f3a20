// Pusher parity as pusher-js 8.6.0 and the official Node SDK see it: cache
// channels, subscription counts, watchlist events, idempotent publishes;
// and on a cluster, the same with sockets on two edges (the rooms' owners
// count and cache across edges).

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { backend, connect, disconnect, disconnectAll, jsonOk, makeServer, signIn, subscribe, uniq } from './helpers.mjs';

afterEach(disconnectAll);

const edgePorts = [Number(process.env.HERDGATE_EDGE1_PORT), Number(process.env.HERDGATE_EDGE2_PORT)];
const onEdge = (i) => ({ clientOptions: { wsPort: edgePorts[i] } });

for (const where of ['standalone', 'cluster']) {
  const opts = (i) => (where === 'cluster' ? onEdge(i) : {});
  const server = where === 'cluster' ? makeServer({ port: edgePorts[1] }) : backend;

  test(`${where}: a cache channel gives a late subscriber the last event, or pusher:cache_miss`, async () => {
    const channel = uniq('cache-stage-');
    const a = await connect('a', opts(0));
    const { channel: chA } = await subscribe(a, channel, 'pusher:cache_miss', 'state');
    await a.log.waitFor({ channel, event: 'pusher:cache_miss' });
    assert.equal(chA.subscribed, true);

    await jsonOk(server.trigger(channel, 'state', { slide: 1 }), 'trigger slide 1');
    await jsonOk(server.trigger(channel, 'state', { slide: 2 }), 'trigger slide 2');
    await a.log.waitFor({ channel, event: 'state', data: { slide: 2 } });

    const b = await connect('b', opts(1));
    await subscribe(b, channel, 'pusher:cache_miss', 'state');
    const got = await b.log.waitFor({ channel, event: 'state' });
    assert.deepEqual(got.data, { slide: 2 }, 'the cached event is the last one');
    assert.equal(b.log.filter({ event: 'pusher:cache_miss' }).length, 0, 'no cache_miss with a cached event');

    const info = await jsonOk(server.get({ path: `/channels/${channel}`, params: { info: 'cache' } }), 'GET channel info=cache');
    assert.deepEqual(JSON.parse(info.cache.data), { slide: 2 });
    assert.ok(info.cache.ttl > 0 && info.cache.ttl <= 3600, `ttl ${info.cache.ttl}`);
  });

  test(`${where}: pusher:subscription_count follows the channel's subscribers`, async () => {
    const channel = uniq('watching-');
    const a = await connect('a', opts(0));
    const { channel: chA } = await subscribe(a, channel, 'pusher:subscription_count');
    await a.log.waitFor({ channel, event: 'pusher:subscription_count', data: { subscription_count: 1 } });
    const b = await connect('b', opts(1));
    await subscribe(b, channel, 'pusher:subscription_count');
    await a.log.waitFor({ channel, event: 'pusher:subscription_count', data: { subscription_count: 2 } });
    await b.log.waitFor({ channel, event: 'pusher:subscription_count', data: { subscription_count: 2 } });
    assert.equal(chA.subscriptionCount, 2, 'pusher-js stores the count on the channel');
    disconnect(b);
    const since = a.log.entries.length;
    await a.log.waitFor((e) => a.log.entries.indexOf(e) >= since && e.event === 'pusher:subscription_count', 'the count after b left');
    assert.equal(chA.subscriptionCount, 1);
  });

  test(`${where}: pusher.user.watchlist tells online and offline`, async () => {
    const bobUser = { id: uniq('bob-'), info: { name: 'Bob' } };
    const carolId = uniq('carol-');
    const alice = await connect('alice', { user: { id: uniq('alice-'), info: {}, watchlist: [bobUser.id, carolId] }, ...opts(0) });
    for (const name of ['online', 'offline']) {
      alice.client.user.watchlist.bind(name, (ev) => alice.log.push({ event: `watchlist:${name}`, data: ev }));
    }
    await signIn(alice);
    const offline = (id) => (e) => e.event === 'watchlist:offline' && e.data.user_ids.includes(id);
    const online = (id) => (e) => e.event === 'watchlist:online' && e.data.user_ids.includes(id);
    await alice.log.waitFor(offline(bobUser.id), 'bob offline at first');
    await alice.log.waitFor(offline(carolId), 'carol offline at first');

    const bob = await connect('bob', { user: bobUser, ...opts(1) });
    await signIn(bob);
    const on = await alice.log.waitFor(online(bobUser.id), 'bob online');
    assert.deepEqual(on.data, { name: 'online', user_ids: [bobUser.id] });
    const since = alice.log.entries.length;
    disconnect(bob);
    await alice.log.waitFor((e) => alice.log.entries.indexOf(e) >= since && offline(bobUser.id)(e), 'bob offline again');
    assert.equal(alice.log.filter(online(carolId)).length, 0, 'carol never came online');

    // Carol signs in on alice's own edge (where her user channel is then
    // subscribed too): alice is told all the same.
    const carol = await connect('carol', { user: { id: carolId, info: {} }, ...opts(0) });
    await signIn(carol);
    await alice.log.waitFor(online(carolId), 'carol online (same edge)');
    // A watcher signing in there now gets carol's state from her owner
    // while her user channel is subscribed on that edge.
    const erin = await connect('erin', { user: { id: uniq('erin-'), info: {}, watchlist: [carolId] }, ...opts(0) });
    erin.client.user.watchlist.bind('online', (ev) => erin.log.push({ event: 'watchlist:online', data: ev }));
    await signIn(erin);
    await erin.log.waitFor(online(carolId), 'carol online in the first state');
  });

  test(`${where}: a publish retried with its idempotency key is delivered once`, async () => {
    const channel = uniq('chat-');
    const a = await connect('a', opts(0));
    await subscribe(a, channel, 'line', 'marker');
    const key = uniq('k-');
    const first = await jsonOk(server.trigger(channel, 'line', { n: 1 }, { idempotency_key: key }), 'keyed trigger');
    const retry = await jsonOk(server.trigger(channel, 'line', { n: 1 }, { idempotency_key: key }), 'keyed retry');
    assert.deepEqual(retry, first, 'the retry gets the first answer');
    await assert.rejects(
      server.trigger(channel, 'line', { n: 2 }, { idempotency_key: key }),
      (err) => err.status === 409,
      'the same key with another body is a conflict (409)',
    );
    // Per event in a batch (through another edge in the cluster: the owner remembers the key).
    const batchServer = where === 'cluster' ? makeServer({ port: edgePorts[0] }) : backend;
    const batch = [{ channel, name: 'line', data: JSON.stringify({ n: 3 }), idempotency_key: uniq('b-') }];
    await jsonOk(server.triggerBatch(batch), 'batch');
    await jsonOk(batchServer.triggerBatch(batch), 'batch retried');
    await jsonOk(server.trigger(channel, 'marker', {}), 'marker');
    await a.log.waitFor({ channel, event: 'marker' });
    const lines = a.log.filter({ channel, event: 'line' }).map((e) => e.data.n);
    assert.deepEqual(lines, [1, 3], 'each keyed publish once');
  });
}
