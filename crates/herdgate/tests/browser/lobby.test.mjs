// The lobby demo (examples/lobby) in Chromium: two people in two browser
// contexts, each on one pusher-js socket, see each other in presence, chat
// with typing indicators, vote, get a news item and a private invitation,
// see each other come online and go offline (watchlist); a late joiner gets
// the current question from the cache channel; and when a storm makes the
// node degraded the banner says "Limited interaction: chat paused", chat
// really pauses (herdgate refuses client events) and the feed keeps flowing.
//
// herdgate runs with max_connections = 100 and connection thresholds
// [0.3, 0.45, 0.95]: the people's few sockets keep it normal, the storm's 50
// make it degraded (browser.rs).

import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { launch, person, requireEnv, showingFailures, shot, storm, text, until } from './helpers.mjs';

const lobby = requireEnv('LOBBY_URL');
const wsUrl = `${requireEnv('HERDGATE_WS_URL')}/app/${requireEnv('HERDGATE_APP_KEY')}?protocol=7&client=storm&version=1.0`;

let browser;
before(async () => { browser = await launch(); });
after(async () => { await browser?.close(); });

/** Open the lobby as `id` through its sign-in screen; resolves when signed in to herdgate. */
async function join(id) {
  const p = await person(browser);
  await p.page.goto(lobby);
  await p.page.click(`#login-people button[data-id="${id}"]`);
  open[id] = p.page;
  await p.page.waitForSelector('body[data-signed-in="true"][data-connected="true"]');
  return p;
}

const members = (sel) => () => document.querySelector(sel).textContent;

const open = {}; // name -> page, for screenshots on failure

test('two people in the lobby, a late joiner, and a storm', () => showingFailures(() => open, async () => {
  const ada = await join('ada');
  const a = ada.page;
  // Grace is Ada's contact (the sign-in watchlist): offline until she arrives.
  await a.waitForSelector('#contacts-list li[data-id="grace"][data-online="false"]');
  // Nothing was published to the Q&A cache channel yet: herdgate says so.
  await a.waitForSelector('#qa-source[data-source="miss"]', { state: 'attached' });

  const grace = await join('grace');
  const g = grace.page;
  await a.waitForSelector('#contacts-list li[data-id="grace"][data-online="true"]');
  await g.waitForSelector('#contacts-list li[data-id="ada"][data-online="true"]');

  // Presence: the session chat and the lobby list both people, both ways.
  for (const p of [a, g]) {
    await until(p, 'both in the session chat',
      () => document.getElementById('chat-members').dataset.count === '2', undefined, members('#chat-members'));
    assert.match(await text(p, '#chat-members'), /Ada Lovelace, Grace Hopper/);
    await until(p, 'both in the lobby', () => document.getElementById('lobby-members').dataset.count === '2');
    // The keynote counts its audience; the host (featured) is on stage.
    await until(p, 'two watching the keynote', () => document.getElementById('keynote-count').dataset.count === '2',
      undefined, members('#keynote-count'));
    assert.match(await text(p, '#keynote-speakers'), /On stage: Ada Lovelace/);
  }

  // Chat with a typing indicator (presence client events), both ways.
  await g.type('#chat-input', 'hello Ada');
  await until(a, 'Grace typing', () => /Grace Hopper is typing/.test(document.getElementById('typing').textContent),
    undefined, members('#typing'));
  await g.press('#chat-input', 'Enter');
  await a.waitForSelector('#chat-log li:has-text("hello Ada")');
  assert.match(await text(a, '#chat-log li:last-child .who'), /Grace Hopper/);
  await a.fill('#chat-input', 'hi Grace, see the keynote?');
  await a.press('#chat-input', 'Enter');
  await g.waitForSelector('#chat-log li:has-text("see the keynote?")');

  // Reactions: counted by herdgate ([[apps.tallies]]), one summary a second
  // to everyone, sender included; nobody receives the reactions themselves.
  await g.click('#reactions button[data-emoji="👏"]');
  await g.click('#reactions button[data-emoji="👏"]');
  await a.click('#reactions button[data-emoji="🎉"]');
  for (const p of [a, g]) {
    await until(p, 'three reactions counted', () => document.getElementById('reaction-counts').dataset.total === '3',
      undefined, members('#reaction-counts'));
    assert.match(await text(p, '#reaction-counts'), /👏 2/);
    assert.match(await text(p, '#reaction-counts'), /🎉 1/);
  }

  // A news item triggered by the app server (the official SDK) reaches both.
  await a.fill('#news-input', 'Keynote moves to hall B');
  await a.click('#news-post');
  for (const p of [a, g]) await p.waitForSelector('#news-list li:has-text("Keynote moves to hall B")');

  // Live session settings: a server event on a public channel.
  await a.fill('#stage-input', 'Keynote: herding sockets');
  await a.press('#stage-input', 'Enter');
  await g.waitForSelector('#settings-stage:has-text("herding sockets")');

  // Q&A on the cache channel: Ada asks, Grace votes, Ada picks it.
  await a.fill('#qa-input', 'How does herdgate shed load?');
  await a.click('#qa-ask');
  await g.waitForSelector('#qa-list li:has-text("shed load") .vote');
  await g.click('#qa-list li:has-text("shed load") .vote');
  await a.waitForSelector('#qa-list li[data-votes="1"]:has-text("shed load")');
  await a.click('#qa-list li:has-text("shed load") .make-current');
  await g.waitForSelector('#qa-current:has-text("shed load")');

  // A late joiner sees the current question at once: replayed by the cache
  // channel on subscribe, not fetched from the app server.
  const alan = await join('alan');
  await alan.page.waitForSelector('#qa-current:has-text("How does herdgate shed load?")');
  assert.equal(await alan.page.getAttribute('#qa-source', 'data-source'), 'cache');
  assert.equal(await alan.page.getAttribute('#qa-list li:has-text("shed load")', 'data-votes'), '1');
  assert.deepEqual(alan.errors, []);
  await alan.ctx.close();
  await until(a, 'Alan gone from the lobby', () => document.getElementById('lobby-members').dataset.count === '2');

  // A private invitation (server-to-user) into a group room (presence).
  await a.click('#room-buttons button[data-room="rust"]');
  await until(a, 'Ada in the Rust room', () => document.getElementById('room-members').dataset.count === '1');
  await a.click('#contacts-list li[data-id="grace"] button.invite');
  await g.waitForSelector('#invitations-list li[data-room="rust"]:has-text("Ada Lovelace invites you to Rust")');
  assert.equal(await ada.page.locator('#invitations-list li').count(), 0, 'the invitation went to Grace only');
  await g.click('#invitations-list li[data-room="rust"] button.join');
  for (const p of [a, g]) {
    await until(p, 'both in the Rust room', () => document.getElementById('room-members').dataset.count === '2',
      undefined, members('#room-members'));
  }
  assert.match(await text(a, '#room-members'), /Grace Hopper/);

  // Inbox (server-to-user) and a push-style notification to everyone.
  await a.selectOption('#dm-to', 'grace');
  await a.fill('#dm-input', 'lunch after the keynote?');
  await a.press('#dm-input', 'Enter');
  await g.waitForSelector('#inbox-list li.message:has-text("lunch after the keynote?")');
  await a.click('#notify-all');
  for (const p of [a, g]) await p.waitForSelector('#inbox-list li.notification:has-text("next session starts")');

  // Networking roulette: pairs drawn from the roulette presence room, then a
  // private pair channel with client events.
  await a.click('#roulette-join');
  await g.click('#roulette-join');
  await until(a, 'two in the roulette', () => document.getElementById('roulette-count').textContent.startsWith('2 '));
  await a.click('#roulette-draw');
  await a.waitForSelector('#roulette-partner[data-partner="grace"]');
  await g.waitForSelector('#roulette-partner[data-partner="ada"]');
  await g.waitForSelector('#pair-form:not([hidden])');
  await g.fill('#pair-input', 'hi partner');
  await g.press('#pair-input', 'Enter');
  await a.waitForSelector('#pair-log li:has-text("hi partner")');

  assert.equal(await a.isHidden('#banner'), true, 'no banner while normal');
  await shot(a, 'lobby.png', 'lobby.png');

  // The storm: 50 more sockets make the node degraded. Both pages say so
  // plainly, and chat pauses.
  const s = await storm(browser, { wsUrl, n: 50, channel: 'storm-room' });
  for (const p of [a, g]) {
    await until(p, 'the degraded banner', () => {
      const b = document.getElementById('banner');
      return !b.hidden && b.dataset.level === 'degraded' && b.textContent.startsWith('Limited interaction: chat paused');
    }, undefined, () => document.getElementById('banner').textContent);
    assert.equal(await p.isDisabled('#chat-input'), true, 'chat input paused');
    assert.equal(await p.isDisabled('#chat-send'), true, 'chat button paused');
  }
  // herdgate itself refuses client events now (pusher:error 4301), whatever a page does.
  await a.evaluate(() => window.lobby.pusher.channel('presence-session-main').trigger('client-chat', { text: 'sneaky' }));
  await a.waitForSelector('#chat-log li.failed:has-text("Not delivered")');
  // The feed keeps flowing while degraded; it also marks that "sneaky" never reached Grace.
  await a.fill('#news-input', 'Doors to hall B are open');
  await a.click('#news-post');
  await g.waitForSelector('#news-list li:has-text("Doors to hall B are open")');
  assert.equal(await g.locator('#chat-log li:has-text("sneaky")').count(), 0, 'a refused chat message was delivered');
  await shot(g, 'lobby-degraded.png', 'lobby-degraded.png');

  // The storm passes: the banner goes, chat is back.
  await s.close();
  for (const p of [a, g]) {
    await until(p, 'the banner to go', () => document.getElementById('banner').hidden, undefined,
      () => document.getElementById('banner').textContent);
    assert.equal(await p.isDisabled('#chat-input'), false);
  }
  await g.fill('#chat-input', 'chat is back');
  await g.press('#chat-input', 'Enter');
  await a.waitForSelector('#chat-log li:has-text("chat is back")');

  // The host (Ada) removes Grace from the chat for 10 minutes: herdgate's
  // moderation API, through the app server and the official SDK. Grace's
  // page says so and closes her chat, Ada's member list drops her, and
  // rejoining is refused while the ban lasts; once Ada lets her back in,
  // she rejoins.
  await until(a, 'Grace in the host\'s list',
    () => [...document.querySelectorAll('#mod-user option')].some((o) => o.value === 'grace'));
  assert.equal(await g.isHidden('#mod-form'), true, 'only the host moderates');
  await a.selectOption('#mod-user', 'grace');
  await a.click('#mod-remove');
  await g.waitForSelector('#card-chat[data-removed="removed"]');
  assert.match(await text(g, '#chat-removed-text'), /removed you from the chat for 10 min/);
  assert.equal(await g.isDisabled('#chat-input'), true);
  await until(a, 'Grace removed from the chat', () => document.getElementById('chat-members').dataset.count === '1',
    undefined, members('#chat-members'));
  await g.click('#chat-rejoin');
  await g.waitForSelector('#card-chat[data-removed="banned"]');
  assert.match(await text(g, '#chat-removed-text'), /cannot rejoin the chat yet/);
  await a.click('#mod-unban');
  await a.waitForSelector('#mod-form[data-lifted="grace"]', { state: 'attached' });
  await g.click('#chat-rejoin');
  await g.waitForSelector('#card-chat:not([data-removed])');
  for (const p of [a, g]) {
    await until(p, 'Grace back in the chat', () => document.getElementById('chat-members').dataset.count === '2',
      undefined, members('#chat-members'));
  }
  await g.fill('#chat-input', 'thanks for letting me back');
  await g.press('#chat-input', 'Enter');
  await a.waitForSelector('#chat-log li:has-text("thanks for letting me back")');

  // Grace leaves: her contact goes offline for Ada (watchlist), and presence
  // lists drop her.
  assert.deepEqual(grace.errors, []);
  await grace.ctx.close();
  await a.waitForSelector('#contacts-list li[data-id="grace"][data-online="false"]');
  await until(a, 'Grace gone from the chat', () => document.getElementById('chat-members').dataset.count === '1',
    undefined, members('#chat-members'));
  await until(a, 'one watching the keynote', () => document.getElementById('keynote-count').dataset.count === '1',
    undefined, members('#keynote-count'));
  await until(a, 'Grace gone from the room', () => document.getElementById('room-members').dataset.count === '1');
  assert.deepEqual(ada.errors, []);
}));
