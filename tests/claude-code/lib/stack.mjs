// The stack (simulator and gateway, tests/js-support/stack.mjs) for the
// Claude Code test: client auth on with one tenant, nothing about quotas
// (the demo's, or the extra config layers', limits are the ones in force),
// and the gateway logging at info level.

import * as support from '../../js-support/stack.mjs';

export { REPO, httpJson as http } from '../../js-support/stack.mjs';
export const TENANT = 'claude-code';
export const CLIENT_KEY = 'sk-spw-claude-code-0123456789abcdefghijklmnopqrs';
export const UPSTREAM_TOKEN = 'sim-upstream-token-claude-code';

/**
 * Starts a simulator and a gateway of their own. `configs`: repo-relative
 * config files layered between config/demo.toml and the test overlay.
 * Call `stop()` when done.
 */
export async function startStack({ configs = [] } = {}) {
  const stack = await support.startStack({
    clientKey: CLIENT_KEY,
    tenant: TENANT,
    upstreamToken: UPSTREAM_TOKEN,
    tmpPrefix: 'spillway-claude-code-',
    overlayName: 'claude-code-tests.toml',
    configs,
    // Info level: the gateway's log names every request it served.
    gatewayEnv: { RUST_LOG: 'info' },
  });
  /** `spillway_requests_total` of the test tenant, by outcome, from /metrics. */
  const tenantRequests = async () => {
    const { body } = await support.httpJson('GET', `${stack.url}/metrics`);
    const counts = {};
    for (const line of String(body).split('\n')) {
      const m = line.match(/^spillway_requests_total\{([^}]*)\} (\d+)/);
      if (!m || !m[1].includes(`tenant="${TENANT}"`)) continue;
      const outcome = (m[1].match(/outcome="([^"]*)"/) || [])[1];
      counts[outcome] = (counts[outcome] || 0) + Number(m[2]);
    }
    return counts;
  };
  return { ...stack, tenantRequests };
}
