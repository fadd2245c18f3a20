// ESM entry of herdgate-resume; the implementation is index.cjs.
import withResume from './index.cjs';
export default withResume;
export { withResume };
