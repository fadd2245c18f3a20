// Resume across a cluster: the client reaches the edges through a small TCP
// balancer (here, so the test can hold its reconnect while events are
// published); HERDGATE_PORT is the edge that stays up, used for the API.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import withResume from '../../../../../clients/js/herdgate-resume/index.js';
import { connect, disconnectAll, makeServer, subscribe, withTimeout } from '../helpers.mjs';

const edge1 = Number(process.env.HERDGATE_EDGE1_PORT);
const edge2 = Number(process.env.HERDGATE_EDGE2_PORT);
const channel = process.env.HERDGATE_CHANNEL;
const api = makeServer();

/** A balancer: edge 1 while it accepts, else edge 2; `hold` parks new connections. */
const lb = {
  hold: false,
  parked: [],
  server: null,
  port: 0,
  forward(client) {
    const pipeTo = (port, fallback) => {
      const up = net.connect(port, '127.0.0.1');
      up.once('error', () => (fallback ? pipeTo(fallback, null) : client.destroy()));
      up.once('connect', () => {
        client.pipe(up);
        up.pipe(client);
        client.on('error', () => up.destroy());
        up.on('error', () => client.destroy());
        client.on('close', () => up.destroy());
        up.on('close', () => client.destroy());
      });
    };
    pipeTo(edge1, edge2);
  },
  release() {
    this.hold = false;
    for (const c of this.parked.splice(0)) this.forward(c);
  },
};
lb.server = net.createServer((c) => {
  c.pause();
  if (lb.hold) lb.parked.push(c);
  else lb.forward(c);
});
await new Promise((r) => lb.server.listen(0, '127.0.0.1', r));
lb.port = lb.server.address().port;

after(() => {
  disconnectAll();
  lb.server.close();
});

function leaves(c, state) {
  return withTimeout(`${c.label} to leave '${state}'`, (resolve) => {
    const check = () => {
      if (c.client.connection.state !== state) {
        c.client.connection.unbind('state_change', check);
        resolve();
      }
    };
    c.client.connection.bind('state_change', check);
    check();
  });
}

const numbers = (c, from = 0) =>
  c.log.entries.slice(from).filter((e) => e.channel === channel && e.event === 'msg').map((e) => e.data.n);

let client;

test('an edge drained under a client: it resumes on the other edge with nothing lost', async () => {
  client = await connect('roamer', { clientOptions: { wsPort: lb.port } });
  withResume(client.client);
  await subscribe(client, channel, 'msg', 'herdgate:resumed');
  for (let n = 0; n < 3; n++) await api.trigger(channel, 'msg', { n });
  await client.log.waitFor({ channel, event: 'msg', data: { n: 2 } });

  lb.hold = true;
  process.kill(Number(process.env.HERDGATE_EDGE1_PID), 'SIGTERM');
  await leaves(client, 'connected');
  for (let n = 3; n < 23; n++) await api.trigger(channel, 'msg', { n });
  const mark = client.log.entries.length;
  lb.release();
  // Keep publishing while it resumes: the events right after its position
  // reach it live, none falls between the replay and the live stream.
  let n = 23;
  let resumed = null;
  client.log
    .waitFor(
      (e) => e.channel === channel && e.event === 'herdgate:resumed' && client.log.entries.indexOf(e) >= mark,
      'herdgate:resumed after the drain',
    )
    .then((e) => (resumed = e));
  while (!resumed || n < 63) {
    await api.trigger(channel, 'msg', { n: n++ });
    if (n > 5000) throw new Error('no herdgate:resumed after the drain');
  }
  assert.equal(resumed.data.recovered, true, JSON.stringify(resumed.data));
  await client.log.waitFor({ channel, event: 'msg', data: { n: n - 1 } });
  assert.deepEqual(numbers(client), Array.from({ length: n }, (_, i) => i), 'every event once, in order');
});

test('the room owner killed -9: the client is told recovered: false, and every acknowledged event arrives', async () => {
  const mark = client.log.entries.length;
  process.kill(Number(process.env.HERDGATE_OWNER_PID), 'SIGKILL');
  const acked = [];
  const notice = client.log.waitFor(
    (e) => e.channel === channel && e.event === 'herdgate:resumed' && client.log.entries.indexOf(e) >= mark,
    'herdgate:resumed after the failover',
  );
  let told = null;
  notice.then((e) => (told = e));
  // Publish through the failover; a refused publish (503 while the room
  // moves) is not acknowledged and is retried with the next number.
  for (let n = 100; acked.length < 20 || !told; n++) {
    try {
      await api.trigger(channel, 'msg', { n });
      acked.push(n);
    } catch (e) {
      assert.ok([503, undefined].includes(e.status), `unexpected ${e.status}: ${e.body}`);
    }
    if (n > 100_000) throw new Error('the room never came back');
  }
  assert.equal((await notice).data.recovered, false, 'the new owner cannot vouch for the history');
  await client.log.waitFor({ channel, event: 'msg', data: { n: acked[acked.length - 1] } });
  const got = numbers(client, mark);
  for (const n of acked) assert.ok(got.includes(n), `acknowledged event ${n} never arrived`);
  assert.equal(new Set(got).size, got.length, 'no duplicates');

  // From the position it was told, the next reconnect recovers again.
  client.client.disconnect();
  await leaves(client, 'connected');
  for (let n = 1000; n < 1005; n++) await api.trigger(channel, 'msg', { n });
  const again = client.log.entries.length;
  client.client.connect();
  const resumed = await client.log.waitFor(
    (e) => e.channel === channel && e.event === 'herdgate:resumed' && client.log.entries.indexOf(e) >= again,
    'herdgate:resumed after reconnecting',
  );
  assert.equal(resumed.data.recovered, true);
  assert.deepEqual(numbers(client, again), [1000, 1001, 1002, 1003, 1004]);
});
