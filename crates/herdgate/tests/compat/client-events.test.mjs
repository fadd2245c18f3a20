// Client events (client-*) sent by pusher-js over the websocket:
// delivered to the other subscribers, never echoed to the sender, and on
// presence channels tagged with the sender's user_id.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { backend, connect, subscribe, disconnectAll, jsonOk, uniq } from './helpers.mjs';

afterEach(disconnectAll);

async function exchange(channelName, users) {
  const sender = await connect('sender', users ? { user: users.sender } : {});
  const receiver = await connect('receiver', users ? { user: users.receiver } : {});
  const { channel: senderCh } = await subscribe(sender, channelName, 'client-typing', 'marker');
  await subscribe(receiver, channelName, 'client-typing', 'marker');

  const sent = senderCh.trigger('client-typing', { typing: true, text: 'héllo' });
  assert.equal(sent, true, 'pusher-js should report the client event as sent');

  const got = await receiver.log.waitFor({ channel: channelName, event: 'client-typing' });
  assert.deepEqual(got.data, { typing: true, text: 'héllo' }, 'client event data');

  // The server handled the client event before the receiver got it; a marker
  // triggered now reaches the sender after any (wrong) echo would have.
  await jsonOk(backend.trigger(channelName, 'marker', {}), 'POST /events (marker)');
  await sender.log.assertAbsentBefore(
    { event: 'client-typing' },
    { channel: channelName, event: 'marker' },
    'a client event was echoed back to its sender',
  );
  return { sender, receiver, got };
}

test('client event on a private channel reaches the other client and is not echoed', async () => {
  const { got } = await exchange(uniq('private-chat-'));
  assert.equal(got.metadata?.user_id, undefined, 'no user_id on a private channel client event');
});

test('client event on a presence channel carries the sender user_id and is not echoed', async () => {
  const users = {
    sender: { id: uniq('typist-'), info: { name: 'Typist' } },
    receiver: { id: uniq('reader-'), info: { name: 'Reader' } },
  };
  const { got } = await exchange(uniq('presence-chat-'), users);
  assert.ok(got.metadata, 'pusher-js passes a metadata argument to bound callbacks');
  assert.equal(
    got.metadata.user_id,
    users.sender.id,
    'the delivered frame must carry "user_id" of the sender (pusher-js exposes it as metadata.user_id)',
  );
});

test('client events are refused on public channels', async () => {
  const channelName = uniq('public-chat-');
  const sender = await connect('sender');
  const receiver = await connect('receiver');
  const { channel: senderCh } = await subscribe(sender, channelName, 'client-typing');
  await subscribe(receiver, channelName, 'client-typing', 'marker');

  senderCh.trigger('client-typing', { typing: true });
  // herdgate handles one socket's frames in order, so once a later subscribe
  // from the sender has succeeded the client event has been dealt with; a
  // marker triggered after that reaches the receiver after any wrongly
  // forwarded client event would have.
  await subscribe(sender, uniq('public-sync-'));
  await jsonOk(backend.trigger(channelName, 'marker', {}), 'POST /events (marker)');
  await receiver.log.assertAbsentBefore(
    { event: 'client-typing' },
    { channel: channelName, event: 'marker' },
    'a client event on a public channel was delivered',
  );
});
