import type Pusher from 'pusher-js';
/** Enable herdgate's missed-message recovery on a pusher-js 8 instance; returns it. */
export default function withResume<T extends Pusher>(pusher: T): T;
export { withResume };
