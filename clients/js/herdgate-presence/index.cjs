'use strict';
// herdgate-presence: big presence rooms for pusher-js 8 (herdgate).
//
// Above the app's `presence_full_members` a herdgate presence room stops
// sending every join and leave to every member (N members churning cost
// N²/100 frames a second at 1 %/s): pusher-js's `members` then lists the
// featured members (and you), `members.count` starts at the true count, and
// herdgate sends `herdgate:presence_count` {count} on the channel at most
// every `presence_count_interval` when it changed. This plugin applies that
// count to `channel.members.count`; your bindings get the event too
// (`channel.bind('herdgate:presence_count', ({count}) => ...)`).
// docs/PROTOCOL.md "Big presence rooms" has the wire format.

/**
 * Keep `members.count` of big presence rooms current on a pusher-js 8
 * instance. Returns the same instance.
 * @param {import('pusher-js').default} pusher
 */
function withBigPresence(pusher) {
  if (pusher.__herdgatePresence) return pusher;
  Object.defineProperty(pusher, '__herdgatePresence', { value: true });
  // The count is applied before the channel's own handlers run, so a
  // binding on herdgate:presence_count reads the new members.count.
  const patch = (channel) => {
    if (!channel || !channel.members || channel.__herdgatePresence) return channel;
    Object.defineProperty(channel, '__herdgatePresence', { value: true });
    const handle = channel.handleEvent.bind(channel);
    channel.handleEvent = (event) => {
      if (event && event.event === 'herdgate:presence_count') {
        let d = event.data;
        try {
          d = typeof d === 'string' ? JSON.parse(d) : d;
        } catch (e) {
          d = null;
        }
        const count = d && Number(d.count);
        if (Number.isInteger(count) && count >= 0) channel.members.count = count;
      }
      handle(event);
    };
    return channel;
  };
  for (const c of pusher.allChannels()) patch(c);
  const subscribe = pusher.subscribe.bind(pusher);
  pusher.subscribe = (name) => patch(subscribe(name));
  return pusher;
}

module.exports = withBigPresence;
module.exports.default = withBigPresence;
module.exports.withBigPresence = withBigPresence;
