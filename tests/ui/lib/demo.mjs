// The real `spillway demo --load` (gateway, in-process simulator and
// synthetic traffic from three tenants, plus a batch) for the browser test,
// and the headless Chromium that looks at its live page.
//
// The demo is started as a newcomer starts it, on a free port, with no
// admin key given: the page's URL and the key it signs in with are read
// from what the demo prints. Binary: $SPILLWAY_BIN (default
// target/debug/spillway); the demo needs no simulator binary of its own.
// Browser: $CHROMIUM_PATH (default /usr/bin/chromium, Debian's package).

import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { chromium } from 'playwright-core';

import { Proc, binary } from '../../js-support/stack.mjs';

export { REPO, httpJson } from '../../js-support/stack.mjs';

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

/** Headless, no sandbox (CI runs as root), and nothing that calls out. */
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export function spillwayBinary() {
  return binary('SPILLWAY_BIN', 'target/debug/spillway');
}

export function chromiumPath() {
  let ok = false;
  try {
    ok = statSync(CHROMIUM).isFile();
  } catch {
    ok = false;
  }
  if (!ok) {
    throw new Error(
      `${CHROMIUM} not found: install Debian's chromium (apt-get install -y --no-install-recommends chromium) ` +
        'or point CHROMIUM_PATH at a Chromium binary',
    );
  }
  return CHROMIUM;
}

export function launchBrowser() {
  return chromium.launch({ executablePath: chromiumPath(), args: CHROMIUM_ARGS, headless: true });
}

const PAGE_LINE = 'Watch the budgets live in a browser: ';
const KEY_LINE = "sign in there with this run's admin key: ";

/**
 * Starts `spillway demo --load`; resolves to `{ url, pageUrl, adminKey,
 * batchId, demo, stop }` once the demo printed its page and the load
 * submitted its batch.
 */
export async function startDemo({ loadSecs = 90, batchItems = 40 } = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), 'spillway-ui-'));
  const demo = new Proc(
    'spillway-demo',
    [
      spillwayBinary(),
      'demo',
      '--listen',
      '127.0.0.1:0',
      '--load',
      '--load-secs',
      String(loadSecs),
      '--load-batch-items',
      String(batchItems),
    ],
    dir,
    // Not the caller's key: the demo makes one and prints it.
    { SPILLWAY_ADMIN_KEY: '', RUST_LOG: 'warn' },
  );
  const stop = async () => {
    await demo.stop();
    if (!process.env.SPILLWAY_KEEP_TEST_LOGS) rmSync(dir, { recursive: true, force: true });
  };
  try {
    const printed = (prefix) => {
      const line = demo
        .stdout()
        .split('\n')
        .find((l) => l.trim().startsWith(prefix));
      return line ? line.trim().slice(prefix.length).trim() : undefined;
    };
    const pageUrl = await demo.waitFor('the live page line', () => printed(PAGE_LINE));
    const adminKey = await demo.waitFor('the admin key line', () => printed(KEY_LINE));
    const batchId = await demo.waitFor('the load line', () => {
      const m = demo.stdout().match(/batch (msgbatch_\S+) \(/);
      return m ? m[1] : undefined;
    });
    const url = new URL(pageUrl).origin;
    return { url, pageUrl, adminKey, batchId, dir, demo, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** GET `path` of the admin API with the key; the parsed JSON. */
export async function adminGet(demo, p) {
  const res = await fetch(`${demo.url}${p}`, {
    headers: { authorization: `Bearer ${demo.adminKey}` },
    signal: AbortSignal.timeout(10_000),
  });
  if (res.status !== 200) throw new Error(`GET ${p}: ${res.status} ${await res.text()}`);
  return res.json();
}
