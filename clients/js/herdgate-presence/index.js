// ESM entry of herdgate-presence; the implementation is index.cjs.
import withBigPresence from './index.cjs';
export default withBigPresence;
export { withBigPresence };
