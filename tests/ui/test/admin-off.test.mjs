// The live page of a gateway whose admin API is off (`admin.key_sha256`
// empty, as in config/demo.toml run by `spillway serve`): the page still
// loads (it holds no data), and signing in says why nothing can be shown.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { Proc, freePort, httpJson } from '../../js-support/stack.mjs';
import { REPO, launchBrowser, spillwayBinary } from '../lib/demo.mjs';

const TEST = { timeout: 60_000 };

let gateway;
let browser;
let url;
let dir;

describe('the live page with the admin API off', () => {
  before(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'spillway-ui-off-'));
    const port = await freePort();
    url = `http://127.0.0.1:${port}`;
    // No upstream is needed: nothing here is a model request.
    gateway = new Proc('spillway', [spillwayBinary(), 'serve', '--config', path.join(REPO, 'config/demo.toml')], dir, {
      SPILLWAY__SERVER__LISTEN: `127.0.0.1:${port}`,
      RUST_LOG: 'warn',
    });
    await gateway.waitFor('answer on GET /healthz', async () => {
      try {
        return (await httpJson('GET', `${url}/healthz`)).status === 200 ? true : undefined;
      } catch {
        return undefined;
      }
    });
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await gateway?.stop();
    if (dir && !process.env.SPILLWAY_KEEP_TEST_LOGS) rmSync(dir, { recursive: true, force: true });
  });

  it('loads, and signing in says the admin API is disabled', TEST, async () => {
    const page = await browser.newPage();
    const violations = [];
    page.on('console', (msg) => {
      // The refusal itself is logged by Chromium as a failed resource.
      if (msg.type() === 'error' && !msg.text().includes('status of 403')) violations.push(msg.text());
    });
    const res = await page.goto(`${url}/admin`);
    assert.equal(res.status(), 200);
    assert.equal(new URL(page.url()).pathname, '/admin/', 'redirected to the page');
    await page.locator('#key').fill('sk-spw-any-key');
    await page.locator('#signin-button').click();
    const error = page.locator('#signin-error');
    await error.waitFor({ state: 'visible', timeout: 10_000 });
    assert.match(await error.textContent(), /admin API is disabled on this gateway \(403 permission_error: .*admin\.key_sha256/);
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    assert.deepEqual(violations, []);
    await page.close();
  });
});
