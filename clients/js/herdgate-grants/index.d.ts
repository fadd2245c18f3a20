import type Pusher from 'pusher-js';
/** Enable herdgate auth grants on a pusher-js 8 instance; returns it. */
declare function withGrants<T extends Pusher>(pusher: T): T;
export default withGrants;
export { withGrants };
