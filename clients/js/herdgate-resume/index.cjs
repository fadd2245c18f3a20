'use strict';
// herdgate-resume: missed-message recovery for pusher-js 8 against herdgate.
//
// herdgate keeps a short history per channel. A subscription that opts in
// (`resume` in its pusher:subscribe) gets a `serial` on each channel event
// and its position (`epoch`, `serial`) on its subscription_succeeded; when
// it subscribes again with that position, the server first replays what it
// missed (as ordinary channel events, so the channel's bindings receive
// them as if live), then sends `herdgate:resumed` {recovered, epoch, serial}
// on the channel: recovered is false when the history could not cover the
// gap, and the app should reload that channel's state.
//
// pusher-js drops unknown top-level keys when it decodes a message, so the
// positions are read from the transport's raw messages; subscriptions are
// extended where pusher-js sends them (`pusher.send_event`). Nothing else of
// pusher-js is touched, and a server without the extension ignores `resume`.

const MARKERS = ['"serial":', 'herdgate:resumed'];

/**
 * Enable resume on a pusher-js 8 instance (call it right after `new Pusher`,
 * before the connection is established). Returns the same instance.
 * @param {import('pusher-js').default} pusher
 */
function withResume(pusher) {
  if (pusher.__herdgateResume) return pusher;
  /** channel name -> {epoch, serial} */
  const positions = new Map();
  /** Channels subscribed again with a position, until their herdgate:resumed. */
  const resuming = new Set();
  Object.defineProperty(pusher, '__herdgateResume', { value: positions });

  const send = pusher.send_event.bind(pusher);
  pusher.send_event = function (name, data, channel) {
    if (name === 'pusher:subscribe' && data && typeof data.channel === 'string') {
      const p = positions.get(data.channel);
      const resume = p ? { serial: p.serial, epoch: p.epoch } : {};
      if (p) resuming.add(data.channel);
      else resuming.delete(data.channel);
      data = Object.assign({}, data, { resume });
    } else if (name === 'pusher:unsubscribe' && data && typeof data.channel === 'string') {
      positions.delete(data.channel);
      resuming.delete(data.channel);
    }
    return send(name, data, channel);
  };

  const onRaw = (message) => {
    const text = message && message.data;
    if (typeof text !== 'string' || !MARKERS.some((m) => text.includes(m))) return;
    let m;
    try {
      m = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (!m || typeof m.channel !== 'string') return;
    if (m.event === 'herdgate:resumed') {
      let d = m.data;
      try {
        d = typeof d === 'string' ? JSON.parse(d) : d;
      } catch (e) {
        return;
      }
      if (d && typeof d.epoch === 'string' && typeof d.serial === 'number') {
        positions.set(m.channel, { epoch: d.epoch, serial: d.serial });
      }
      resuming.delete(m.channel);
    } else if (typeof m.epoch === 'string' && typeof m.serial === 'number') {
      // A subscription answer: where a fresh subscription starts. A resuming
      // one keeps its old position until its herdgate:resumed, advancing
      // with each replayed event, so a connection lost mid-replay resumes
      // from the last event it got.
      if (!resuming.has(m.channel)) positions.set(m.channel, { epoch: m.epoch, serial: m.serial });
    } else if (typeof m.serial === 'number') {
      const p = positions.get(m.channel);
      if (p && m.serial > p.serial) p.serial = m.serial;
    }
  };

  let bound = null;
  const attach = () => {
    const c = pusher.connection && pusher.connection.connection;
    const t = c && c.transport;
    if (t && t !== bound) {
      t.bind('message', onRaw);
      bound = t;
    }
  };
  pusher.connection.bind('connected', attach);
  attach();
  return pusher;
}

module.exports = withResume;
module.exports.default = withResume;
module.exports.withResume = withResume;
