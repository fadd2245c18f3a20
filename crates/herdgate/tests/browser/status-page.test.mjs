// The admin listener's status page in Chromium: it renders offline (nothing
// loaded from anywhere else), its figures follow a storm of 50 sockets up and
// down, and it says plainly when the node is degraded and what it sheds.
//
// herdgate runs with max_connections = 100 and connection thresholds
// [0.3, 0.45, 0.95], so the 50 sockets make it degraded (browser.rs).

import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { launch, person, requireEnv, showingFailures, shot, storm, text, trigger, until } from './helpers.mjs';

const admin = requireEnv('HERDGATE_ADMIN_URL'); // http://127.0.0.1:port
const wsUrl = `${requireEnv('HERDGATE_WS_URL')}/app/${requireEnv('HERDGATE_APP_KEY')}?protocol=7&client=storm&version=1.0`;
const STORM = 50;
const app = {
  api: requireEnv('HERDGATE_API_URL'),
  appId: requireEnv('HERDGATE_APP_ID'),
  key: requireEnv('HERDGATE_APP_KEY'),
  secret: requireEnv('HERDGATE_APP_SECRET'),
};

/** Publish to `channel` ten times a second (at most 600 times) until stopped. */
function publisher(channel) {
  let sent = 0;
  let failed = null;
  const timer = setInterval(() => {
    if (sent >= 600) return clearInterval(timer);
    sent += 1;
    trigger(app, channel, 'tick', { n: sent }).catch((e) => { failed = e; });
  }, 100);
  return { stop() { clearInterval(timer); if (failed) throw failed; return sent; } };
}

let browser;
before(async () => { browser = await launch(); });
after(async () => { await browser?.close(); });

const live = async () => {
  const r = await fetch(`${admin}/status/live`);
  assert.equal(r.status, 200);
  return r.json();
};

test('the status page follows a storm of 50 sockets and says plainly what is shed', async () => {
  const { page, errors } = await person(browser);
  await showingFailures(() => ({ status: page }), () => scenario(page, errors));
});

async function scenario(page, errors) {
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));

  const res = await page.goto(`${admin}/`);
  assert.equal(res.status(), 200);
  const csp = res.headers()['content-security-policy'] || '';
  assert.match(csp, /default-src 'none'/, 'the page may load nothing from elsewhere');

  // Calm: rendered from /status/live, normal, no sockets.
  await page.waitForSelector('body[data-loaded="true"]');
  assert.equal(await page.getAttribute('#state-pill', 'data-state'), 'normal');
  assert.equal(await text(page, '#connections-open'), '0');
  assert.equal(await text(page, '#connections-max'), '100');
  assert.match(await text(page, '#banner'), /^Normal: everything is served\./);
  assert.equal(await page.locator('#signals .sig[data-signal="connections"]').getAttribute('data-level'), 'normal');
  assert.equal(await page.locator('#actions-table tr[data-active="true"]').count(), 0, 'nothing shed when calm');
  const calm = await live();
  assert.equal(calm.state, 'normal');
  assert.equal(calm.degraded, false);
  assert.equal(calm.connections, 0);

  // The storm: the page's count climbs to 50 and the node turns degraded.
  const s = await storm(browser, { wsUrl, n: STORM, channel: 'storm-room' });
  await until(page, `the open count to reach ${STORM}`,
    (n) => document.getElementById('connections-open').textContent === String(n), STORM,
    () => document.getElementById('connections-open').textContent);
  await until(page, 'the state pill to say degraded',
    () => document.getElementById('state-pill').dataset.state === 'degraded', undefined,
    () => document.getElementById('state-pill').dataset.state);
  const banner = await text(page, '#banner');
  assert.match(banner, /^DEGRADED: shedding /, banner);
  assert.match(banner, /client events \(chat, typing\) refused/, banner);
  assert.match(banner, /Because: .*connections/, banner);
  assert.equal(await page.getAttribute('#banner', 'data-state'), 'degraded');
  assert.equal(await page.locator('#signals .sig[data-signal="connections"]').getAttribute('data-level'), 'degraded');
  for (const action of ['drop_client_events', 'stop_presence_events', 'shed_webhook_events']) {
    assert.equal(await page.getAttribute(`#actions-table tr[data-action="${action}"]`, 'data-active'), 'true', action);
  }
  assert.equal(await page.getAttribute('#actions-table tr[data-action="refuse_connections"]', 'data-active'), 'false',
    'degraded keeps the door open');
  await until(page, `${STORM} admitted`,
    (n) => Number(document.getElementById('admitted-total').textContent.replace(/,/g, '')) >= n, STORM);
  // Top rooms are listed every few seconds: the storm's room shows up with its subscribers.
  await until(page, 'storm-room among the top rooms with 50 subscribers',
    (n) => [...document.querySelectorAll('#rooms-table tbody tr')].some((tr) =>
      tr.cells[0].textContent.startsWith('storm-room') && tr.cells[2].textContent === String(n)), STORM,
    () => document.getElementById('rooms-table').innerText);
  await until(page, 'a history to draw', () => document.querySelectorAll('#spark-connections polyline').length > 0);
  // Deliveries while degraded: API events to the room reach its 50 sockets.
  const ticks = publisher('storm-room');
  await until(page, 'deliveries per second to show',
    () => Number(document.getElementById('delivered-rate').textContent.replace(/,/g, '')) > 0, undefined,
    () => document.getElementById('delivered-rate').textContent);
  await until(page, 'recent delivery-delay percentiles',
    () => /ms$/.test(document.getElementById('delay-p99').textContent));
  const stormy = await live();
  assert.equal(stormy.degraded, true);
  assert.equal(stormy.connections, STORM);
  assert.ok(stormy.admitted_refused.admitted_total >= STORM);
  assert.ok(stormy.deliveries.delivered_total > 0, 'deliveries counted');
  await shot(page, 'status-page-storm.png', 'status-page.png');
  const sent = ticks.stop();
  assert.ok(sent > 0);

  // The storm passes: the count falls back and the node steps down to normal.
  await s.close();
  await until(page, 'the open count to fall to 0',
    () => document.getElementById('connections-open').textContent === '0', undefined,
    () => document.getElementById('connections-open').textContent);
  await until(page, 'the state pill to say normal again',
    () => document.getElementById('state-pill').dataset.state === 'normal', undefined,
    () => document.getElementById('banner').textContent);
  assert.match(await text(page, '#banner'), /^Normal: everything is served\./);
  await until(page, 'the shedding table to clear',
    () => document.querySelectorAll('#actions-table tr[data-active="true"]').length === 0);
  await shot(page, 'status-page-after.png');

  // Offline: every request the page made went to the admin listener itself.
  const foreign = requests.filter((u) => !u.startsWith(`${admin}/`));
  assert.deepEqual(foreign, [], 'requests outside the admin listener');
  assert.deepEqual(errors, [], 'script errors on the page');
}
