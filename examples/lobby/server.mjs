// The lobby's app server: serves the page, authorizes its channels and
// users with the official `pusher` Node SDK, and triggers every server
// event the page shows (news, inbox, invitations, Q&A state, settings,
// notifications, roulette matches) through herdgate's HTTP API.
//
// Nothing here is herdgate-specific: point it at Pusher itself and it works
// the same. State lives in memory (a demo), every collection is bounded.
//
//   HERDGATE_HOST / HERDGATE_PORT      herdgate's HTTP API (127.0.0.1:6001)
//   HERDGATE_WS_HOST / HERDGATE_WS_PORT what the browser dials (default: the same)
//   HERDGATE_APP_ID / _KEY / _SECRET   the demo app of config/herdgate.toml
//   LOBBY_HOST / LOBBY_PORT            where this server listens (127.0.0.1:3000; port 0 = any)

import http from 'node:http';
import crypto from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import Pusher from 'pusher';

const env = process.env;
const here = path.dirname(fileURLToPath(import.meta.url));
const herdgate = {
  appId: env.HERDGATE_APP_ID ?? '100001',
  key: env.HERDGATE_APP_KEY ?? 'herdgate-demo-key',
  secret: env.HERDGATE_APP_SECRET ?? 'herdgate-demo-secret',
  host: env.HERDGATE_HOST ?? '127.0.0.1',
  port: Number(env.HERDGATE_PORT ?? 6001),
};
const pusher = new Pusher({ ...herdgate, useTLS: false });

// Sessions are per browser tab: a token in sessionStorage, sent as a header
// (so two tabs of one browser can be two people).
const tokenKey = crypto.randomBytes(32);
const sign = (id) => crypto.createHmac('sha256', tokenKey).update(id).digest('base64url');
const tokenFor = (id) => `${id}.${sign(id)}`;
function userOf(req) {
  const [id, mac] = String(req.headers['x-lobby-token'] ?? '').split('.');
  if (!id || !mac || !people.has(id)) return null;
  const want = Buffer.from(sign(id));
  const got = Buffer.from(mac);
  return got.length === want.length && crypto.timingSafeEqual(got, want) ? people.get(id) : null;
}

// The attendee directory and who knows whom (the watchlist).
const directory = [
  ['ada', 'Ada Lovelace', 'Analytical engines'],
  ['grace', 'Grace Hopper', 'Compilers'],
  ['alan', 'Alan Turing', 'Computability'],
  ['margaret', 'Margaret Hamilton', 'Flight software'],
  ['linus', 'Linus Torvalds', 'Kernels'],
  ['barbara', 'Barbara Liskov', 'Abstraction'],
  ['ken', 'Ken Thompson', 'Unix'],
  ['radia', 'Radia Perlman', 'Spanning trees'],
];
const people = new Map(directory.map(([id, name, topic]) => [id, { id, name, topic }]));
const knows = [['ada', 'grace'], ['ada', 'alan'], ['grace', 'margaret'], ['alan', 'linus'],
  ['barbara', 'ken'], ['radia', 'linus'], ['grace', 'barbara'], ['margaret', 'radia']];
const contactsOf = (id) => knows.flatMap(([a, b]) => (a === id ? [b] : b === id ? [a] : []));

const ROOMS = { rust: 'Rust', design: 'Design', hallway: 'Hallway track' };
// The session's host: may remove an attendee from the session chat.
const HOST = 'ada';
const CHANNELS = {
  news: 'news',
  settings: 'session-settings',
  qa: 'cache-qa-main',
  chat: 'presence-session-main',
  lobby: 'presence-lobby',
  // Everyone watching the keynote: a presence room of thousands at an event
  // (herdgate's big presence rooms: the host is featured, the rest counted).
  keynote: 'presence-keynote',
  roulette: 'presence-roulette',
};

const news = []; // newest first, at most 20
let settings = { title: 'herdgate live', stage: 'Doors open', qa_open: true, updated_at: Date.now() };
const questions = new Map(); // id -> { id, text, by, name, votes: Set }, at most 50
let currentQuestion = null;
let nextQuestion = 1;

function qaState() {
  const list = [...questions.values()]
    .sort((a, b) => b.votes.size - a.votes.size || a.id - b.id)
    .slice(0, 20)
    .map((q) => ({ id: q.id, text: q.text, name: q.name, votes: q.votes.size }));
  return { questions: list, current: currentQuestion, open: settings.qa_open };
}

const clip = (s, n) => String(s ?? '').trim().slice(0, n);
const publishQa = () => pusher.trigger(CHANNELS.qa, 'qa-state', qaState());

// --- HTTP plumbing -------------------------------------------------------

const MAX_BODY = 16 * 1024;
function body(req) {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks = [];
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(Object.assign(new Error('body too large'), { status: 413 }));
        req.destroy();
      } else chunks.push(c);
    });
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      const type = String(req.headers['content-type'] ?? '');
      try {
        resolve(type.includes('json') ? JSON.parse(text || '{}') : Object.fromEntries(new URLSearchParams(text)));
      } catch {
        reject(Object.assign(new Error('bad body'), { status: 400 }));
      }
    });
    req.on('error', reject);
  });
}

function send(res, status, value, type = 'application/json') {
  const data = type === 'application/json' ? JSON.stringify(value) : value;
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(data);
}

const STATIC = {
  '/': ['public/index.html', 'text/html; charset=utf-8'],
  '/lobby.js': ['public/lobby.js', 'text/javascript; charset=utf-8'],
  '/lobby.css': ['public/lobby.css', 'text/css; charset=utf-8'],
  // pusher-js from node_modules: no CDN.
  '/vendor/pusher.min.js': ['node_modules/pusher-js/dist/web/pusher.min.js', 'text/javascript; charset=utf-8'],
};

// --- Routes ---------------------------------------------------------------

const routes = {
  'GET /api/config': () => ({
    key: herdgate.key,
    wsHost: env.HERDGATE_WS_HOST ?? herdgate.host,
    wsPort: Number(env.HERDGATE_WS_PORT ?? herdgate.port),
    channels: CHANNELS,
    rooms: ROOMS,
    host: HOST,
    directory: [...people.values()],
  }),

  'POST /api/login': (_, b) => {
    const who = people.get(clip(b.id, 40));
    if (!who) throw Object.assign(new Error('no such attendee'), { status: 404 });
    return { token: tokenFor(who.id), me: who, contacts: contactsOf(who.id).map((id) => people.get(id)) };
  },

  // pusher-js channelAuthorization: presence for any attendee, a private
  // pair channel only for its two people.
  'POST /pusher/auth': (me, b) => {
    const socketId = clip(b.socket_id, 64);
    const channel = clip(b.channel_name, 164);
    if (channel.startsWith('presence-')) {
      const info = { name: me.name, topic: me.topic };
      // In the keynote the host is featured: listed and announced even
      // when the room is too big to list everyone.
      if (channel === CHANNELS.keynote && me.id === HOST) info.featured = true;
      return pusher.authorizeChannel(socketId, channel, { user_id: me.id, user_info: info });
    }
    const pair = /^private-pair-([a-z]+)--([a-z]+)$/.exec(channel);
    if (pair && (pair[1] === me.id || pair[2] === me.id)) {
      return pusher.authorizeChannel(socketId, channel);
    }
    throw Object.assign(new Error('not your channel'), { status: 403 });
  },

  // pusher-js userAuthentication (pusher.signin()): the watchlist is the
  // attendee's contacts, so the page hears when they come and go.
  'POST /pusher/user-auth': (me, b) =>
    pusher.authenticateUser(clip(b.socket_id, 64), {
      id: me.id,
      user_info: { name: me.name },
      watchlist: contactsOf(me.id),
    }),

  'GET /api/news': () => ({ items: news }),
  'POST /api/news': async (me, b) => {
    const item = { id: crypto.randomUUID(), headline: clip(b.headline, 200), by: me.name, at: Date.now() };
    if (!item.headline) throw Object.assign(new Error('empty headline'), { status: 400 });
    news.unshift(item);
    news.length = Math.min(news.length, 20);
    await pusher.trigger(CHANNELS.news, 'news-item', item);
    return item;
  },

  'GET /api/settings': () => settings,
  'POST /api/settings': async (_, b) => {
    settings = {
      title: clip(b.title, 80) || settings.title,
      stage: clip(b.stage, 120) || settings.stage,
      qa_open: b.qa_open === undefined ? settings.qa_open : Boolean(b.qa_open),
      updated_at: Date.now(),
    };
    await pusher.trigger(CHANNELS.settings, 'settings', settings);
    await publishQa();
    return settings;
  },

  'GET /api/qa': () => qaState(),
  'POST /api/qa/ask': async (me, b) => {
    const text = clip(b.text, 200);
    if (!text) throw Object.assign(new Error('empty question'), { status: 400 });
    if (!settings.qa_open) throw Object.assign(new Error('Q&A is closed'), { status: 409 });
    if (questions.size >= 50) questions.delete(questions.keys().next().value);
    const q = { id: nextQuestion++, text, by: me.id, name: me.name, votes: new Set() };
    questions.set(q.id, q);
    await publishQa();
    return { id: q.id };
  },
  'POST /api/qa/vote': async (me, b) => {
    const q = questions.get(Number(b.id));
    if (!q) throw Object.assign(new Error('no such question'), { status: 404 });
    q.votes.add(me.id);
    await publishQa();
    return { votes: q.votes.size };
  },
  'POST /api/qa/current': async (_, b) => {
    const q = questions.get(Number(b.id));
    currentQuestion = q ? { id: q.id, text: q.text, name: q.name } : null;
    await publishQa();
    return { current: currentQuestion };
  },

  // Moderation (herdgate's API, through the SDK's generic post): the host
  // removes an attendee from the session chat on all their sockets and bans
  // them for `minutes`, or lifts the ban.
  'POST /api/moderate': async (me, b) => {
    if (me.id !== HOST) throw Object.assign(new Error('only the host moderates'), { status: 403 });
    const who = people.get(clip(b.user, 40));
    if (!who) throw Object.assign(new Error('no such attendee'), { status: 404 });
    const base = `/channels/${CHANNELS.chat}/users/${who.id}`;
    const r = b.lift
      ? await pusher.post({ path: `${base}/unban` })
      : await pusher.post({ path: `${base}/remove`, body: { ban_seconds: Math.min(60, Math.max(0, Number(b.minutes) || 0)) * 60 } });
    return r.json();
  },

  // Inbox, invitations and notifications: server-to-user events.
  'POST /api/message': async (me, b) => {
    const to = people.get(clip(b.to, 40));
    if (!to) throw Object.assign(new Error('no such attendee'), { status: 404 });
    const msg = { from: me.id, name: me.name, text: clip(b.text, 500), at: Date.now() };
    await pusher.sendToUser(to.id, 'inbox-message', msg);
    return msg;
  },
  'POST /api/invite': async (me, b) => {
    const to = people.get(clip(b.to, 40));
    const room = clip(b.room, 40);
    if (!to || !ROOMS[room]) throw Object.assign(new Error('no such attendee or room'), { status: 404 });
    const invite = { from: me.id, name: me.name, room, title: ROOMS[room], at: Date.now() };
    await pusher.sendToUser(to.id, 'invitation', invite);
    return invite;
  },
  'POST /api/notify': async (me, b) => {
    const note = { title: clip(b.title, 80) || 'Announcement', body: clip(b.body, 300), from: me.name, at: Date.now() };
    const to = b.to ? [clip(b.to, 40)] : [...people.keys()];
    await Promise.all(to.filter((id) => people.has(id)).map((id) => pusher.sendToUser(id, 'notification', note)));
    return { sent: to.length };
  },

  // Networking roulette: pairs drawn from whoever is in the roulette room now.
  'POST /api/roulette/draw': async () => {
    const res = await pusher.get({ path: `/channels/${CHANNELS.roulette}/users` });
    if (!res.ok) throw Object.assign(new Error(`herdgate answered ${res.status}`), { status: 502 });
    const ids = (await res.json()).users.map((u) => u.id).filter((id) => people.has(id));
    for (let i = ids.length - 1; i > 0; i--) {
      const j = crypto.randomInt(i + 1);
      [ids[i], ids[j]] = [ids[j], ids[i]];
    }
    const pairs = [];
    for (let i = 0; i + 1 < ids.length; i += 2) pairs.push([ids[i], ids[i + 1]]);
    const tell = (id, partner, channel) =>
      pusher.sendToUser(id, 'roulette-match', { partner: partner && people.get(partner), channel });
    await Promise.all(pairs.flatMap(([a, b]) => {
      const channel = `private-pair-${[a, b].sort().join('--')}`;
      return [tell(a, b, channel), tell(b, a, channel)];
    }));
    if (ids.length % 2) await tell(ids[ids.length - 1], null, null);
    return { pairs: pairs.length, drawn: ids.length };
  },
};

const OPEN = new Set(['GET /api/config', 'POST /api/login']);

async function handle(req, res) {
  const url = new URL(req.url, 'http://lobby');
  const file = req.method === 'GET' && STATIC[url.pathname];
  if (file) {
    try {
      return send(res, 200, await readFile(path.join(here, file[0])), file[1]);
    } catch {
      return send(res, 500, { error: `missing ${file[0]} (run npm ci)` });
    }
  }
  const route = routes[`${req.method} ${url.pathname}`];
  if (!route) return send(res, 404, { error: 'not found' });
  const me = userOf(req);
  if (!me && !OPEN.has(`${req.method} ${url.pathname}`)) return send(res, 401, { error: 'log in first' });
  try {
    const b = req.method === 'POST' ? await body(req) : {};
    send(res, 200, await route(me, b));
  } catch (e) {
    const status = e.status ?? 502;
    if (status >= 500) console.error(`${req.method} ${url.pathname}: ${e.message}`);
    send(res, status, { error: e.message });
  }
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((e) => send(res, 500, { error: String(e) }));
});
server.listen(Number(env.LOBBY_PORT ?? 3000), env.LOBBY_HOST ?? '127.0.0.1', () => {
  const { address, port } = server.address();
  console.log(`lobby listening on http://${address}:${port} (herdgate ${herdgate.host}:${herdgate.port}, app ${herdgate.appId})`);
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
