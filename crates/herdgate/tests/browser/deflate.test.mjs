// pusher-js in Debian's Chromium against herdgate with compression on:
// Chromium offers permessage-deflate by itself, herdgate accepts it, and a
// 2 KB event reaches pusher-js compressed on the wire and identical after
// the browser inflated it. Run by `ops::browser` (HERDGATE_PUSHER_JS is
// pusher-js's web build from the lobby's lockfile).

import test from 'node:test';
import assert from 'node:assert/strict';
import { launch, person, until, requireEnv, trigger } from './helpers.mjs';

const api = {
  api: requireEnv('HERDGATE_API_URL'),
  appId: requireEnv('HERDGATE_APP_ID'),
  key: requireEnv('HERDGATE_APP_KEY'),
  secret: requireEnv('HERDGATE_APP_SECRET'),
};

/** A metric's value (summed over its label sets) from the admin listener. */
async function metric(name, labels = '') {
  const body = await (await fetch(`${requireEnv('HERDGATE_ADMIN_URL')}/metrics`)).text();
  return body
    .split('\n')
    .filter((l) => l.split(/[{ ]/)[0] === name && l.startsWith(name + labels))
    .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
}

test('pusher-js in Chromium negotiates permessage-deflate and gets a compressed event whole', async () => {
  const browser = await launch();
  try {
    const { page, errors } = await person(browser);
    await page.addScriptTag({ path: requireEnv('HERDGATE_PUSHER_JS') });
    const url = new URL(requireEnv('HERDGATE_WS_URL'));
    const channel = `deflate-${Date.now().toString(36)}`;
    const negotiatedBefore = await metric('herdgate_connections_compressed_total');
    await page.evaluate(({ key, host, port, channel }) => {
      window.got = [];
      window.pusher = new Pusher(key, {
        cluster: 'herdgate',
        wsHost: host,
        wsPort: Number(port),
        forceTLS: false,
        enabledTransports: ['ws'],
      });
      window.pusher.subscribe(channel).bind('score', (d) => window.got.push(d));
    }, { key: api.key, host: url.hostname, port: url.port, channel });
    await until(page, 'the subscription', (c) => window.pusher.channel(c)?.subscribed, channel);
    const extensions = await page.evaluate(() => window.pusher.connection.connection?.transport?.socket?.extensions);
    assert.match(extensions, /^permessage-deflate/, `Chromium's socket negotiated it (${extensions})`);
    assert.match(extensions, /client_no_context_takeover/);
    assert.equal(await metric('herdgate_connections_compressed_total'), negotiatedBefore + 1);

    const players = Array.from({ length: 18 }, (_, i) => ({
      id: `player-${i}`, name: `Player number ${i}`, team: i % 2 ? 'home' : 'away', goals: i % 3, minutes: 44 + i,
    }));
    const data = { match: 'final', minute: 44, score: { home: 2, away: 1 }, players };
    const inBefore = await metric('herdgate_compression_bytes_total', '{stage="in"}');
    const outBefore = await metric('herdgate_compression_bytes_total', '{stage="out"}');
    await trigger(api, channel, 'score', data);
    await until(page, 'the event', () => window.got.length === 1);
    assert.deepEqual(await page.evaluate(() => window.got[0]), data, 'identical after inflate');
    const zin = (await metric('herdgate_compression_bytes_total', '{stage="in"}')) - inBefore;
    const zout = (await metric('herdgate_compression_bytes_total', '{stage="out"}')) - outBefore;
    console.log(`# compressed for Chromium: ${zin} bytes -> ${zout}`);
    assert.ok(zin > 1500 && zout > 0 && zout * 2.5 <= zin, `the event went compressed: ${zin} -> ${zout}`);
    assert.deepEqual(errors, [], 'no page errors');
  } finally {
    await browser.close();
  }
});
