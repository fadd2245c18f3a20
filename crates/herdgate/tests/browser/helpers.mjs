// Shared helpers of the browser tests: Debian's Chromium driven by
// playwright-core (which downloads no browser), a socket storm opened from a
// browser page, and screenshots saved as test artefacts.
//
// No helper sleeps: every wait is for something on the page (a selector or a
// predicate) with a deadline, and fails naming what it waited for.

import { createHash, createHmac } from 'node:crypto';
import { mkdirSync, copyFileSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

export function requireEnv(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run these tests through \`cargo test -p herdgate --test ops browser::\``);
  return v;
}

/** The deadline of any one wait. */
export const WAIT_MS = Number(process.env.HERDGATE_BROWSER_WAIT_MS || 15000);

/** Chromium from Debian (HERDGATE_CHROMIUM), never a downloaded build. */
export async function launch() {
  return chromium.launch({
    executablePath: requireEnv('HERDGATE_CHROMIUM'),
    headless: true,
    // Containers often have a small /dev/shm.
    args: ['--disable-dev-shm-usage', '--no-first-run', '--disable-gpu'],
  });
}

/** A new browser context ("one person") with a fixed, screenshot-sized viewport. */
export async function person(browser) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1 });
  ctx.setDefaultTimeout(WAIT_MS);
  const page = await ctx.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  return { ctx, page, errors };
}

/** Wait until `fn(arg)` is truthy in the page; on timeout say what was awaited and what was there. */
export async function until(page, what, fn, arg, probe) {
  try {
    return await page.waitForFunction(fn, arg, { timeout: WAIT_MS, polling: 100 });
  } catch (e) {
    const seen = probe ? await page.evaluate(probe).catch((x) => `(probe failed: ${x.message})`) : '';
    throw new Error(`timed out after ${WAIT_MS} ms waiting for ${what}${seen ? `; saw: ${JSON.stringify(seen)}` : ''}`);
  }
}

/** Text of an element, trimmed. */
export const text = (page, selector) => page.locator(selector).first().innerText().then((t) => t.trim());

/**
 * A storm: `n` websockets opened from a browser page to herdgate, each
 * subscribed to `channel`. Resolves once every socket has its subscription;
 * `close()` closes them all and resolves when the browser saw them closed.
 */
export async function storm(browser, { wsUrl, n, channel }) {
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await page.evaluate(async ({ wsUrl, n, channel, ms }) => {
    window.storm = [];
    const one = () => new Promise((resolve, reject) => {
      const ws = new WebSocket(wsUrl);
      window.storm.push(ws);
      const t = setTimeout(() => reject(new Error('socket not subscribed in time')), ms);
      ws.onmessage = (m) => {
        const e = JSON.parse(m.data);
        if (e.event === 'pusher:connection_established') {
          ws.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel } }));
        } else if (e.event === 'pusher_internal:subscription_succeeded') {
          clearTimeout(t);
          resolve();
        } else if (e.event === 'pusher:ping') {
          ws.send(JSON.stringify({ event: 'pusher:pong', data: {} }));
        }
      };
      ws.onerror = () => reject(new Error('storm socket failed'));
    });
    await Promise.all(Array.from({ length: n }, one));
  }, { wsUrl, n, channel, ms: WAIT_MS });
  return {
    async close() {
      await page.evaluate(() => Promise.all(window.storm.map((ws) => new Promise((resolve) => {
        if (ws.readyState === WebSocket.CLOSED) return resolve();
        ws.onclose = () => resolve();
        ws.close(1000);
      }))));
      await ctx.close();
    },
  };
}

/**
 * Publish one event through herdgate's HTTP API (`POST /apps/{id}/events`,
 * signed as every Pusher SDK signs it). `api` is http://host:port.
 */
export async function trigger({ api, appId, key, secret }, channel, name, data) {
  const body = JSON.stringify({ name, channels: [channel], data: JSON.stringify(data) });
  const path = `/apps/${appId}/events`;
  const query = {
    auth_key: key,
    auth_timestamp: String(Math.floor(Date.now() / 1000)),
    auth_version: '1.0',
    body_md5: createHash('md5').update(body).digest('hex'),
  };
  const qs = Object.keys(query).sort().map((k) => `${k}=${query[k]}`).join('&');
  const sig = createHmac('sha256', secret).update(`POST\n${path}\n${qs}`).digest('hex');
  const r = await fetch(`${api}${path}?${qs}&auth_signature=${sig}`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body,
  });
  if (!r.ok) throw new Error(`trigger ${name} on ${channel}: HTTP ${r.status} ${await r.text()}`);
}

/**
 * Save a screenshot as a test artefact (HERDGATE_ARTIFACTS); with
 * HERDGATE_DOCS set (HERDGATE_UPDATE_SCREENSHOTS=1 on the cargo test), also
 * as `docs/<docsName>` for the README.
 */
export async function shot(page, name, docsName, { fullPage = false } = {}) {
  const dir = requireEnv('HERDGATE_ARTIFACTS');
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, name);
  // The top of the page, as a person arriving sees it.
  await page.evaluate(() => { document.activeElement?.blur(); window.scrollTo(0, 0); });
  await page.screenshot({ path: file, animations: 'disabled', caret: 'hide', fullPage });
  const docs = process.env.HERDGATE_DOCS;
  if (docs && docsName) copyFileSync(file, path.join(docs, docsName));
  return file;
}

/**
 * Run `body`; if it throws, save a screenshot of every page in `pages()`
 * (`failed-<name>.png`) before rethrowing, so a failure can be seen.
 */
export async function showingFailures(pages, body) {
  try {
    return await body();
  } catch (e) {
    for (const [name, page] of Object.entries(pages())) {
      if (page && !page.isClosed()) await shot(page, `failed-${name}.png`).catch(() => {});
    }
    throw e;
  }
}
