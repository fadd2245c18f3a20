// The status page in cluster mode (one static worker, one edge): the edge's
// page shows the membership view, its link to the worker and the rooms each
// worker owns; the worker's page shows its edge links; when the worker dies
// the edge's page says its link is down.

import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { launch, person, requireEnv, showingFailures, shot, storm, text, until } from './helpers.mjs';

const edgeAdmin = requireEnv('HERDGATE_ADMIN_URL');
const workerAdmin = requireEnv('HERDGATE_WORKER_ADMIN_URL');
const workerPid = Number(requireEnv('HERDGATE_WORKER_PID'));
const wsUrl = `${requireEnv('HERDGATE_WS_URL')}/app/${requireEnv('HERDGATE_APP_KEY')}?protocol=7&client=storm&version=1.0`;

let browser;
before(async () => { browser = await launch(); });
after(async () => { await browser?.close(); });

test('the status page shows the cluster membership and link state', async () => {
  const edge = await person(browser);
  const worker = await person(browser);
  await showingFailures(() => ({ edge: edge.page, worker: worker.page }), async () => {
    const e = edge.page;
    await e.goto(`${edgeAdmin}/`);
    await e.waitForSelector('body[data-loaded="true"]');
    await e.waitForSelector('#card-cluster:not([hidden])');
    assert.match(await text(e, '#node'), /edge/);
    const id = await e.locator('#cluster-workers tbody tr').first().getAttribute('data-worker');
    assert.ok(id, 'the edge lists its worker');
    await until(e, 'the link to the worker up',
      (w) => document.querySelector(`#cluster-workers tr[data-worker="${w}"] .tag.up`) !== null, id,
      () => document.getElementById('cluster-workers').innerText);
    assert.match(await text(e, `#cluster-workers tr[data-worker="${id}"]`), /100\.0 %/, 'the only worker owns the whole ring');

    // Rooms on the edge are owned by the worker: the page counts them per owner.
    const s = await storm(browser, { wsUrl, n: 5, channel: 'cluster-room' });
    await until(e, 'cluster-room among the top rooms, owned by the worker',
      (w) => [...document.querySelectorAll('#rooms-table tbody tr')].some((tr) =>
        tr.cells[0].textContent.startsWith('cluster-room') && tr.cells[0].textContent.includes(w) &&
        tr.cells[2].textContent === '5'), id,
      () => document.getElementById('rooms-table').innerText);

    const w = worker.page;
    await w.goto(`${workerAdmin}/`);
    await w.waitForSelector('#card-cluster:not([hidden])');
    assert.match(await text(w, '#node'), /worker/);
    await until(w, 'the worker to see its edge link up',
      () => /edge links: .* up/.test(document.getElementById('cluster-edges').textContent), undefined,
      () => document.getElementById('cluster-edges').textContent);
    await shot(e, 'status-page-cluster.png', null, { fullPage: true });
    await s.close();

    // The worker dies: the edge's page says the link is down.
    process.kill(workerPid, 'SIGKILL');
    await until(e, 'the link to the worker down',
      (w) => document.querySelector(`#cluster-workers tr[data-worker="${w}"] .tag.down`) !== null, id,
      () => document.getElementById('cluster-workers').innerText);
    await until(w, 'the worker page to say it cannot reach the worker',
      () => document.getElementById('banner').dataset.state === 'stale', undefined,
      () => document.getElementById('banner').textContent);
    assert.match(await text(w, '#banner'), /^Cannot reach \/status\/live/);
    assert.deepEqual(edge.errors, []);
    assert.deepEqual(worker.errors, []);
  });
});
