// pusher-js clients driven line by line from stdin, for herdgate's webhook
// tests (the Rust side orchestrates timing; this side is the real client).
// Each input line is a JSON command; each is answered with one line
// {"seq": n, "ok": true, ...} once done, or {"seq": n, "ok": false, "error": "..."}.
//   {"op":"connect","id":"a","user":"u1"}      connect (user: presence / sign-in identity)
//   {"op":"subscribe","id":"a","channel":"c"}  wait for pusher:subscription_succeeded
//   {"op":"unsubscribe","id":"a","channel":"c"}
//   {"op":"trigger","id":"a","channel":"c","event":"client-x","data":{...}}
//   {"op":"disconnect","id":"a"}               wait until disconnected
//   {"op":"signin","id":"a"}                   pusher-js signin(), wait for the user channel
// Environment: as helpers.mjs (HERDGATE_HOST, HERDGATE_PORT, app id/key/secret).

import readline from 'node:readline';
import { connect, signIn, subscribe } from '../helpers.mjs';

const clients = new Map();
let seq = 0;
const reply = (o) => process.stdout.write(JSON.stringify(o) + '\n');

async function run(cmd) {
  switch (cmd.op) {
    case 'connect': {
      const c = await connect(cmd.id, { user: { id: cmd.user || cmd.id, info: { name: cmd.id } } });
      clients.set(cmd.id, c);
      return { socket_id: c.client.connection.socket_id };
    }
    case 'subscribe':
      await subscribe(clients.get(cmd.id), cmd.channel);
      return {};
    case 'signin':
      await signIn(clients.get(cmd.id));
      return {};
    case 'unsubscribe':
      clients.get(cmd.id).client.unsubscribe(cmd.channel);
      return {};
    case 'trigger': {
      const ok = clients.get(cmd.id).client.channel(cmd.channel).trigger(cmd.event, cmd.data);
      if (!ok) throw new Error('pusher-js refused to trigger');
      return {};
    }
    case 'disconnect': {
      const c = clients.get(cmd.id);
      await new Promise((resolve) => {
        c.client.connection.bind('state_change', (s) => s.current === 'disconnected' && resolve());
        c.client.disconnect();
      });
      clients.delete(cmd.id);
      return {};
    }
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const rl = readline.createInterface({ input: process.stdin });
let chain = Promise.resolve();
rl.on('line', (text) => {
  const n = ++seq;
  chain = chain.then(async () => {
    try {
      reply({ seq: n, ok: true, ...(await run(JSON.parse(text))) });
    } catch (e) {
      reply({ seq: n, ok: false, error: String(e && e.message ? e.message : e) });
    }
  });
});
rl.on('close', () => chain.then(() => process.exit(0)));
