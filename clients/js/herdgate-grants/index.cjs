'use strict';
// herdgate-grants: private and presence channels taken again after a
// reconnect without the app's auth endpoint (pusher-js 8, herdgate).
//
// herdgate hands a socket that the app authorized for a channel a short-
// lived grant (`herdgate:grant`), bound to a P-256 key pair this plugin
// makes with WebCrypto, non-extractable: the private key never leaves the
// browser's key store. On a later connection, to any edge, the plugin's
// authorizer presents the grant with a signature over the new socket id
// instead of asking the app; a grant herdgate refuses (expired, revoked,
// the app's secret rotated) is dropped and the app's endpoint asked, as
// pusher-js would have. A live socket renews its grants at about half
// their lifetime. docs/PROTOCOL.md "Auth grants" has the wire format.
//
// Nothing is stored beyond the page's memory. Without WebCrypto (an
// insecure http:// origin other than localhost) the plugin does nothing.

const PREFIX = 'hg-grant.v1:';
// Not private-encrypted-: its authorization carries the channel's shared
// secret, which a grant does not.
const GRANTED = /^(private-(?!encrypted-)|presence-)/;
const SOCKET_ID = /^\d+\.\d+$/;

function b64url(bytes) {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  const b64 = typeof btoa === 'function' ? btoa(s) : Buffer.from(s, 'binary').toString('base64');
  return b64.replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

const monotonic = () =>
  typeof performance !== 'undefined' && performance.now ? performance.now() : Date.now();

/**
 * Enable auth grants on a pusher-js 8 instance (right after `new Pusher`,
 * before subscribing). Returns the same instance. The app must turn grants
 * on (`auth_grants = true`); otherwise herdgate hands none out and nothing
 * changes.
 * @param {import('pusher-js').default} pusher
 */
function withGrants(pusher) {
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (!subtle || pusher.__herdgateGrants) return pusher;
  /** channel -> {grant, channelData, expiresAt (monotonic ms), timer} */
  const grants = new Map();
  Object.defineProperty(pusher, '__herdgateGrants', { value: grants });
  Object.defineProperty(pusher, '__herdgateSigninGrant', { get: () => signinGrant });
  /** channel -> channel_data of its last authorization by the app. */
  const fromApp = new Map();
  /** channels whose current subscription presented a grant. */
  const presenting = new Set();
  let keys = null;
  let publicKey = null;
  const ready = subtle
    .generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign'])
    .then(async (pair) => {
      keys = pair;
      publicKey = b64url(new Uint8Array(await subtle.exportKey('raw', pair.publicKey)));
    })
    .catch(() => {});

  // One signature per socket: it proves holding the key on this socket for
  // every grant presented there (herdgate verifies it once).
  let signed = { socketId: null, sig: null };
  const sign = async (socketId, grant) => {
    if (signed.socketId !== socketId) {
      const message = `herdgate-grant-v1\n${pusher.key}\n${socketId}`;
      const sig = subtle.sign(
        { name: 'ECDSA', hash: 'SHA-256' },
        keys.privateKey,
        new TextEncoder().encode(message),
      );
      signed = { socketId, sig };
    }
    const sig = await signed.sig;
    return PREFIX + grant + ':' + b64url(new Uint8Array(sig));
  };

  const forget = (channel) => {
    const g = grants.get(channel);
    if (g && g.timer) clearTimeout(g.timer);
    grants.delete(channel);
  };

  const original = pusher.config.channelAuthorizer;
  pusher.config.channelAuthorizer = (params, callback) => {
    const channel = params.channelName;
    const viaApp = () => {
      presenting.delete(channel);
      original(params, (err, res) => {
        if (!err && res) fromApp.set(channel, res.channel_data);
        callback(err, res);
      });
    };
    // A grant names the user the socket was signed in as: a socket that is
    // signing in (pusher-js starts that before it subscribes) presents it
    // once signed in.
    const signin = pusher.user && pusher.user.signinDonePromise;
    Promise.all([ready, signin ? Promise.resolve(signin).catch(() => {}) : null]).then(() => {
      const g = grants.get(channel);
      // Only for this instance's own socket (a script calling the
      // authorizer with another socket id gets the app's endpoint).
      const own = params.socketId === pusher.connection.socket_id && SOCKET_ID.test(params.socketId);
      if (!keys || !g || !own || monotonic() > g.expiresAt - 2000) return viaApp();
      sign(params.socketId, g.grant).then((auth) => {
        presenting.add(channel);
        callback(null, { auth, channel_data: g.channelData });
      }, viaApp);
    }, viaApp);
  };

  // Sign-ins: the same, through pusher-js's user authenticator. One grant
  // (the user this page signs in as), presented with the user_data it was
  // made for; refused, the app's endpoint is asked and the sign-in sent
  // again, so pusher-js sees only the sign-in succeed.
  /** {grant, userData, expiresAt, timer} */
  let signinGrant = null;
  /** user_data of the app's last sign-in authorization. */
  let signinFromApp = null;
  let presentingSignin = false;
  const forgetSignin = () => {
    if (signinGrant && signinGrant.timer) clearTimeout(signinGrant.timer);
    signinGrant = null;
  };
  const originalUser = pusher.config.userAuthenticator;
  const userViaApp = (params, callback) => {
    presentingSignin = false;
    originalUser(params, (err, res) => {
      if (!err && res) signinFromApp = res.user_data;
      callback(err, res);
    });
  };
  if (typeof originalUser === 'function') {
    pusher.config.userAuthenticator = (params, callback) => {
      const viaApp = () => userViaApp(params, callback);
      ready.then(() => {
        const g = signinGrant;
        const own = params.socketId === pusher.connection.socket_id && SOCKET_ID.test(params.socketId);
        if (!keys || !g || !own || monotonic() > g.expiresAt - 2000) return viaApp();
        sign(params.socketId, g.grant).then((auth) => {
          presentingSignin = true;
          callback(null, { auth, user_data: g.userData });
        }, viaApp);
      }, viaApp);
    };
  }

  // Offer the key with each private or presence subscription, and hide a
  // refused grant from the app: drop it and subscribe again through the
  // app's endpoint.
  const send = pusher.send_event.bind(pusher);
  pusher.send_event = function (name, data, channel) {
    if (name === 'pusher:subscribe' && data && GRANTED.test(data.channel || '') && publicKey) {
      data = Object.assign({}, data, { grant: { key: publicKey } });
      const c = pusher.channel(data.channel);
      if (c && !c.__herdgateGrants) {
        Object.defineProperty(c, '__herdgateGrants', { value: true });
        const handle = c.handleEvent.bind(c);
        c.handleEvent = (event) => {
          const d = event && event.data;
          if (event.event === 'pusher:subscription_error' && d && d.type === 'GrantRefused') {
            forget(c.name);
            presenting.delete(c.name);
            if (c.subscriptionCancelled) {
              // The app unsubscribed meanwhile: leave it so.
              c.subscriptionPending = false;
              pusher.channels.remove(c.name);
            } else {
              c.subscribe();
            }
            return;
          }
          if (event.event === 'pusher:subscription_error' && d && (d.type === 'Removed' || d.type === 'Banned')) {
            // A moderator took the user out: the grant must not bring them
            // back by itself on the next reconnect (the app's endpoint
            // decides; a ban refuses whatever is presented).
            forget(c.name);
            presenting.delete(c.name);
          }
          handle(event);
        };
      }
    }
    if (name === 'pusher:unsubscribe' && data && typeof data.channel === 'string') {
      forget(data.channel);
    }
    if (name === 'pusher:signin' && data && publicKey) {
      data = Object.assign({}, data, { grant: { key: publicKey } });
    }
    return send(name, data, channel);
  };

  const renewSignin = () => {
    const g = signinGrant;
    const socketId = pusher.connection.socket_id;
    // Only on a socket signed in (never while a presentation is under way:
    // its answer would be taken for the renewal's).
    const signedIn = pusher.user && pusher.user.user_data;
    if (!g || !socketId || pusher.connection.state !== 'connected' || !signedIn || presentingSignin) return;
    sign(socketId, g.grant).then(
      (auth) => send('herdgate:grant', { signin: true, auth, user_data: g.userData }),
      () => {},
    );
  };

  const onSigninGrant = (d) => {
    if (typeof d.refused === 'string') {
      const was = presentingSignin;
      presentingSignin = false;
      if (d.refused === 'busy' && !was && signinGrant) {
        // A renewal the server had no budget for: later.
        const left = Math.max(0, signinGrant.expiresAt - monotonic());
        signinGrant.timer = setTimeout(renewSignin, left * (0.2 + 0.3 * Math.random()));
        if (signinGrant.timer && typeof signinGrant.timer.unref === 'function') signinGrant.timer.unref();
        return;
      }
      forgetSignin();
      if (was && typeof originalUser === 'function') {
        // The grant was not taken: sign in through the app, as pusher-js
        // would have. pusher-js still waits for signin_success: its own
        // handler sends the app's answer, or reports the app's error
        // (pusher:signin_error, and the sign-in is over).
        const socketId = pusher.connection.socket_id;
        const finish = pusher.user && pusher.user._onAuthorize;
        userViaApp({ socketId }, (err, res) => {
          if (typeof finish === 'function') finish(err, res);
          else if (!err && res) pusher.send_event('pusher:signin', { auth: res.auth, user_data: res.user_data });
        });
      }
      return;
    }
    if (typeof d.grant !== 'string') return;
    const userData = presentingSignin && signinGrant ? signinGrant.userData : signinFromApp;
    presentingSignin = false;
    forgetSignin();
    if (typeof userData !== 'string') return;
    const ttlMs = Math.max(0, Number(d.ttl) || 0) * 1000;
    signinGrant = { grant: d.grant, userData, expiresAt: monotonic() + ttlMs, timer: null };
    signinGrant.timer = setTimeout(renewSignin, ttlMs * (0.4 + 0.2 * Math.random()));
    if (signinGrant.timer && typeof signinGrant.timer.unref === 'function') signinGrant.timer.unref();
  };

  const renew = (channel) => {
    const g = grants.get(channel);
    const socketId = pusher.connection.socket_id;
    if (!g || !socketId || pusher.connection.state !== 'connected') return;
    sign(socketId, g.grant).then(
      (auth) => send('herdgate:grant', { channel, auth, channel_data: g.channelData }),
      () => {},
    );
  };

  pusher.connection.bind('message', (m) => {
    // herdgate sends grants on the connection, never on a channel.
    if (!m || m.event !== 'herdgate:grant' || m.channel) return;
    let d = m.data;
    try {
      d = typeof d === 'string' ? JSON.parse(d) : d;
    } catch (e) {
      return;
    }
    if (d && d.signin === true) return onSigninGrant(d);
    if (!d || typeof d.channel !== 'string') return;
    if (d.refused === 'busy') {
      // The server is saving its checks: keep the grant, try again later.
      const g = grants.get(d.channel);
      if (g) {
        const left = Math.max(0, g.expiresAt - monotonic());
        g.timer = setTimeout(() => renew(d.channel), left * (0.2 + 0.3 * Math.random()));
        if (g.timer && typeof g.timer.unref === 'function') g.timer.unref();
      }
      return;
    }
    if (typeof d.refused === 'string' || typeof d.grant !== 'string') {
      forget(d.channel);
      return;
    }
    const held = grants.get(d.channel);
    const channelData = presenting.has(d.channel) && held ? held.channelData : fromApp.get(d.channel);
    forget(d.channel);
    const ttlMs = Math.max(0, Number(d.ttl) || 0) * 1000;
    const g = { grant: d.grant, channelData, expiresAt: monotonic() + ttlMs, timer: null };
    // Renew at 40-60 % of the lifetime: a fleet's renewals spread out.
    g.timer = setTimeout(() => renew(d.channel), ttlMs * (0.4 + 0.2 * Math.random()));
    if (g.timer && typeof g.timer.unref === 'function') g.timer.unref();
    grants.set(d.channel, g);
  });
  return pusher;
}

module.exports = withGrants;
module.exports.default = withGrants;
module.exports.withGrants = withGrants;
