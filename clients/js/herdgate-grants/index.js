// ESM entry of herdgate-grants; the implementation is index.cjs.
import withGrants from './index.cjs';
export default withGrants;
export { withGrants };
