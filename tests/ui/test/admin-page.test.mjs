// The live page in a real browser: headless Chromium (Debian's) in front of
// the real `spillway demo --load`, as a newcomer would watch it.
//
// - A wrong key shows the error and keeps nothing.
// - The right key signs in through the form; the feed updates the page
//   every second; the bars' numbers (data attributes on the DOM, and the
//   text beside them) are /admin/quotas's, fetched at the same moment (the
//   DOM is read as a frame lands and the API right after; a request
//   admitted or settled in between is retried on the next frame).
// - The key is in the tab's sessionStorage only: not in localStorage, a
//   cookie or a URL; it goes out as an Authorization header to this
//   origin only; a new tab must sign in again; signing out clears it.
// - When the gateway shuts down the page says so (the feed's `event:
//   closing`) and keeps trying, still signed in.
// - No Content-Security-Policy violation, console error or page error.
// - A screenshot, target/ui/admin-page.png (CI keeps it).

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import { REPO, adminGet, launchBrowser, startDemo } from '../lib/demo.mjs';

const SCREENSHOT = path.join(REPO, 'target', 'ui', 'admin-page.png');
const SIGNIN_SCREENSHOT = path.join(REPO, 'target', 'ui', 'admin-signin.png');
const TEST = { timeout: 120_000 };

let demo;
let browser;
/** Everything a page said that it should not have, from every page. */
const problems = [];

/**
 * A page that reports CSP violations, console errors and uncaught errors;
 * `expected`: console errors this page is meant to cause (Chromium logs
 * each refused or failed fetch as one), by a part of their text.
 */
async function openPage(context, { expected = [] } = {}) {
  const page = await context.newPage();
  // Registered before any page script runs (CDP, outside the page's CSP).
  await page.addInitScript(() => {
    window.__violations = [];
    // Every text the live indicator showed, in order.
    window.__live = [];
    new MutationObserver(() => {
      const t = document.getElementById('live-text')?.textContent;
      if (t && window.__live[window.__live.length - 1] !== t) window.__live.push(t);
    }).observe(document, { subtree: true, childList: true, characterData: true });
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__violations.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'} (${e.sourceFile}:${e.lineNumber})`);
    });
  });
  page.on('console', (msg) => {
    const meant = expected.some((part) => msg.text().includes(part));
    if (meant && !/Content.Security.Policy/i.test(msg.text())) return;
    if (msg.type() === 'error' || /Content.Security.Policy/i.test(msg.text())) problems.push(`console: ${msg.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('request', (req) => {
    const url = new URL(req.url());
    if (url.origin !== demo.url) problems.push(`request to another origin: ${req.url()}`);
    if (req.url().includes(demo.adminKey)) problems.push(`the key in a URL: ${req.url()}`);
  });
  return page;
}

async function violations(page) {
  return page.evaluate(() => window.__violations);
}

async function signIn(page, key) {
  await page.goto(demo.pageUrl);
  await page.locator('#key').fill(key);
  await page.locator('#signin-button').click();
}

/** The number of frames the page has drawn. */
const framesDrawn = (page) => page.evaluate(() => Number(document.getElementById('dashboard').dataset.frames || 0));

/** Waits until the page has drawn a frame after the `n`th. */
async function nextFrame(page, n) {
  await page.waitForFunction((n) => Number(document.getElementById('dashboard').dataset.frames || 0) > n, n, {
    timeout: 10_000,
    polling: 10,
  });
}

/** What the page shows: every budget card and its bars, from the DOM. */
function readDom(page) {
  return page.evaluate(() => {
    const num = (v) => (v === undefined || v === '' ? null : Number(v));
    return {
      frames: Number(document.getElementById('dashboard').dataset.frames),
      budgets: Array.from(document.querySelectorAll('#budgets .card')).map((card) => ({
        model: card.dataset.model,
        region: card.dataset.region,
        cooling: num(card.dataset.cooldownMs) > 0,
        drained: card.dataset.drained === 'true',
        queuedInteractive: num(card.dataset.queuedInteractive),
        queuedBatch: num(card.dataset.queuedBatch),
        dims: Array.from(card.querySelectorAll('.dim')).map((d) => ({
          name: d.dataset.dim,
          limit: num(d.dataset.limit),
          used: num(d.dataset.used),
          reserved: num(d.dataset.reserved),
          free: num(d.dataset.free),
          configured: num(d.dataset.configured),
          text: d.querySelector('.numbers').textContent,
          widths: Array.from(d.querySelectorAll('.seg')).map((s) => parseFloat(s.style.width)),
        })),
      })),
      tenants: Array.from(document.querySelectorAll('#pools tr[data-tenant]')).map((r) => ({
        model: r.closest('.pool').dataset.model,
        tenant: r.dataset.tenant,
        held: num(r.dataset.held),
      })),
      batches: Array.from(document.querySelectorAll('#batches .batch')).map((b) => ({
        id: b.dataset.batchId,
        total: num(b.dataset.total),
        processing: num(b.dataset.processing),
      })),
      queues: Array.from(document.querySelectorAll('#queues tbody tr')).map((r) => ({
        model: r.dataset.model,
        interactive: num(r.dataset.interactive),
        batch: num(r.dataset.batch),
      })),
    };
  });
}

const fmt = (n) => Number(n).toLocaleString('en-US');

/** The bars one budget of /admin/quotas should show, by name. */
function expectedDims(q) {
  const dims = [
    ['requests', q.effective.requests_per_min, q.used.requests, q.in_flight.requests, q.configured.requests_per_min],
  ];
  const tokens = (u) => u.input_tokens + u.output_tokens;
  if (q.configured.tokens_per_min !== null)
    dims.push(['tokens', q.effective.tokens_per_min, tokens(q.used), tokens(q.in_flight), q.configured.tokens_per_min]);
  for (const side of ['input', 'output']) {
    const c = q.configured[`${side}_tokens_per_min`];
    if (c !== null)
      dims.push([
        `${side}_tokens`,
        q.effective[`${side}_tokens_per_min`],
        q.used[`${side}_tokens`],
        q.in_flight[`${side}_tokens`],
        c,
      ]);
  }
  return dims.map(([name, limit, total, reserved, configured]) => ({
    name,
    limit,
    used: total - reserved,
    reserved,
    free: Math.max(0, limit - total),
    configured,
  }));
}

/** Where the DOM and /admin/quotas disagree (empty: they agree). */
function differences(dom, quotas) {
  const out = [];
  const key = (b) => `${b.model} ${b.region}`;
  const shown = new Map(dom.budgets.map((b) => [key(b), b]));
  if (shown.size !== quotas.length) out.push(`${shown.size} cards for ${quotas.length} budgets`);
  for (const q of quotas) {
    const card = shown.get(key(q));
    if (!card) {
      out.push(`no card for ${key(q)}`);
      continue;
    }
    if (card.queuedInteractive !== q.queued_interactive || card.queuedBatch !== q.queued_batch)
      out.push(`${key(q)} queued ${card.queuedInteractive}+${card.queuedBatch}, API ${q.queued_interactive}+${q.queued_batch}`);
    if (card.cooling !== q.cooldown_ms > 0) out.push(`${key(q)} cooling ${card.cooling}, API ${q.cooldown_ms} ms`);
    if (card.drained !== q.drained) out.push(`${key(q)} drained ${card.drained}`);
    const want = expectedDims(q);
    const names = card.dims.map((d) => d.name).join(',');
    if (names !== want.map((d) => d.name).join(',')) out.push(`${key(q)} bars ${names}`);
    for (const w of want) {
      const d = card.dims.find((x) => x.name === w.name);
      if (!d) continue;
      for (const f of ['limit', 'used', 'reserved', 'free', 'configured'])
        if (d[f] !== w[f]) out.push(`${key(q)} ${w.name}.${f}: page ${d[f]}, API ${w[f]}`);
    }
  }
  return out;
}

/** The text beside a bar and its widths agree with its data attributes. */
function assertBarConsistent(card, d) {
  const of = d.limit < d.configured ? `${fmt(d.limit)} (of ${fmt(d.configured)})` : fmt(d.limit);
  assert.equal(d.text, `${fmt(d.used)} used · ${fmt(d.reserved)} reserved · ${fmt(d.free)} free / ${of}`);
  const scale = Math.max(d.configured, d.limit, d.used + d.reserved, 1);
  const [used, reserved, free, withheld] = d.widths;
  const close = (a, b, what) => assert.ok(Math.abs(a - b) < 0.01, `${card.model} ${card.region} ${d.name} ${what}: ${a} vs ${b}`);
  close(used, (d.used / scale) * 100, 'used width');
  close(reserved, (d.reserved / scale) * 100, 'reserved width');
  close(free, (d.free / scale) * 100, 'free width');
  close(used + reserved + free + withheld, 100, 'the whole bar');
}

describe('the live page', () => {
  before(async () => {
    demo = await startDemo();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await demo?.stop();
  });

  it('is served with its policy, and a wrong key shows the error and keeps nothing', TEST, async () => {
    const context = await browser.newContext();
    const page = await openPage(context, { expected: ['the server responded with a status of 401'] });
    const res = await page.goto(demo.pageUrl);
    assert.equal(res.status(), 200);
    assert.match(res.headers()['content-security-policy'], /default-src 'none'; script-src 'self'/);
    await signIn(page, 'sk-spw-not-this-runs-key');
    const error = page.locator('#signin-error');
    await error.waitFor({ state: 'visible', timeout: 10_000 });
    assert.match(await error.textContent(), /not accepted \(401 authentication_error: invalid admin key\)/);
    mkdirSync(path.dirname(SIGNIN_SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SIGNIN_SCREENSHOT });
    assert.equal(await page.locator('#dashboard').isHidden(), true);
    assert.equal(await page.evaluate(() => sessionStorage.length + localStorage.length), 0);
    // Empty: says so, and asks nothing of the gateway.
    await page.locator('#key').fill('');
    await page.locator('#signin-button').click();
    assert.equal(await error.textContent(), 'Enter the admin key.');
    assert.deepEqual(await violations(page), []);
    await context.close();
  });

  it('signs in, updates live, and shows what the admin API says', TEST, async () => {
    const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
    const page = await openPage(context);
    const keyed = [];
    page.on('request', (req) => {
      if (/\/admin\/(overview|events)$/.test(req.url())) keyed.push(req.headers().authorization);
    });
    await signIn(page, demo.adminKey);
    await page.locator('#dashboard').waitFor({ state: 'visible', timeout: 10_000 });
    assert.equal(new URL(page.url()).search, '', 'nothing in the URL');

    // Live: frames keep coming from the feed, about one a second.
    const first = await framesDrawn(page);
    const started = Date.now();
    await nextFrame(page, first + 2);
    assert.ok(Date.now() - started < 6_000, 'three frames within 6 s');
    assert.match(await page.locator('#live-text').textContent(), /^Live · updated/);

    // Wait for the load to show (Haiku's regions filling), then compare.
    await page.waitForFunction(
      () =>
        Array.from(document.querySelectorAll('#budgets .dim[data-dim="requests"]')).reduce(
          (n, d) => n + Number(d.dataset.used) + Number(d.dataset.reserved),
          0,
        ) >= 20,
      null,
      { timeout: 60_000, polling: 250 },
    );
    let matched = null;
    const misses = [];
    for (let attempt = 0; attempt < 30 && !matched; attempt += 1) {
      await nextFrame(page, await framesDrawn(page));
      const dom = await readDom(page);
      const quotas = await adminGet(demo, '/admin/quotas');
      const diff = differences(dom, quotas);
      if (diff.length === 0) matched = { dom, quotas };
      else misses.push(diff.join('; '));
    }
    assert.ok(matched, `the page never showed what /admin/quotas said at the same moment:\n${misses.join('\n')}`);
    console.log(`the page matched /admin/quotas on frame ${matched.dom.frames}, after ${misses.length} frame(s) of skew`);
    for (const card of matched.dom.budgets) for (const d of card.dims) assertBarConsistent(card, d);
    assert.ok(matched.dom.budgets.some((b) => b.model === 'claude-3-haiku@20240307' && b.region === 'europe-west4'));

    // Every model's queue; the tenants of the pools; the load's batch.
    const dom = matched.dom;
    const overview = await adminGet(demo, '/admin/overview');
    assert.deepEqual(
      dom.queues.map((q) => q.model),
      overview.queues.map((q) => q.model),
    );
    const shares = await adminGet(demo, '/admin/shares');
    for (const pool of shares) {
      for (const t of pool.tenants) {
        const shown = dom.tenants.find((x) => x.model === pool.model && x.tenant === t.tenant);
        assert.ok(shown, `${t.tenant} in ${pool.model}'s pool`);
        assert.ok(Math.abs(shown.held - t.held) < 0.1, `${t.tenant} holds ${shown.held} on the page, ${t.held} in the API`);
      }
    }
    assert.ok(
      ['chat', 'search'].every((t) => dom.tenants.some((x) => x.tenant === t)),
      `the load's tenants: ${JSON.stringify(dom.tenants)}`,
    );
    const batch = dom.batches.find((b) => b.id === demo.batchId);
    assert.ok(batch, `the load's batch ${demo.batchId} is listed: ${JSON.stringify(dom.batches)}`);
    assert.equal(batch.total, 40);

    // The key: this tab's sessionStorage, an Authorization header, nothing else.
    assert.ok(keyed.length >= 2 && keyed.every((h) => h === `Bearer ${demo.adminKey}`), JSON.stringify(keyed.length));
    const stored = await page.evaluate(() => ({
      session: Object.keys(sessionStorage).map((k) => [k, sessionStorage.getItem(k)]),
      local: localStorage.length,
      cookie: document.cookie,
    }));
    assert.deepEqual(stored.session, [['spillway.adminKey', demo.adminKey]]);
    assert.equal(stored.local, 0);
    assert.equal(stored.cookie, '');
    assert.deepEqual(await context.cookies(), []);

    // The picture: once Haiku's two regions are mostly full and the load
    // spills between them (or after 40 s, whichever is first).
    await page
      .waitForFunction(
        () =>
          Array.from(document.querySelectorAll('#budgets .card[data-model^="claude-3-haiku"] .dim[data-dim="requests"]')).reduce(
            (n, d) => n + Number(d.dataset.used) + Number(d.dataset.reserved),
            0,
          ) >= 80,
        null,
        { timeout: 40_000, polling: 500 },
      )
      .catch(() => console.log('Haiku never reached 80 requests in the window; the screenshot shows less'));
    mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    console.log(`screenshot: ${SCREENSHOT}`);

    // A reload keeps the tab's session; a new tab must sign in.
    await page.reload();
    await page.locator('#dashboard').waitFor({ state: 'visible', timeout: 10_000 });
    await nextFrame(page, 0);
    const other = await openPage(context);
    await other.goto(demo.pageUrl);
    assert.equal(await other.locator('#signin-panel').isVisible(), true);
    assert.equal(await other.evaluate(() => sessionStorage.length), 0);

    // Signing out forgets the key and clears what was shown.
    await page.locator('#signout').click();
    await page.locator('#signin-panel').waitFor({ state: 'visible' });
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    assert.equal(await page.locator('#budgets .card').count(), 0);
    assert.equal(await page.locator('#live').getAttribute('data-state'), 'signed-out');

    assert.deepEqual(await violations(page), []);
    assert.deepEqual(await violations(other), []);
    await context.close();
  });

  it('says so when the gateway shuts down, and tries again', TEST, async () => {
    const context = await browser.newContext();
    const page = await openPage(context, { expected: ['net::ERR_'] });
    await signIn(page, demo.adminKey);
    await page.locator('#dashboard').waitFor({ state: 'visible', timeout: 10_000 });
    await nextFrame(page, 1);
    await demo.demo.stop(); // SIGTERM: the feed sends `event: closing` and ends
    await page.waitForFunction(() => window.__live.some((t) => t.includes('shutting down')), null, { timeout: 10_000 });
    await page.waitForFunction(() => /retrying|reconnecting/.test(document.getElementById('live-text').textContent), null, {
      timeout: 10_000,
    });
    assert.notEqual(await page.locator('#live').getAttribute('data-state'), 'live');
    // Still signed in: a gateway going away is not a refused key.
    assert.equal(await page.evaluate(() => sessionStorage.length), 1);
    assert.deepEqual(await violations(page), []);
    await context.close();
  });

  it('met no CSP violation, console error or page error', () => {
    assert.deepEqual(problems, []);
  });
});
