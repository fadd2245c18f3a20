import type Pusher from 'pusher-js';
/** Keep `members.count` of herdgate's big presence rooms current; returns the instance. */
declare function withBigPresence<T extends Pusher>(pusher: T): T;
export default withBigPresence;
export { withBigPresence };
