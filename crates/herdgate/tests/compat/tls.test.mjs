// pusher-js over wss:// and the Node SDK over https:// against herdgate's own
// TLS termination. The harness starts a TLS herdgate with a certificate from a
// throwaway test CA and passes the CA via NODE_EXTRA_CA_CERTS, so Node verifies
// the chain for real (no rejectUnauthorized:false anywhere).

import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { connect, subscribe, disconnectAll, jsonOk, makeServer, uniq } from './helpers.mjs';

afterEach(disconnectAll);

const tlsPort = Number(process.env.HERDGATE_TLS_PORT);
const tlsHost = process.env.HERDGATE_TLS_HOST || 'localhost';

test('wss: pusher-js subscribes over TLS and receives an https trigger', async () => {
  assert.ok(tlsPort > 0, 'HERDGATE_TLS_PORT must name the TLS listener');
  assert.ok(process.env.NODE_EXTRA_CA_CERTS, 'NODE_EXTRA_CA_CERTS must point at the test CA');
  const secureServer = makeServer({ host: tlsHost, port: tlsPort, useTLS: true });
  const channelName = uniq('private-tls-');
  const a = await connect('TLS client', {
    clientOptions: {
      wsHost: tlsHost,
      wssPort: tlsPort,
      forceTLS: true,
      enabledTransports: ['ws'],
    },
  });
  assert.equal(a.client.connection.state, 'connected');
  await subscribe(a, channelName, 'secure-event');
  await jsonOk(secureServer.trigger(channelName, 'secure-event', { over: 'tls' }), 'POST /events over https');
  const got = await a.log.waitFor({ channel: channelName, event: 'secure-event' });
  assert.deepEqual(got.data, { over: 'tls' });
});
