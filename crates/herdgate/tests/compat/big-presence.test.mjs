// Big presence rooms (docs/PROTOCOL.md "Big presence rooms") with pusher-js
// and the herdgate-presence plugin, on the two edges of a cluster (or the
// standalone server when there is none). The compat app has
// presence_full_members = 20 and presence_count_interval = "1s"
// (tests/integration/compat.rs): past 20 members nobody hears of a
// non-featured member joining, members.count follows herdgate:presence_count,
// a joiner gets the true count with the featured host listed, and the API
// pages through everyone.

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import withBigPresence from '../../../../clients/js/herdgate-presence/index.js';
import { connect, subscribe, disconnectAll, jsonOk, makeServer, uniq, withTimeout } from './helpers.mjs';

afterEach(disconnectAll);

const edgePorts = [Number(process.env.HERDGATE_EDGE1_PORT), Number(process.env.HERDGATE_EDGE2_PORT)];
const clustered = edgePorts.every((p) => p > 0);
const onEdge = (i) => (clustered ? { clientOptions: { wsPort: edgePorts[i % 2] } } : {});
const FULL = 20;

test('big presence: past the threshold joins cost nothing, the count follows, featured members stay listed', async () => {
  const room = uniq('presence-big-');
  const observer = await connect('observer', { user: { id: uniq('obs-'), info: { name: 'Observer' } }, ...onEdge(1) });
  withBigPresence(observer.client);
  const { channel } = await subscribe(observer, room, 'pusher:member_added', 'pusher:member_removed', 'herdgate:presence_count');
  const host = { id: uniq('host-'), info: { name: 'Host', featured: true } };
  const people = [await connect('host', { user: host, ...onEdge(0) })];
  await subscribe(people[0], room);
  const plain = [];
  for (let i = 0; i < 24; i++) {
    const user = { id: `m${String(i).padStart(2, '0')}-${uniq('')}`, info: { name: `M${i}` } };
    plain.push(user);
    const c = await connect(`m${i}`, { user, ...onEdge(i) });
    people.push(c);
    await subscribe(c, room);
  }
  const total = 2 + plain.length; // observer, host, 24
  // The observer heard of the members that came while the room was small:
  // the host and the plain members up to FULL in all; of none after.
  await withTimeout(`members.count to reach ${total}`, (resolve) => {
    const check = () => channel.members.count === total && resolve();
    channel.bind('herdgate:presence_count', check);
    check();
  });
  const added = observer.log.filter({ channel: room, event: 'pusher:member_added' }).map((e) => e.data.id);
  assert.deepEqual(added, [host.id, ...plain.slice(0, FULL - 2).map((u) => u.id)], 'no member_added past the threshold');
  const counted = observer.log.filter({ channel: room, event: 'herdgate:presence_count' });
  assert.ok(counted.length >= 1 && counted.at(-1).data.count === total, JSON.stringify(counted.map((e) => e.data)));

  // A late joiner: the true count, itself and the featured host listed.
  const late = await connect('late', { user: { id: uniq('late-'), info: { name: 'Late' } }, ...onEdge(0) });
  withBigPresence(late.client);
  const { channel: lateCh } = await subscribe(late, room);
  assert.equal(lateCh.members.count, total + 1);
  assert.ok(lateCh.members.get(host.id), 'the featured host is listed');
  assert.equal(lateCh.members.get(plain[0].id), null, 'plain members are not');
  assert.equal(lateCh.members.me.id, late.user.id);

  // The app pages through everyone, through either edge.
  const api = makeServer(clustered ? { port: edgePorts[0] } : {});
  const ids = [];
  let after;
  for (;;) {
    const page = await jsonOk(api.get({ path: `/channels/${room}/users`, params: { limit: 10, ...(after ? { after } : {}) } }), 'GET users page');
    ids.push(...page.users.map((u) => u.id));
    if (!page.next) break;
    after = page.next;
  }
  const want = [observer.user.id, host.id, late.user.id, ...plain.map((u) => u.id)].sort();
  assert.deepEqual(ids, want);
});
