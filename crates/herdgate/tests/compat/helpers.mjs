// Shared helpers for the herdgate client compatibility suite.
//
// Everything here talks only to the herdgate instance named by the
// HERDGATE_* environment variables (a loopback address in practice).
// No helper sleeps: every wait is "until this event arrives, or fail after a
// timeout with a message saying what was awaited".

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import PusherClient from 'pusher-js';
import PusherServer from 'pusher';

function requireEnv(name) {
  const value = process.env[name];
  if (value === undefined || value === '') {
    throw new Error(
      `environment variable ${name} is not set; the compat suite needs ` +
        'HERDGATE_HOST, HERDGATE_PORT, HERDGATE_APP_ID, HERDGATE_APP_KEY and HERDGATE_APP_SECRET',
    );
  }
  return value;
}

export const env = Object.freeze({
  host: requireEnv('HERDGATE_HOST'),
  port: Number(requireEnv('HERDGATE_PORT')),
  appId: requireEnv('HERDGATE_APP_ID'),
  key: requireEnv('HERDGATE_APP_KEY'),
  secret: requireEnv('HERDGATE_APP_SECRET'),
});
if (!Number.isInteger(env.port) || env.port <= 0 || env.port > 65535) {
  throw new Error(`HERDGATE_PORT must be a TCP port number, got '${process.env.HERDGATE_PORT}'`);
}

/** How long any single wait may take before the test fails. */
export const WAIT_MS = Number(process.env.HERDGATE_COMPAT_WAIT_MS || 10000);

if (process.env.HERDGATE_COMPAT_DEBUG) {
  PusherClient.logToConsole = true;
}

/** A name unique to this run, safe for channel names and user ids. */
export function uniq(prefix) {
  return `${prefix}${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
}

/** The official Node server SDK pointed at herdgate. */
export function makeServer(overrides = {}) {
  return new PusherServer({
    appId: env.appId,
    key: env.key,
    secret: env.secret,
    host: env.host,
    port: env.port,
    useTLS: false,
    timeout: WAIT_MS,
    ...overrides,
  });
}

/** Signs channel authorizations and user sign-ins on behalf of the test "backend". */
export const backend = makeServer();

/**
 * Run `fn(resolve, reject)` and fail with `what` if it has not settled after `ms`.
 * The timer is cleared on settlement so it never keeps the process alive.
 */
export function withTimeout(what, fn, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  const work = new Promise((resolve, reject) => fn(resolve, reject));
  return Promise.race([work, timeout]).finally(() => clearTimeout(timer));
}

/** Tiny structural matcher: every key of `pattern` must equal (deeply) the same key of `value`. */
function matches(pattern, value) {
  if (typeof pattern === 'function') return pattern(value);
  for (const [k, v] of Object.entries(pattern)) {
    if (typeof v === 'function') {
      if (!v(value[k])) return false;
    } else {
      try {
        assert.deepStrictEqual(value[k], v);
      } catch {
        return false;
      }
    }
  }
  return true;
}

function describeMatch(pattern) {
  if (typeof pattern === 'function') return pattern.description || pattern.toString();
  return JSON.stringify(pattern, (k, v) => (typeof v === 'function' ? '<predicate>' : v));
}

/**
 * An ordered log of everything one client saw, shared by all its channels,
 * so that tests can assert "X never arrived before marker Y".
 * Entries: { channel, event, data, metadata }.
 */
export class EventLog {
  constructor(label) {
    this.label = label;
    this.entries = [];
    this.waiters = [];
  }

  push(entry) {
    this.entries.push(entry);
    for (const w of [...this.waiters]) {
      if (matches(w.pattern, entry)) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(entry);
      }
    }
  }

  /** Record every event named in `events` on `channel` (with the metadata argument pusher-js passes). */
  watch(channel, ...events) {
    for (const event of events) {
      channel.bind(event, (data, metadata) => {
        this.push({ channel: channel.name, event, data, metadata });
      });
    }
    return this;
  }

  /** Entries matching `pattern`, optionally only those before index `before`. */
  filter(pattern, before = this.entries.length) {
    return this.entries.slice(0, before).filter((e) => matches(pattern, e));
  }

  /** Resolve with the first entry (already seen or future) matching `pattern`. */
  waitFor(pattern, what = describeMatch(pattern)) {
    const existing = this.entries.find((e) => matches(pattern, e));
    if (existing) return Promise.resolve(existing);
    let waiter;
    return withTimeout(`${this.label} to receive ${what}`, (resolve) => {
      waiter = { pattern, resolve };
      this.waiters.push(waiter);
    }).finally(() => {
      const i = this.waiters.indexOf(waiter);
      if (i >= 0) this.waiters.splice(i, 1);
    });
  }

  /**
   * Wait for `marker`, then assert that nothing matching `unwanted` arrived before it.
   * Returns the marker entry.
   */
  async assertAbsentBefore(unwanted, marker, message) {
    const markerEntry = await this.waitFor(marker);
    const index = this.entries.indexOf(markerEntry);
    const early = this.filter(unwanted, index);
    assert.deepEqual(
      early,
      [],
      `${this.label}: ${message} (got ${JSON.stringify(early)} before marker ${describeMatch(marker)})`,
    );
    return markerEntry;
  }
}

/** The user_data a test user signs in with (a watchlist only when it has one). */
function userData(user) {
  return user.watchlist ? { id: user.id, user_info: user.info, watchlist: user.watchlist } : { id: user.id, user_info: user.info };
}

/** Every pusher-js client created by connect(); disconnectAll() closes them. */
const liveClients = new Set();
/** The underlying (faye-websocket) sockets those clients used, see releaseClosedSockets(). */
const rawSockets = new Set();

/**
 * When the server closes a socket with a 40xx code, pusher-js ("refused")
 * calls close() again on the already-closed faye-websocket client, which arms
 * a 30 s close timer that is never cleared and keeps the test process alive.
 * Clear such timers on sockets that are already CLOSED (readyState 3).
 */
function releaseClosedSockets() {
  for (const socket of rawSockets) {
    if (socket.readyState === 3) {
      if (socket._closeTimer) clearTimeout(socket._closeTimer);
      rawSockets.delete(socket);
    }
  }
}

/**
 * Create a pusher-js client against herdgate and wait until it is connected.
 *
 * options.user          { id, info } used for presence channel_data and user sign-in
 * options.presenceFor   optional (channelName) => { user_id, user_info } override
 * options.authSecret    sign channel authorizations with this secret instead (to provoke refusals)
 * options.clientOptions extra pusher-js options (e.g. forceTLS/wssPort for the TLS test)
 */
export async function connect(label, options = {}) {
  const user = options.user || { id: uniq('user-'), info: { name: label } };
  const signer = options.authSecret ? makeServer({ secret: options.authSecret }) : backend;
  const presenceFor =
    options.presenceFor || (() => ({ user_id: user.id, user_info: user.info }));

  const client = new PusherClient(env.key, {
    cluster: 'mt1',
    wsHost: env.host,
    wsPort: env.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    ...(options.clientOptions || {}),
    channelAuthorization: {
      customHandler: (params, callback) => {
        try {
          const presence = params.channelName.startsWith('presence-')
            ? presenceFor(params.channelName)
            : undefined;
          callback(null, signer.authorizeChannel(params.socketId, params.channelName, presence));
        } catch (err) {
          callback(err, null);
        }
      },
    },
    userAuthentication: {
      customHandler: (params, callback) => {
        try {
          callback(null, signer.authenticateUser(params.socketId, userData(user)));
        } catch (err) {
          callback(err, null);
        }
      },
    },
  });
  liveClients.add(client);

  const log = new EventLog(label);
  const states = [];
  const errors = [];
  client.connection.bind('state_change', (change) => states.push(change));
  client.connection.bind('error', (err) => errors.push(err));
  client.connection.bind('connected', () => {
    const socket = client.connection.connection?.transport?.socket;
    if (socket) rawSockets.add(socket);
  });

  const wrapped = { label, client, user, log, states, errors };
  await withTimeout(`${label} to reach connection state 'connected'`, (resolve, reject) => {
    const check = () => {
      const state = client.connection.state;
      if (state === 'connected') resolve();
      else if (state === 'failed' || state === 'disconnected') {
        reject(new Error(`${label} connection went to '${state}'; errors: ${JSON.stringify(errors)}`));
      }
    };
    client.connection.bind('state_change', check);
    check();
  });
  assert.match(
    client.connection.socket_id,
    /^\d+\.\d+$/,
    `${label}: socket_id from pusher:connection_established must look like "<digits>.<digits>"`,
  );
  return wrapped;
}

/**
 * Subscribe `c` (a connect() result) to `name`, record `events` on it, and
 * wait for pusher:subscription_succeeded. Resolves with { channel, succeeded }.
 */
export async function subscribe(c, name, ...events) {
  const channel = c.client.subscribe(name);
  const log = c.log;
  log.watch(channel, 'pusher:subscription_succeeded', 'pusher:subscription_error', ...events);
  const outcome = await log.waitFor(
    (e) =>
      e.channel === name &&
      (e.event === 'pusher:subscription_succeeded' || e.event === 'pusher:subscription_error'),
    `pusher:subscription_succeeded on ${name}`,
  );
  assert.equal(
    outcome.event,
    'pusher:subscription_succeeded',
    `${c.label}: subscription to ${name} failed: ${JSON.stringify(outcome.data)}`,
  );
  assert.equal(channel.subscribed, true, `${c.label}: pusher-js should mark ${name} as subscribed`);
  return { channel, succeeded: outcome };
}

/** Wait until pusher-js reports a state other than `from` for this client. */
export function waitForStateChangeFrom(c, from, since = c.states.length) {
  return withTimeout(`${c.label} connection to leave state '${from}'`, (resolve) => {
    const check = () => {
      const change = c.states.slice(since).find((s) => s.previous === from);
      if (change) {
        c.client.connection.unbind('state_change', check);
        resolve(change);
      }
    };
    c.client.connection.bind('state_change', check);
    check();
  });
}

/** Disconnect one client and forget it. */
export function disconnect(c) {
  c.client.disconnect();
  liveClients.delete(c.client);
}

/** Disconnect every client still open (use in afterEach so the process can exit). */
export function disconnectAll() {
  for (const client of liveClients) client.disconnect();
  liveClients.clear();
  releaseClosedSockets();
}

/**
 * Sign `c` in and wait for pusher:signin_success and for the automatic
 * subscription to #server-to-user-{id} to be confirmed.
 */
export async function signIn(c) {
  c.client.bind('pusher:signin_success', (data) => c.log.push({ event: 'pusher:signin_success', data }));
  c.client.bind('pusher:error', (data) => c.log.push({ event: 'pusher:error', data }));
  c.client.user.bind('pusher:signin_error', (data) => c.log.push({ event: 'pusher:signin_error', data }));
  c.client.signin();

  const outcome = await c.log.waitFor(
    (e) => ['pusher:signin_success', 'pusher:signin_error', 'pusher:error'].includes(e.event),
    'pusher:signin_success',
  );
  assert.equal(outcome.event, 'pusher:signin_success', `${c.label}: sign-in failed: ${JSON.stringify(outcome.data)}`);
  assert.equal(typeof outcome.data.user_data, 'string', 'signin_success data.user_data is the signed JSON string');
  assert.deepEqual(JSON.parse(outcome.data.user_data), userData(c.user));

  // pusher-js resolves this once it has processed signin_success, then subscribes to the user channel.
  await withTimeout(`${c.label}: pusher-js to finish sign-in`, (resolve) =>
    c.client.user.signinDonePromise.then(resolve),
  );
  assert.deepEqual(c.client.user.user_data, userData(c.user));
  const userChannel = c.client.user.serverToUserChannel;
  assert.ok(userChannel, 'pusher-js should have created the server-to-user channel');
  assert.equal(userChannel.name, `#server-to-user-${c.user.id}`);
  if (!userChannel.subscribed) {
    c.log.watch(userChannel, 'pusher:subscription_succeeded', 'pusher:subscription_error');
    const sub = await c.log.waitFor(
      (e) =>
        e.channel === userChannel.name &&
        ['pusher:subscription_succeeded', 'pusher:subscription_error'].includes(e.event),
      `pusher_internal:subscription_succeeded on ${userChannel.name}`,
    );
    assert.equal(sub.event, 'pusher:subscription_succeeded', `user channel refused: ${JSON.stringify(sub.data)}`);
  }
  return userChannel;
}

/** Read a node-fetch Response returned by the server SDK as JSON, asserting HTTP 200. */
export async function jsonOk(responsePromise, what) {
  const res = await responsePromise;
  assert.equal(res.status, 200, `${what}: expected HTTP 200, got ${res.status}`);
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    assert.fail(`${what}: response body is not JSON: ${text}`);
  }
}
