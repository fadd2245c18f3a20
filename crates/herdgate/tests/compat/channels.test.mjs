// Public/private channel subscription and server-side triggers
// (trigger, multi-channel trigger, triggerBatch, socket_id exclusion).

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  backend,
  connect,
  subscribe,
  disconnectAll,
  jsonOk,
  uniq,
} from './helpers.mjs';

afterEach(disconnectAll);

const payload = {
  message: 'hello from herdgate compat',
  n: 42,
  ok: true,
  nothing: null,
  list: [1, 'two', { three: 3 }],
  unicode: 'héllo ✓ 雪',
};

test('public channel: subscribe succeeds and a server trigger delivers the data', async () => {
  const channelName = uniq('public-');
  const a = await connect('client A');
  await subscribe(a, channelName, 'greeting');

  const body = await jsonOk(backend.trigger(channelName, 'greeting', payload), 'POST /events');
  assert.equal(typeof body, 'object', 'trigger response should be a JSON object');

  const got = await a.log.waitFor({ channel: channelName, event: 'greeting' });
  assert.deepEqual(got.data, payload, 'event data should round-trip exactly');
});

test('private channel: subscribe with a signed authorization and receive a trigger', async () => {
  const channelName = uniq('private-');
  const a = await connect('client A');
  const { channel } = await subscribe(a, channelName, 'secret-news');
  assert.equal(channel.name, channelName);

  await jsonOk(backend.trigger(channelName, 'secret-news', { headline: 'private works' }), 'POST /events');
  const got = await a.log.waitFor({ channel: channelName, event: 'secret-news' });
  assert.deepEqual(got.data, { headline: 'private works' });
});

test('private channel: a subscription signed with the wrong secret is refused', async () => {
  const channelName = uniq('private-');
  const markerChannel = uniq('public-marker-');
  const bad = await connect('client with bad auth', { authSecret: 'not-the-app-secret' });
  const channel = bad.client.subscribe(channelName);
  bad.log.watch(channel, 'pusher:subscription_succeeded', 'pusher:subscription_error', 'leak');
  // A refusal may come as pusher:subscription_error on the channel or as a
  // channel-less pusher:error; either way the subscription must not succeed.
  const connectionErrors = [];
  bad.client.bind('pusher:error', (data) => {
    connectionErrors.push(data);
    bad.log.push({ channel: undefined, event: 'pusher:error', data });
  });
  const outcome = await bad.log.waitFor(
    (e) =>
      (e.channel === channelName &&
        (e.event === 'pusher:subscription_succeeded' || e.event === 'pusher:subscription_error')) ||
      e.event === 'pusher:error',
    `a subscription outcome for ${channelName}`,
  );
  assert.notEqual(outcome.event, 'pusher:subscription_succeeded', 'a badly signed subscription must not succeed');
  assert.equal(channel.subscribed, false);

  // Nothing published to that channel may reach the refused socket.
  await subscribe(bad, markerChannel, 'marker');
  await jsonOk(backend.trigger(channelName, 'leak', { should: 'not arrive' }), 'POST /events');
  await jsonOk(backend.trigger(markerChannel, 'marker', {}), 'POST /events');
  await bad.log.assertAbsentBefore(
    { channel: channelName, event: 'leak' },
    { channel: markerChannel, event: 'marker' },
    'an event on a refused private channel was delivered',
  );
});

test('trigger to several channels at once reaches the subscribers of each', async () => {
  const [c1, c2, c3] = [uniq('multi-a-'), uniq('multi-b-'), uniq('private-multi-c-')];
  const a = await connect('client A');
  const b = await connect('client B');
  await subscribe(a, c1, 'fanout');
  await subscribe(b, c2, 'fanout');
  await subscribe(b, c3, 'fanout');

  await jsonOk(backend.trigger([c1, c2, c3], 'fanout', { to: 'everyone' }), 'POST /events (3 channels)');

  for (const [client, name] of [[a, c1], [b, c2], [b, c3]]) {
    const got = await client.log.waitFor({ channel: name, event: 'fanout' });
    assert.deepEqual(got.data, { to: 'everyone' }, `data on ${name}`);
  }
  // B is on two of the channels: it gets one copy per channel, each tagged with its channel.
  assert.equal(b.log.filter({ event: 'fanout' }).length, 2, 'B should get exactly one event per subscribed channel');
  assert.equal(a.log.filter({ event: 'fanout' }).length, 1);
});

test('triggerBatch delivers every event of the batch, in order per channel', async () => {
  const [c1, c2] = [uniq('batch-a-'), uniq('private-batch-b-')];
  const a = await connect('client A');
  const b = await connect('client B');
  await subscribe(a, c1, 'first', 'third');
  await subscribe(b, c2, 'second');

  const body = await jsonOk(
    backend.triggerBatch([
      { channel: c1, name: 'first', data: { n: 1 } },
      { channel: c2, name: 'second', data: 'a plain string payload' },
      { channel: c1, name: 'third', data: { n: 3 } },
    ]),
    'POST /batch_events',
  );
  assert.equal(typeof body, 'object', 'batch response should be a JSON object');

  const first = await a.log.waitFor({ channel: c1, event: 'first' });
  const third = await a.log.waitFor({ channel: c1, event: 'third' });
  const second = await b.log.waitFor({ channel: c2, event: 'second' });
  assert.deepEqual(first.data, { n: 1 });
  assert.deepEqual(third.data, { n: 3 });
  assert.equal(second.data, 'a plain string payload', 'a string payload is delivered as that string');
  assert.ok(
    a.log.entries.indexOf(first) < a.log.entries.indexOf(third),
    'events of one batch on one channel should arrive in batch order',
  );
});

test('trigger with socket_id excludes that socket but reaches the others', async () => {
  const channelName = uniq('exclude-');
  const sender = await connect('excluded sender');
  const other = await connect('other subscriber');
  await subscribe(sender, channelName, 'update', 'marker');
  await subscribe(other, channelName, 'update', 'marker');

  const senderSocketId = sender.client.connection.socket_id;
  await jsonOk(
    backend.trigger(channelName, 'update', { v: 1 }, { socket_id: senderSocketId }),
    'POST /events with socket_id',
  );
  const got = await other.log.waitFor({ channel: channelName, event: 'update' });
  assert.deepEqual(got.data, { v: 1 });

  await jsonOk(backend.trigger(channelName, 'marker', { after: 'update' }), 'POST /events (marker)');
  await sender.log.assertAbsentBefore(
    { event: 'update' },
    { channel: channelName, event: 'marker' },
    'the excluded socket received the event',
  );
  await other.log.waitFor({ channel: channelName, event: 'marker' });
});

test('a channel name over 164 characters: pusher-js gets the subscription_error on that channel', async () => {
  // Pusher limits names to 164 characters; the error must name the channel
  // exactly as subscribed, or pusher-js cannot route it and the channel
  // stays pending for ever.
  const channelName = uniq('public-') + '-' + 'x'.repeat(200);
  const a = await connect('client with a long name');
  const channel = a.client.subscribe(channelName);
  a.log.watch(channel, 'pusher:subscription_succeeded', 'pusher:subscription_error');
  const outcome = await a.log.waitFor(
    (e) => e.channel === channelName,
    `the outcome of the overlong subscription`,
  );
  assert.equal(outcome.event, 'pusher:subscription_error');
  assert.equal(outcome.data.type, 'InvalidChannel');
  assert.equal(channel.subscribed, false);
});
