// What the bench-*.mjs scripts share: the server they measure (pid, ports
// and app from the environment their shell script sets), /proc sampling,
// its metrics, and HMAC signing done here with node:crypto (not by
// herdgate's code).

import crypto from 'node:crypto';
import { readFileSync } from 'node:fs';

const env = process.env;
export const pid = Number(env.HERDGATE_PID);
export const host = '127.0.0.1';
export const port = Number(env.HERDGATE_PORT);
export const adminPort = Number(env.HERDGATE_ADMIN_PORT);
export const appId = env.HERDGATE_APP_ID;
export const key = env.HERDGATE_APP_KEY;
export const secret = env.HERDGATE_APP_SECRET;

export const hmac = (s) => crypto.createHmac('sha256', secret).update(s).digest('hex');
export const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);
/** The server's user + system CPU seconds so far. */
export const cpuSecs = () => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, clock ticks
};

export async function metric(name) {
  const text = await (await fetch(`http://${host}:${adminPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ')[1]) : 0;
}
