// The lobby page: every module runs over ONE pusher-js socket to herdgate.
//
//   news feed            public channel `news`
//   live settings        public channel `session-settings` (server events)
//   Q&A                  cache channel `cache-qa-main`: a late joiner gets the
//                        last state replayed on subscribe (or pusher:cache_miss)
//   session chat         `presence-session-main`: members + client-chat / client-typing,
//                        and reactions (client-reaction, tallied by herdgate)
//   lobby, group rooms   presence channels with member lists
//   roulette             `presence-roulette`; matches arrive server-to-user and
//                        each pair chats on its own private channel
//   inbox, invitations,  `#server-to-user-{id}` after pusher.signin()
//   notifications
//   contacts online      the sign-in's watchlist (pusher.user.watchlist)
//   load state           herdgate's `herdgate:status` events, shown as a
//                        banner ("limited interaction: chat paused") instead
//                        of a spinner
//
// Everything from the network is inserted as text, never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const clock = (at) => new Date(at).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
const LIST_MAX = 50;
/** Prepend (or append) to a list, keeping it bounded. */
function addItem(list, li, { append = false } = {}) {
  if (append) {
    list.append(li);
    while (list.children.length > LIST_MAX) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
  } else {
    list.prepend(li);
    while (list.children.length > LIST_MAX) list.lastElementChild.remove();
  }
}

function toast(title, body) {
  const t = el('div', { class: 'toast', role: 'status' }, el('b', {}, title), body);
  const box = $('toasts');
  box.append(t);
  while (box.children.length > 3) box.firstElementChild.remove();
  setTimeout(() => t.remove(), 5000);
}

// --- The app server's API ---------------------------------------------------

const session = {
  get token() { return sessionStorage.getItem('lobby-token'); },
  get me() { return JSON.parse(sessionStorage.getItem('lobby-me') || 'null'); },
  get contacts() { return JSON.parse(sessionStorage.getItem('lobby-contacts') || '[]'); },
  save(r) {
    sessionStorage.setItem('lobby-token', r.token);
    sessionStorage.setItem('lobby-me', JSON.stringify(r.me));
    sessionStorage.setItem('lobby-contacts', JSON.stringify(r.contacts));
  },
  clear() { sessionStorage.clear(); },
};

async function api(method, path, body) {
  const headers = { 'content-type': 'application/json' };
  if (session.token) headers['x-lobby-token'] = session.token;
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const value = await r.json().catch(() => ({}));
  if (r.status === 401 && path !== '/api/login') {
    session.clear(); // the app server restarted: its tokens are gone
    location.reload();
  }
  if (!r.ok) throw new Error(value.error || `HTTP ${r.status}`);
  return value;
}

/** Run an action; show its failure as a toast instead of losing it. */
const attempt = (what, fn) => async (ev) => {
  if (ev && ev.preventDefault) ev.preventDefault();
  try {
    await fn(ev);
  } catch (e) {
    toast(`${what} failed`, e.message);
  }
};

// --- Start -------------------------------------------------------------------

main().catch((e) => {
  const b = $('banner');
  b.hidden = false;
  b.dataset.level = 'offline';
  b.textContent = `The lobby could not start: ${e.message}`;
});

async function main() {
  const cfg = await api('GET', '/api/config');
  const wanted = new URLSearchParams(location.search).get('as');
  if (wanted && (!session.me || session.me.id !== wanted)) {
    session.save(await api('POST', '/api/login', { id: wanted }));
  }
  if (!session.me) return showLogin(cfg);
  runLobby(cfg, session.me, session.contacts);
}

function showLogin(cfg) {
  $('login').hidden = false;
  $('conn-state').textContent = 'not signed in';
  const box = $('login-people');
  for (const p of cfg.directory) {
    box.append(el('button', {
      'data-id': p.id,
      onclick: attempt('Signing in', async () => {
        session.save(await api('POST', '/api/login', { id: p.id }));
        location.reload();
      }),
    }, p.name, el('br'), el('span', { class: 'note' }, p.topic)));
  }
}

function runLobby(cfg, me, contacts) {
  $('lobby').hidden = false;
  $('me').textContent = me.name;
  $('me').title = 'Sign out';
  $('me').style.cursor = 'pointer';
  $('me').onclick = () => { session.clear(); location.href = '/'; };
  document.body.dataset.me = me.id;

  // One socket for every module.
  const auth = { headers: { 'x-lobby-token': session.token } };
  const pusher = new Pusher(cfg.key, {
    cluster: 'mt1', // required by pusher-js, unused with wsHost
    wsHost: cfg.wsHost,
    wsPort: cfg.wsPort,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    channelAuthorization: { endpoint: '/pusher/auth', transport: 'ajax', ...auth },
    userAuthentication: { endpoint: '/pusher/user-auth', transport: 'ajax', ...auth },
  });
  window.lobby = { pusher }; // for the browser console (and the tests' diagnostics)

  const banner = makeBanner(pusher);
  const chat = makeChat(pusher, me, banner, cfg.host);
  makeNews(pusher);
  const qa = makeQa(pusher, me);
  makeSettings(pusher, qa);
  makeKeynote(pusher);
  makeLobbyPresence(pusher);
  const rooms = makeRooms(pusher, cfg.rooms, banner);
  makeContacts(pusher, contacts, rooms);
  makeInbox(pusher, rooms);
  makeRoulette(pusher, me, banner);
  makeOrganizer(qa);
  banner.onChange((limited) => chat.pause(limited.has('client_events')));

  pusher.user.signin();
}

// --- herdgate:status and the connection, as a banner ------------------------

const LIMITS = {
  client_events: 'chat and typing are paused',
  client_events_rate: 'chat is slowed down',
  presence_member_events: 'who-joined updates in big rooms are paused',
  coalesced_channels: 'busy feeds show only their latest update',
  nonessential_subscriptions: 'some rooms cannot be joined right now',
};

function makeBanner(pusher) {
  const b = $('banner');
  let load = { state: 'normal', limited: [] };
  let conn = pusher.connection.state;
  let everConnected = false;
  const moving = new Map(); // channel -> "moving" | "unavailable"
  const listeners = [];

  function render() {
    const limited = new Set(load.limited || []);
    let level = null;
    let text = '';
    let detail = '';
    if (everConnected && conn !== 'connected') {
      level = 'offline';
      text = conn === 'failed' ? 'Offline: this browser cannot connect.' : 'Offline: reconnecting…';
      detail = 'Everything on the page stays; new updates arrive when the connection is back.';
    } else if (load.state !== 'normal') {
      level = load.state;
      text = limited.has('client_events') ? 'Limited interaction: chat paused'
        : limited.has('client_events_rate') ? 'Busy: chat slowed down'
        : 'Busy: some features are limited';
      const said = [...limited].map((l) => LIMITS[l]).filter(Boolean);
      detail = `The event is very busy${said.length ? ` (${said.join('; ')})` : ''}. News, Q&A and announcements keep flowing.`;
    } else if (moving.size) {
      level = 'moving';
      text = 'A moment: some rooms are moving to another server';
      detail = [...moving.keys()].join(', ');
    }
    b.hidden = level === null;
    b.dataset.level = level || 'normal';
    b.dataset.state = load.state;
    b.replaceChildren(text, el('span', { class: 'detail' }, detail));
    document.body.dataset.load = load.state;
    for (const f of listeners) f(conn === 'connected' ? limited : new Set(['client_events']));
  }

  // Node-wide load state: { state: "normal"|"pressured"|"degraded"|"critical", limited: [...] }.
  pusher.bind('herdgate:status', (d) => {
    if (!d || typeof d.state !== 'string') return; // per-room statuses are bound per channel
    load = { state: d.state, limited: Array.isArray(d.limited) ? d.limited : [] };
    render();
  });
  pusher.connection.bind('state_change', ({ current }) => {
    conn = current;
    if (current === 'connected') {
      everConnected = true;
      // A new socket: herdgate tells it at once if the node is not normal,
      // and rooms are subscribed afresh.
      load = { state: 'normal', limited: [] };
      moving.clear();
    }
    const c = $('conn-state');
    c.dataset.state = current;
    c.textContent = current === 'connected' ? 'live' : current;
    document.body.dataset.connected = String(current === 'connected');
    render();
  });
  render();
  return {
    onChange(f) {
      listeners.push(f);
      render();
    },
    /** Per-channel herdgate:status {room: "moving"|"unavailable"|"ready"} (cluster handovers). */
    watch(channel) {
      channel.bind('herdgate:status', (d) => {
        if (!d || typeof d.room !== 'string') return;
        if (d.room === 'ready') moving.delete(channel.name);
        else moving.set(channel.name, d.room);
        render();
      });
      return channel;
    },
    forget(name) {
      if (moving.delete(name)) render();
    },
    get limited() { return new Set(load.limited || []); },
  };
}

// --- News feed (public channel) ----------------------------------------------

function makeNews(pusher) {
  const list = $('news-list');
  const seen = new Set();
  const show = (item) => {
    if (seen.has(item.id)) return;
    seen.add(item.id);
    addItem(list, el('li', { 'data-id': item.id }, el('span', { class: 'headline' }, item.headline),
      el('span', { class: 'when' }, `${item.by} · ${clock(item.at)}`)));
  };
  pusher.subscribe('news').bind('news-item', show);
  api('GET', '/api/news').then(({ items }) => items.slice().reverse().forEach(show)).catch(() => {});
}

// --- Live session settings (server events) ---------------------------------

function makeSettings(pusher, qa) {
  let at = 0;
  const apply = (s) => {
    if (!s || s.updated_at < at) return;
    at = s.updated_at;
    $('settings-title').textContent = s.title;
    $('settings-stage').textContent = s.stage;
    document.title = `${s.title} · lobby`;
    qa.setOpen(s.qa_open);
  };
  pusher.subscribe('session-settings').bind('settings', apply);
  api('GET', '/api/settings').then(apply).catch(() => {});
}

// --- Q&A on a cache channel ---------------------------------------------------

function makeQa(pusher, me) {
  const list = $('qa-list');
  const source = $('qa-source');
  const voted = new Set();
  let open = true;
  let first = true;

  function render(state) {
    list.replaceChildren();
    for (const q of state.questions) {
      list.append(el('li', { 'data-id': q.id, 'data-votes': q.votes, class: state.current && state.current.id === q.id ? 'now' : '' },
        el('span', { class: 'votes', title: 'votes' }, `▲ ${q.votes}`),
        el('span', { class: 'qtext' }, q.text), el('span', { class: 'when' }, q.name), ' ',
        el('button', {
          class: 'small vote', disabled: voted.has(q.id),
          onclick: attempt('Voting', async () => { voted.add(q.id); await api('POST', '/api/qa/vote', { id: q.id }); }),
        }, 'vote'), ' ',
        el('button', {
          class: 'small make-current',
          onclick: attempt('Choosing the question', () => api('POST', '/api/qa/current', { id: q.id })),
        }, 'answer now')));
    }
    const cur = $('qa-current');
    cur.dataset.id = state.current ? state.current.id : '';
    cur.replaceChildren(...(state.current ? [el('b', {}, 'Now answering: '), state.current.text,
      el('span', { class: 'when' }, state.current.name)] : []));
    setOpen(state.open);
  }

  function setOpen(o) {
    open = o;
    $('qa-input').disabled = !o;
    $('qa-ask').disabled = !o;
    $('qa-input').placeholder = o ? 'Ask a question…' : 'Q&A is closed';
    $('qa-toggle').textContent = o ? 'Close Q&A' : 'Open Q&A';
  }

  const ch = pusher.subscribe('cache-qa-main');
  ch.bind('qa-state', (state) => {
    // The first event after subscribing is the cache channel's replay.
    source.dataset.source = first ? 'cache' : 'live';
    source.textContent = first ? 'state replayed by the cache channel on subscribe' : 'live';
    first = false;
    render(state);
  });
  ch.bind('pusher:cache_miss', () => {
    first = false;
    source.dataset.source = 'miss';
    source.textContent = 'cache miss: nothing published yet, state fetched from the app server';
    api('GET', '/api/qa').then(render).catch(() => {});
  });
  ch.bind('pusher:subscription_succeeded', () => { first = true; });

  $('qa-form').addEventListener('submit', attempt('Asking', async () => {
    const text = $('qa-input').value.trim();
    if (!text) return;
    await api('POST', '/api/qa/ask', { text });
    $('qa-input').value = '';
  }));
  return { setOpen, get open() { return open; }, me };
}

// --- Session chat: presence + client events ---------------------------------

function memberNames(channel) {
  const names = [];
  channel.members.each((m) => names.push(m.info.name));
  return names.sort();
}

function makeChat(pusher, me, banner, host) {
  const NAME = 'presence-session-main';
  let ch = null; // the channel: a new one when a removed attendee rejoins
  const log = $('chat-log');
  const input = $('chat-input');
  const typing = $('typing');
  const typers = new Map(); // user id -> timer
  let paused = false;

  const members = () => {
    const names = memberNames(ch);
    const box = $('chat-members');
    box.dataset.count = names.length;
    box.textContent = `Here (${names.length}): ${names.join(', ')}`;
    // The host's moderation list: everyone here but the host.
    const pick = $('mod-user');
    const chosen = pick.value;
    const others = [];
    ch.members.each((m) => { if (m.id !== me.id) others.push(m); });
    pick.replaceChildren(...others.map((m) => el('option', { value: m.id }, m.info.name)));
    if (others.some((m) => m.id === chosen)) pick.value = chosen;
  };

  const line = (who, text, at, mine) => addItem(log, el('li', { class: mine ? 'mine' : '' },
    el('span', { class: 'who' }, who), text, el('span', { class: 'when' }, clock(at))), { append: true });

  const showTyping = () => {
    const names = [...typers.keys()].map((id) => (ch.members.get(id) || { info: { name: id } }).info.name);
    typing.textContent = names.length ? `${names.join(', ')} ${names.length > 1 ? 'are' : 'is'} typing…` : '';
  };
  const stopTyping = (id) => {
    clearTimeout(typers.get(id));
    typers.delete(id);
    showTyping();
  };

  // Removed by the host (herdgate's moderation API): the channel is gone
  // for this socket; while banned, joining again is refused.
  const removedBox = $('chat-removed');
  const removed = (d) => {
    const mins = Math.ceil((d.ban_seconds ?? d.retry_after ?? 0) / 60);
    $('card-chat').dataset.removed = d.type === 'Banned' ? 'banned' : 'removed';
    removedBox.hidden = false;
    $('chat-removed-text').textContent = d.type === 'Banned'
      ? `You cannot rejoin the chat yet (about ${mins} min left).`
      : `A moderator removed you from the chat${mins ? ` for ${mins} min` : ''}.`;
    input.disabled = true;
    $('chat-send').disabled = true;
  };

  const join = () => {
    // pusher-js keeps a channel the server refused "pending" (it would send
    // nothing again): drop it before subscribing anew.
    if (pusher.channel(NAME)?.subscriptionPending) pusher.channels.remove(NAME);
    else pusher.unsubscribe(NAME);
    ch = banner.watch(pusher.subscribe(NAME));
    ch.bind('pusher:subscription_succeeded', () => {
      delete $('card-chat').dataset.removed;
      removedBox.hidden = true;
      input.disabled = paused;
      $('chat-send').disabled = paused;
      members();
    });
    ch.bind('pusher:subscription_error', (d) => {
      if (d && (d.type === 'Removed' || d.type === 'Banned')) removed(d);
    });
    ch.bind('pusher:member_added', members);
    ch.bind('pusher:member_removed', (m) => { stopTyping(m.id); members(); });
    ch.bind('client-chat', (d, meta) => {
      stopTyping(meta.user_id);
      const who = ch.members.get(meta.user_id);
      line(who ? who.info.name : meta.user_id, String(d.text || ''), d.at || Date.now(), false);
    });
    ch.bind('client-typing', (_, meta) => {
      if (meta.user_id === me.id) return;
      clearTimeout(typers.get(meta.user_id));
      typers.set(meta.user_id, setTimeout(() => stopTyping(meta.user_id), 3000));
      showTyping();
    });
    ch.bind('herdgate:tally', tally);
  };
  $('chat-rejoin').addEventListener('click', join);

  // The host removes someone from the chat for 10 minutes, or lets them back.
  $('mod-form').hidden = me.id !== host;
  $('mod-remove').addEventListener('click', attempt('Removing', async () => {
    const user = $('mod-user').value;
    if (!user) return;
    $('mod-user').dataset.last = user;
    await api('POST', '/api/moderate', { user, minutes: 10 });
  }));
  $('mod-unban').addEventListener('click', attempt('Letting back in', async () => {
    const user = $('mod-user').dataset.last;
    if (!user) return;
    const r = await api('POST', '/api/moderate', { user, lift: true });
    $('mod-form').dataset.lifted = r.lifted ? user : '';
  }));

  let lastTyping = 0;
  input.addEventListener('input', () => {
    if (paused || !ch.subscribed || Date.now() - lastTyping < 1500) return;
    lastTyping = Date.now();
    ch.trigger('client-typing', {});
  });
  $('chat-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || paused) return;
    if (!ch.trigger('client-chat', { text, at: Date.now() })) {
      toast('Not sent', 'the chat is still connecting');
      return;
    }
    lastTyping = 0;
    line('you', text, Date.now(), true);
    input.value = '';
  });

  // Reactions: counted by herdgate, not fanned out ([[apps.tallies]] on
  // presence-session- for client-reaction by emoji): nobody gets anyone's
  // reaction, everyone gets one herdgate:tally summary a second.
  const counts = new Map();
  const showCounts = () => {
    const box = $('reaction-counts');
    let total = 0;
    for (const n of counts.values()) total += n;
    box.dataset.total = total;
    box.textContent = [...counts].map(([e, n]) => `${e} ${n}`).join('  ');
  };
  function tally(d) {
    const t = d && d.tallies && d.tallies['client-reaction'];
    if (!t) return;
    for (const [emoji, n] of Object.entries(t.values || {})) counts.set(emoji, (counts.get(emoji) || 0) + n);
    if (t.other) counts.set('…', (counts.get('…') || 0) + t.other);
    showCounts();
  }
  join();
  for (const b of document.querySelectorAll('#reactions button')) {
    b.addEventListener('click', () => {
      if (!paused && ch.subscribed) ch.trigger('client-reaction', { emoji: b.dataset.emoji });
    });
  }

  // Refused client events (pusher:error 4301: overloaded or too fast).
  pusher.connection.bind('error', (e) => {
    if (e && e.type === 'PusherError' && e.data && e.data.code === 4301) {
      addItem(log, el('li', { class: 'failed' }, `Not delivered: ${e.data.message || 'chat is paused'}`), { append: true });
    }
  });

  return {
    pause(on) {
      paused = on;
      const out = Boolean($('card-chat').dataset.removed);
      input.disabled = on || out;
      $('chat-send').disabled = on || out;
      input.placeholder = on ? 'Chat paused while the event is busy' : 'Say something…';
      $('card-chat').dataset.paused = String(on);
    },
  };
}

// --- The keynote: a big presence room ------------------------------------------
//
// Thousands watch the keynote. Past the app's presence_full_members herdgate
// stops sending every join and leave to everyone: pusher-js's member list
// then holds the featured members (the host) and us, members.count starts
// at the true count, and herdgate:presence_count brings the new count at
// most every few seconds (what the herdgate-presence plugin applies for
// pusher-js; here the page renders it itself).

function makeKeynote(pusher) {
  const ch = pusher.subscribe('presence-keynote');
  const render = (count) => {
    const n = count ?? ch.members.count;
    $('keynote-count').dataset.count = n;
    $('keynote-count').textContent = String(n);
    const speakers = [];
    ch.members.each((m) => { if (m.info && m.info.featured) speakers.push(m.info.name); });
    $('keynote-speakers').textContent = speakers.length ? `On stage: ${speakers.sort().join(', ')}` : '';
  };
  ch.bind('pusher:subscription_succeeded', () => render());
  ch.bind('pusher:member_added', () => render());
  ch.bind('pusher:member_removed', () => render());
  ch.bind('herdgate:presence_count', (d) => {
    ch.members.count = d.count;
    render(d.count);
  });
}

// --- Everyone in the lobby (presence) ----------------------------------------

function makeLobbyPresence(pusher) {
  const ch = pusher.subscribe('presence-lobby');
  const render = () => {
    const names = memberNames(ch);
    $('lobby-count').textContent = `(${names.length})`;
    $('lobby-members').dataset.count = names.length;
    $('lobby-members').replaceChildren(...names.map((n) => el('li', {}, n)));
  };
  ch.bind('pusher:subscription_succeeded', render);
  ch.bind('pusher:member_added', render);
  ch.bind('pusher:member_removed', render);
}

// --- Group rooms (presence with member lists) --------------------------------

function makeRooms(pusher, ROOMS, banner) {
  let current = null; // { id, channel }
  const buttons = $('room-buttons');
  for (const [id, title] of Object.entries(ROOMS)) {
    buttons.append(el('button', { 'data-room': id, onclick: () => (current && current.id === id ? leave() : join(id)) }, title));
  }
  const render = () => {
    for (const b of buttons.children) b.classList.toggle('on', !!current && b.dataset.room === current.id);
    const list = $('room-members');
    if (!current) {
      $('room-current').textContent = 'Pick a room to see who is in it.';
      list.replaceChildren();
      list.dataset.count = 0;
      return;
    }
    const names = current.channel.subscribed ? memberNames(current.channel) : [];
    list.dataset.room = current.id;
    list.dataset.count = names.length;
    $('room-current').textContent = current.channel.subscribed
      ? `You are in ${ROOMS[current.id]} (${names.length} here)` : `Joining ${ROOMS[current.id]}…`;
    list.replaceChildren(...names.map((n) => el('li', {}, n)));
  };
  function leave() {
    if (current) {
      pusher.unsubscribe(current.channel.name);
      banner.forget(current.channel.name);
    }
    current = null;
    render();
  }
  function join(id) {
    if (!ROOMS[id]) return;
    if (current && current.id === id) return;
    leave();
    const channel = banner.watch(pusher.subscribe(`presence-room-${id}`));
    current = { id, channel };
    channel.bind('pusher:subscription_succeeded', render);
    channel.bind('pusher:member_added', render);
    channel.bind('pusher:member_removed', render);
    channel.bind('pusher:subscription_error', (e) => {
      $('room-current').textContent = e.status === 503
        ? `${ROOMS[id]} cannot be joined while the event is this busy: try again in a minute.`
        : `Could not join ${ROOMS[id]} (${e.status || e.type}).`;
      pusher.unsubscribe(channel.name);
      current = null;
    });
    render();
  }
  render();
  return { join, get current() { return current && current.id; }, title: (id) => ROOMS[id] };
}

// --- Networking: contacts online (watchlist) and direct messages ------------

function makeContacts(pusher, contacts, rooms) {
  const list = $('contacts-list');
  const online = new Set();
  for (const c of contacts) {
    list.append(el('li', { 'data-id': c.id, 'data-online': 'false' },
      el('span', { class: 'dot' }), el('span', { class: 'who' }, c.name), el('span', { class: 'note' }, c.topic), ' ',
      el('button', {
        class: 'small invite',
        title: 'Invite to your group room',
        onclick: attempt('Inviting', async () => {
          const room = rooms.current || 'hallway';
          if (!rooms.current) rooms.join(room);
          await api('POST', '/api/invite', { to: c.id, room });
          toast('Invitation sent', `${c.name} is invited to ${rooms.title(room)}`);
        }),
      }, 'invite')));
    $('dm-to').append(el('option', { value: c.id }, c.name));
  }
  const set = (ids, on) => {
    for (const id of ids) {
      if (on) online.add(id); else online.delete(id);
      const li = list.querySelector(`li[data-id="${CSS.escape(id)}"]`);
      if (li) li.dataset.online = String(on);
    }
    $('contacts-source').textContent = `${online.size} of ${contacts.length} contacts online (your sign-in watchlist)`;
  };
  // Told at sign-in who is online, then every change.
  pusher.user.watchlist.bind('online', (e) => set(e.user_ids, true));
  pusher.user.watchlist.bind('offline', (e) => set(e.user_ids, false));
  set([], false);

  $('dm-form').addEventListener('submit', attempt('Sending', async () => {
    const text = $('dm-input').value.trim();
    if (!text) return;
    await api('POST', '/api/message', { to: $('dm-to').value, text });
    $('dm-input').value = '';
    toast('Sent', `to ${$('dm-to').selectedOptions[0].textContent}`);
  }));
}

// --- Inbox, invitations, notifications (server-to-user) ---------------------

function makeInbox(pusher, rooms) {
  const got = () => { $('inbox-empty').hidden = true; };
  pusher.user.bind('inbox-message', (m) => {
    got();
    addItem($('inbox-list'), el('li', { class: 'message' },
      el('span', { class: 'who' }, m.name), m.text, el('span', { class: 'when' }, clock(m.at))));
  });
  pusher.user.bind('invitation', (inv) => {
    got();
    const li = el('li', { class: 'invitation', 'data-room': inv.room },
      el('b', {}, `${inv.name} invites you to ${inv.title}`), ' ',
      el('button', {
        class: 'small join',
        onclick: (ev) => { rooms.join(inv.room); ev.target.replaceWith(el('span', { class: 'note' }, 'joined')); },
      }, 'join'));
    addItem($('invitations-list'), li);
    toast('Invitation', `${inv.name} invites you to ${inv.title}`);
  });
  pusher.user.bind('notification', (n) => {
    got();
    addItem($('inbox-list'), el('li', { class: 'notification' },
      el('b', {}, n.title), ' ', n.body, el('span', { class: 'when' }, `${n.from} · ${clock(n.at)}`)));
    toast(n.title, n.body);
  });
  pusher.connection.bind('message', (e) => {
    if (e.event === 'pusher:signin_success') document.body.dataset.signedIn = 'true';
  });
}

// --- Networking roulette: pairs drawn from a presence room ------------------

function makeRoulette(pusher, me, banner) {
  const button = $('roulette-join');
  let room = null;
  let pair = null;
  const count = () => {
    $('roulette-count').textContent = room && room.subscribed ? `${room.members.count} in the roulette` : '';
  };
  button.addEventListener('click', () => {
    if (room) {
      pusher.unsubscribe(room.name);
      room = null;
      button.textContent = 'Join the roulette';
      button.classList.remove('on');
      count();
      return;
    }
    room = banner.watch(pusher.subscribe('presence-roulette'));
    button.textContent = 'Leave the roulette';
    button.classList.add('on');
    for (const e of ['pusher:subscription_succeeded', 'pusher:member_added', 'pusher:member_removed']) room.bind(e, count);
    room.bind('pusher:subscription_error', (e) => {
      toast('Roulette', e.status === 503 ? 'paused while the event is busy' : 'could not join');
      pusher.unsubscribe('presence-roulette');
      room = null;
      button.textContent = 'Join the roulette';
      button.classList.remove('on');
    });
  });

  const log = $('pair-log');
  pusher.user.bind('roulette-match', (m) => {
    if (pair) pusher.unsubscribe(pair.name);
    pair = null;
    log.replaceChildren();
    const box = $('roulette-partner');
    box.dataset.partner = m.partner ? m.partner.id : '';
    if (!m.partner) {
      box.textContent = 'Odd one out this round: you are first in line for the next draw.';
      $('pair-form').hidden = true;
      return;
    }
    box.replaceChildren(el('b', {}, `You are paired with ${m.partner.name}`), el('span', { class: 'note' }, ` · ${m.partner.topic}`));
    pair = pusher.subscribe(m.channel);
    pair.bind('client-pair', (d) => addItem(log, el('li', {}, el('span', { class: 'who' }, m.partner.name), String(d.text || '')), { append: true }));
    $('pair-form').hidden = false;
  });
  $('pair-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = $('pair-input').value.trim();
    if (!text || !pair || !pair.trigger('client-pair', { text })) return;
    addItem(log, el('li', { class: 'mine' }, el('span', { class: 'who' }, 'you'), text), { append: true });
    $('pair-input').value = '';
  });
}

// --- Organizer controls (server events through the app server) --------------

function makeOrganizer(qa) {
  $('news-form').addEventListener('submit', attempt('Posting', async () => {
    const headline = $('news-input').value.trim();
    if (!headline) return;
    await api('POST', '/api/news', { headline });
    $('news-input').value = '';
  }));
  $('stage-form').addEventListener('submit', attempt('Updating', async () => {
    const stage = $('stage-input').value.trim();
    if (!stage) return;
    await api('POST', '/api/settings', { stage });
    $('stage-input').value = '';
  }));
  $('notify-all').addEventListener('click', attempt('Notifying', () =>
    api('POST', '/api/notify', { title: 'Announcement', body: 'The next session starts in 5 minutes.' })));
  $('roulette-draw').addEventListener('click', attempt('Drawing', async () => {
    const r = await api('POST', '/api/roulette/draw');
    toast('Roulette', `${r.pairs} pair${r.pairs === 1 ? '' : 's'} drawn from ${r.drawn} people`);
  }));
  $('qa-toggle').addEventListener('click', attempt('Q&A', () => api('POST', '/api/settings', { qa_open: !qa.open })));
}
