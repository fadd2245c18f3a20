// Auth grants (docs/PROTOCOL.md "Auth grants") with real pusher-js, the
// clients/js/herdgate-grants plugin and the official Node SDK as the app's
// auth endpoint, against two herdgate processes with the same app: a
// client that drops from one takes its private and presence channels again
// on the other while the auth endpoint is down. The client reaches the
// servers through a small TCP balancer, so the test decides where a
// reconnect lands. HERDGATE_PORT is server B (the API is used there).

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { readFileSync, writeFileSync } from 'node:fs';
import PusherClient from 'pusher-js';
import withGrants from '../../../../../clients/js/herdgate-grants/index.js';
import { EventLog, env, makeServer, uniq } from '../helpers.mjs';

const portA = Number(process.env.HERDGATE_EDGE1_PORT);
const portB = Number(process.env.HERDGATE_EDGE2_PORT);
const reloadPid = Number(process.env.HERDGATE_RELOAD_PID);
const reloadConfig = process.env.HERDGATE_RELOAD_CONFIG;

/** The app's auth endpoint, as the official Node SDK signs: counted, and switchable off. */
const endpoint = {
  up: true,
  calls: 0,
  secret: env.secret,
  handler(label) {
    return (params, callback) => {
      endpoint.calls++;
      if (!endpoint.up) return callback(new Error('auth endpoint down'), null);
      const presence = params.channelName.startsWith('presence-')
        ? { user_id: `u-${label}`, user_info: { name: label } }
        : undefined;
      const signer = makeServer({ secret: endpoint.secret });
      callback(null, signer.authorizeChannel(params.socketId, params.channelName, presence));
    };
  },
};

/** A balancer: every new connection goes to `target`; `drop()` cuts the open ones. */
const lb = {
  target: portA,
  open: new Set(),
  server: null,
  port: 0,
  drop() {
    for (const s of this.open) s.destroy();
    this.open.clear();
  },
  /** Connections ended, and who waits for the next one to end. */
  ended: 0,
  onEnd: [],
  nextEnd() {
    return new Promise((resolve) => this.onEnd.push(resolve));
  },
};
lb.server = net.createServer((client) => {
  const up = net.connect(lb.target, '127.0.0.1');
  lb.open.add(client);
  lb.open.add(up);
  client.pipe(up);
  up.pipe(client);
  let done = false;
  const end = () => {
    client.destroy();
    up.destroy();
    if (done) return;
    done = true;
    lb.ended++;
    for (const w of lb.onEnd.splice(0)) w();
  };
  client.on('error', end);
  up.on('error', end);
  client.on('close', end);
  up.on('close', end);
});
await new Promise((r) => lb.server.listen(0, '127.0.0.1', r));
lb.port = lb.server.address().port;

const clients = [];
after(() => {
  for (const c of clients) c.client.disconnect();
  lb.drop();
  lb.server.close();
});

/** The app's user-authentication endpoint (sign-ins): counted, switchable off. */
const userEndpoint = {
  up: true,
  calls: 0,
  handler(id) {
    return (params, callback) => {
      userEndpoint.calls++;
      if (!userEndpoint.up) return callback(new Error('user endpoint down'), null);
      const signer = makeServer({ secret: endpoint.secret });
      callback(null, signer.authenticateUser(params.socketId, { id, user_info: { name: id } }));
    };
  },
};

function connect(label, { plugin = true, user = null } = {}) {
  const client = new PusherClient(env.key, {
    cluster: 'mt1',
    wsHost: '127.0.0.1',
    wsPort: lb.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    channelAuthorization: { customHandler: endpoint.handler(label) },
    ...(user ? { userAuthentication: { customHandler: userEndpoint.handler(user) } } : {}),
  });
  if (plugin) withGrants(client);
  const log = new EventLog(label);
  const c = { label, client, log, connected: 0 };
  client.connection.bind('message', (m) => {
    if (m.event === 'herdgate:grant') {
      const data = typeof m.data === 'string' ? JSON.parse(m.data) : m.data;
      log.push({ event: 'herdgate:grant', channel: data.signin ? '#signin' : data.channel, data });
    }
    if (m.event === 'pusher:signin_success') log.push({ event: 'pusher:signin_success', data: m.data });
  });
  client.connection.bind('connected', () => {
    c.connected++;
    log.push({ event: 'connected', data: { n: c.connected } });
  });
  clients.push(c);
  return c;
}

/** Subscribe and watch; resolves with the channel. */
function watch(c, name, ...events) {
  const channel = c.client.subscribe(name);
  c.log.watch(channel, 'pusher:subscription_succeeded', 'pusher:subscription_error', ...events);
  return channel;
}

/** The next subscription outcome on `name` after entry `from`. */
async function outcome(c, name, from) {
  return c.log.waitFor(
    (e) =>
      c.log.entries.indexOf(e) >= from &&
      e.channel === name &&
      (e.event === 'pusher:subscription_succeeded' || e.event === 'pusher:subscription_error'),
    `a subscription outcome on ${name}`,
  );
}

const grantOf = (c, name, from = 0) =>
  c.log.waitFor(
    (e) => c.log.entries.indexOf(e) >= from && e.event === 'herdgate:grant' && e.channel === name,
    `a herdgate:grant for ${name}`,
  );

const privateCh = uniq('private-g-');
const presenceCh = uniq('presence-g-');
let roamer;
/** The roamer's presence grant before it was banned (a client that keeps it). */
let heldPresenceGrant;

test('a client takes its private and presence channels again on another server with the auth endpoint down', async () => {
  roamer = connect('roamer');
  const chs = [watch(roamer, privateCh, 'msg'), watch(roamer, presenceCh, 'msg')];
  for (const ch of [privateCh, presenceCh]) {
    assert.equal((await outcome(roamer, ch, 0)).event, 'pusher:subscription_succeeded');
    const g = (await grantOf(roamer, ch)).data;
    assert.equal(typeof g.grant, 'string');
    assert.ok(g.ttl > 0 && g.ttl <= 300, `ttl ${g.ttl}`);
  }
  assert.equal(endpoint.calls, 2, 'the endpoint authorized each channel once');

  // The endpoint goes down and the client lands on the other server.
  endpoint.up = false;
  lb.target = portB;
  const mark = roamer.log.entries.length;
  lb.drop();
  await roamer.log.waitFor((e) => e.event === 'connected' && e.data.n === 2, 'a reconnect');
  for (const ch of [privateCh, presenceCh]) {
    const o = await outcome(roamer, ch, mark);
    assert.equal(o.event, 'pusher:subscription_succeeded', `${ch}: ${JSON.stringify(o.data)}`);
    // Each renewed: a fresh grant on the new connection.
    await grantOf(roamer, ch, mark);
  }
  assert.equal(endpoint.calls, 2, 'no call to the auth endpoint on the reconnect');
  const members = chs[1].members;
  assert.equal(members.count, 1);
  assert.equal(members.me.id, 'u-roamer', 'the presence member the app authorized');
  // Events reach the channels on B.
  const api = makeServer();
  for (const ch of [privateCh, presenceCh]) {
    await api.trigger(ch, 'msg', { on: 'B' });
    await roamer.log.waitFor({ channel: ch, event: 'msg', data: { on: 'B' } });
  }
});

test('a signed-in client signs in again, and takes its channels, on the other server with both endpoints down', async () => {
  endpoint.up = true;
  userEndpoint.up = true;
  const walker = connect('walker', { user: 'u-walker' });
  await walker.log.waitFor((e) => e.event === 'connected', 'the walker to connect');
  walker.client.signin();
  await walker.log.waitFor((e) => e.event === 'pusher:signin_success', 'signed in by the app');
  const signinGrant = (await grantOf(walker, '#signin')).data;
  assert.equal(typeof signinGrant.grant, 'string');
  const ch = uniq('private-walk-');
  watch(walker, ch, 'msg');
  assert.equal((await outcome(walker, ch, 0)).event, 'pusher:subscription_succeeded');
  await grantOf(walker, ch);
  assert.equal(userEndpoint.calls, 1);

  // Both endpoints go down, and the walker lands on the other server (A).
  endpoint.up = false;
  userEndpoint.up = false;
  const before = { channel: endpoint.calls, user: userEndpoint.calls };
  const mark = walker.log.entries.length;
  const n = walker.connected;
  const rn = roamer.connected;
  lb.target = portA;
  lb.drop();
  await walker.log.waitFor((e) => e.event === 'connected' && e.data.n === n + 1, 'a reconnect');
  await walker.log.waitFor(
    (e) => walker.log.entries.indexOf(e) >= mark && e.event === 'pusher:signin_success',
    'signed in again, by its grant',
  );
  const o = await outcome(walker, ch, mark);
  assert.equal(o.event, 'pusher:subscription_succeeded', JSON.stringify(o.data));
  await grantOf(walker, '#signin', mark);
  assert.deepEqual({ channel: endpoint.calls, user: userEndpoint.calls }, before, 'neither endpoint asked');
  assert.equal(walker.client.user.user_data.id, 'u-walker');

  // terminate_connections closes its socket (4009: pusher-js stays away)
  // and revokes the user's grants: connecting again, its sign-in grant is
  // refused and the plugin asks the app's endpoint (up again) instead.
  userEndpoint.up = true;
  walker.client.connection.bind('state_change', (c) => walker.log.push({ event: 'state', data: c }));
  const gone = walker.log.entries.length;
  await makeServer({ port: portA, secret: endpoint.secret }).terminateUserConnections('u-walker');
  await walker.log.waitFor(
    (e) => walker.log.entries.indexOf(e) >= gone && e.event === 'state' && e.data.current !== 'connected',
    'the socket closed',
  );
  const again = walker.log.entries.length;
  walker.client.connect();
  await walker.log.waitFor(
    (e) => walker.log.entries.indexOf(e) >= again && e.event === 'pusher:signin_success',
    'signed in again, by the app',
  );
  assert.equal(userEndpoint.calls, before.user + 1, 'the revoked sign-in grant sent it to the app');

  // Closed, once its close handshake is through (a client whose proxied
  // socket is cut mid-close waits 30 s for it); then back to B for the
  // tests after this one.
  const closed = lb.nextEnd();
  walker.client.disconnect();
  await closed;
  lb.target = portB;
  lb.drop();
  await roamer.log.waitFor((e) => e.event === 'connected' && e.data.n >= rn + 2, 'the roamer back on B');
  userEndpoint.up = true;
});

test('a grant copied to another client is refused, and that client falls back to the endpoint', async () => {
  const thief = connect('thief');
  await thief.log.waitFor((e) => e.event === 'connected', 'the thief to connect');
  // The thief holds the roamer's grant text (from a log, say), but not its key.
  const stolen = roamer.client.__herdgateGrants.get(privateCh);
  assert.ok(stolen, 'the roamer holds a grant');
  thief.client.__herdgateGrants.set(privateCh, { ...stolen, timer: null });
  const before = endpoint.calls;
  watch(thief, privateCh);
  const o = await outcome(thief, privateCh, 0);
  // Refused by herdgate (hidden by the plugin), then the endpoint asked: it is down.
  assert.equal(o.event, 'pusher:subscription_error');
  assert.equal(o.data.type, 'AuthError', JSON.stringify(o.data));
  assert.equal(endpoint.calls, before + 1, 'the plugin fell back to the endpoint');
  assert.equal(thief.client.__herdgateGrants.has(privateCh), false, 'the refused grant is dropped');
  thief.client.disconnect();
});

test('pusher-js without the plugin gets no grant', async () => {
  endpoint.up = true;
  const plain = connect('plain', { plugin: false });
  const ch = uniq('private-plain-');
  watch(plain, ch, 'marker');
  assert.equal((await outcome(plain, ch, 0)).event, 'pusher:subscription_succeeded');
  await makeServer().trigger(ch, 'marker', {});
  await plain.log.assertAbsentBefore(
    (e) => e.event === 'herdgate:grant',
    { channel: ch, event: 'marker' },
    'no herdgate:grant to a client that offered no key',
  );
  plain.client.disconnect();
});

test('rotating the app secret revokes every grant: the endpoint is asked again, then new grants work', async () => {
  // B's config with a new secret, reloaded (SIGHUP); the endpoint signs with
  // it too. B closes the roamer's socket (4203: it holds what the old secret
  // authorized); pusher-js reconnects at once and its grants, minted under
  // the old secret, are refused.
  endpoint.up = true;
  const rotated = `${env.secret}-rotated`;
  endpoint.secret = rotated;
  const before = endpoint.calls;
  let mark = roamer.log.entries.length;
  const n = roamer.connected;
  const text = readFileSync(reloadConfig, 'utf8');
  writeFileSync(reloadConfig, text.replace(`secret = "${env.secret}"`, `secret = "${rotated}"`));
  process.kill(reloadPid, 'SIGHUP');
  await roamer.log.waitFor((e) => e.event === 'connected' && e.data.n === n + 1, 'a reconnect');
  for (const ch of [privateCh, presenceCh]) {
    const o = await outcome(roamer, ch, mark);
    assert.equal(o.event, 'pusher:subscription_succeeded', `${ch}: ${JSON.stringify(o.data)}`);
    await grantOf(roamer, ch, mark);
  }
  assert.equal(endpoint.calls, before + 2, 'both grants refused, both channels authorized by the endpoint');
  assert.equal(
    roamer.log.filter((e) => e.event === 'pusher:subscription_error').length,
    0,
    'the plugin hid the refusals from the app',
  );
  // The grants minted under the new secret take the channels again.
  endpoint.up = false;
  mark = roamer.log.entries.length;
  lb.drop();
  await roamer.log.waitFor((e) => e.event === 'connected' && e.data.n === n + 2, 'a reconnect');
  for (const ch of [privateCh, presenceCh]) {
    const o = await outcome(roamer, ch, mark);
    assert.equal(o.event, 'pusher:subscription_succeeded', `${ch}: ${JSON.stringify(o.data)}`);
  }
  assert.equal(endpoint.calls, before + 2, 'no call with the new grants');
  heldPresenceGrant = roamer.client.__herdgateGrants.get(presenceCh);
  assert.ok(heldPresenceGrant, 'a presence grant under the new secret');
});

test('terminate_connections revokes the user\'s grants: its next join asks the app', async () => {
  // The roamer is presence member u-roamer, not signed in: terminating
  // u-roamer closes no socket of it, but every server refuses the grants
  // naming u-roamer that the app authorized before now.
  const api = makeServer({ secret: endpoint.secret });
  const res = await api.terminateUserConnections('u-roamer');
  assert.equal(res.status, 200);
  endpoint.up = true;
  const before = endpoint.calls;
  const n = roamer.connected;
  const mark = roamer.log.entries.length;
  lb.drop();
  await roamer.log.waitFor((e) => e.event === 'connected' && e.data.n === n + 1, 'a reconnect');
  for (const ch of [privateCh, presenceCh]) {
    const o = await outcome(roamer, ch, mark);
    assert.equal(o.event, 'pusher:subscription_succeeded', `${ch}: ${JSON.stringify(o.data)}`);
    await grantOf(roamer, ch, mark);
  }
  assert.equal(endpoint.calls, before + 1,
    'the presence grant (u-roamer\'s) was refused and the endpoint asked; the private one names nobody and was taken');
  assert.equal(
    roamer.log.filter((e) => e.event === 'pusher:subscription_error').length,
    0,
    'the plugin hid the refusal from the app',
  );
  endpoint.up = false;
});

test('a ban revokes a grant: the banned user is refused on reconnect whatever it presents', async () => {
  // The roamer is the presence member u-roamer, on B, holding grants, with
  // the auth endpoint down. A moderator removes and bans it through B's API.
  const api = makeServer({ secret: endpoint.secret });
  let mark = roamer.log.entries.length;
  const res = await api.post({ path: `/channels/${presenceCh}/users/u-roamer/remove`, body: { ban_seconds: 120 } });
  assert.deepEqual(await res.json(), { removed: 1, ban_seconds: 120 });
  const notice = await roamer.log.waitFor(
    (e) => roamer.log.entries.indexOf(e) >= mark && e.channel === presenceCh && e.event === 'pusher:subscription_error',
    'the removal notice',
  );
  assert.equal(notice.data.type, 'Removed');
  assert.equal(roamer.client.__herdgateGrants.has(presenceCh), false, 'the plugin dropped the removed channel\'s grant');
  // A copy of the grant kept by a client that does not drop it (a script
  // replaying it on a new socket of its own key would be refused anyway:
  // not_the_holder) is refused at the owner: the ban is checked on every
  // join, whatever authorized it. The roamer presents it again as it was.
  roamer.client.__herdgateGrants.set(presenceCh, { ...heldPresenceGrant, timer: null });
  const before = endpoint.calls;
  const n = roamer.connected;
  mark = roamer.log.entries.length;
  lb.drop();
  await roamer.log.waitFor((e) => e.event === 'connected' && e.data.n === n + 1, 'a reconnect');
  assert.equal((await outcome(roamer, privateCh, mark)).event, 'pusher:subscription_succeeded', 'its other channel, by grant');
  const refused = await outcome(roamer, presenceCh, mark);
  assert.equal(refused.event, 'pusher:subscription_error');
  assert.equal(refused.data.type, 'Banned', JSON.stringify(refused.data));
  assert.equal(endpoint.calls, before, 'refused by the ban, not by the grant: the endpoint was not asked');
  // Lifted, so the next test starts where it expects.
  const lifted = await api.post({ path: `/channels/${presenceCh}/users/u-roamer/unban` });
  assert.deepEqual(await lifted.json(), { lifted: true });
});

test('turning auth_grants off revokes every grant at the next reconnect', async () => {
  // Off in B's config, reloaded (SIGHUP). A reload has no event a client
  // can await: a probe subscribes until it is no longer handed a grant.
  const text = readFileSync(reloadConfig, 'utf8');
  writeFileSync(reloadConfig, text.replace('auth_grants = true', 'auth_grants = false'));
  process.kill(reloadPid, 'SIGHUP');
  endpoint.up = true;
  const probe = connect('probe');
  await probe.log.waitFor((e) => e.event === 'connected', 'the probe to connect');
  const api = makeServer({ secret: endpoint.secret });
  for (let i = 0; ; i++) {
    const ch = uniq('private-probe-');
    const mark = probe.log.entries.length;
    watch(probe, ch, 'marker');
    assert.equal((await outcome(probe, ch, mark)).event, 'pusher:subscription_succeeded');
    await api.trigger(ch, 'marker', {});
    await probe.log.waitFor({ channel: ch, event: 'marker' });
    const granted = probe.log.entries.slice(mark).some((e) => e.event === 'herdgate:grant');
    probe.client.unsubscribe(ch);
    if (!granted) break;
    assert.ok(i < 200, 'grants still on after 200 probes');
  }
  probe.client.disconnect();
  const before = endpoint.calls;
  const mark = roamer.log.entries.length;
  const n = roamer.connected;
  lb.drop();
  await roamer.log.waitFor((e) => e.event === 'connected' && e.data.n === n + 1, 'a reconnect');
  for (const ch of [privateCh, presenceCh]) {
    const o = await outcome(roamer, ch, mark);
    assert.equal(o.event, 'pusher:subscription_succeeded', `${ch}: ${JSON.stringify(o.data)}`);
  }
  assert.equal(endpoint.calls, before + 2, 'both grants refused: the endpoint authorized both');
});
