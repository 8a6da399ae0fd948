// Spillway's live page: signs in with the admin key, reads the overview
// feed (GET events, server-sent events) and draws it.
//
// - The key lives in this tab's sessionStorage only, and goes out only as
//   `Authorization: Bearer` on requests to this origin (relative URLs).
// - EventSource cannot send that header, so the feed is read with fetch()
//   and a stream reader; it reconnects with a backoff when the stream ends
//   (the gateway shutting down sends `event: closing` first) or goes quiet.
// - Nothing from the server is parsed as HTML: text goes in textContent,
//   numbers in data attributes (what the browser test compares with the
//   API), widths through the CSSOM (the CSP forbids inline styles).
'use strict';

(() => {
  const KEY_STORAGE = 'spillway.adminKey';
  /** No frame for this long (the feed sends one a second): reconnect. */
  const STALE_MS = 5000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;

  const $ = (id) => document.getElementById(id);

  // --- small helpers ------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const fmt = (n) => Number(n).toLocaleString('en-US');
  const pct = (f) => `${(f * 100).toFixed(f > 0 && f < 0.1 ? 1 : 0)}%`;

  function duration(ms) {
    if (ms === null || ms === undefined) return '—';
    if (ms < 1000) return `${(ms / 1000).toFixed(1)} s`;
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${s % 60} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  /** Sets a data attribute only when it changed (keeps the DOM quiet). */
  function data(node, name, value) {
    const v = String(value);
    if (node.dataset[name] !== v) node.dataset[name] = v;
  }

  function text(node, value) {
    if (node.textContent !== value) node.textContent = value;
  }

  /** Widths of a bar's segments, as fractions of the whole. */
  function widths(segments, parts) {
    parts.forEach((part, i) => {
      const w = `${Math.max(0, Math.min(1, part)) * 100}%`;
      if (segments[i].style.width !== w) segments[i].style.width = w;
    });
  }

  /**
   * Makes `parent`'s keyed children match `items`, in order: existing
   * nodes are updated in place (so bars animate), new ones created, gone
   * ones removed.
   */
  function reconcile(parent, items, keyOf, create, update) {
    const old = new Map();
    for (const child of Array.from(parent.children)) {
      if (child.dataset.key !== undefined) old.set(child.dataset.key, child);
      else child.remove();
    }
    let prev = null;
    for (const item of items) {
      const key = keyOf(item);
      let node = old.get(key);
      if (node) old.delete(key);
      else {
        node = create(item);
        node.dataset.key = key;
      }
      update(node, item);
      const want = prev ? prev.nextSibling : parent.firstChild;
      if (node !== want) parent.insertBefore(node, want);
      prev = node;
    }
    for (const node of old.values()) node.remove();
  }

  /** A one-line note in place of a list with nothing in it. */
  function emptyNote(parent, message) {
    parent.replaceChildren(el('p', 'empty', message));
  }

  // --- budgets ------------------------------------------------------------

  const DIM_LABELS = {
    requests: 'Requests',
    tokens: 'Tokens (in + out)',
    input_tokens: 'Input tokens',
    output_tokens: 'Output tokens',
  };

  function createDim() {
    const node = el('div', 'dim');
    const head = el('div', 'dim-head');
    head.append(el('span', 'what'), el('span', 'numbers'));
    const bar = el('div', 'bar');
    for (const kind of ['used', 'reserved', 'free', 'withheld']) bar.append(el('span', `seg ${kind}`));
    node.append(head, bar);
    return node;
  }

  function updateDim(node, d) {
    for (const k of ['limit', 'used', 'reserved', 'free', 'configured', 'ceiling']) data(node, k, d[k]);
    data(node, 'dim', d.name);
    text(node.querySelector('.what'), DIM_LABELS[d.name] || d.name);
    const numbers = node.querySelector('.numbers');
    const of = d.limit < d.configured ? `${fmt(d.limit)} (of ${fmt(d.configured)})` : fmt(d.limit);
    const line = `${fmt(d.used)} used · ${fmt(d.reserved)} reserved · ${fmt(d.free)} free / ${of}`;
    text(numbers, line);
    const scale = Math.max(d.configured, d.limit, d.used + d.reserved, 1);
    const withheld = scale - d.used - d.reserved - d.free;
    widths(node.querySelectorAll('.seg'), [d.used / scale, d.reserved / scale, d.free / scale, withheld / scale]);
    node.title =
      `${DIM_LABELS[d.name] || d.name}: ${fmt(d.used)} used (settled), ${fmt(d.reserved)} reserved by requests in flight, ` +
      `${fmt(d.free)} free of a limit of ${fmt(d.limit)} (ceiling ${fmt(d.ceiling)}, configured ${fmt(d.configured)})`;
  }

  function budgetState(b) {
    if (b.drained) return 'drained';
    if (b.cooldown_ms > 0) return 'cooldown';
    if (b.learned) return 'learned';
    return 'ok';
  }

  function createCard() {
    const card = el('article', 'card');
    const head = el('div', 'card-head');
    head.append(el('span', 'region'), el('span', 'badges'));
    card.append(head, el('div', 'dims'), el('div', 'card-foot'));
    return card;
  }

  function badge(kind, label) {
    return el('span', `badge ${kind}`, label);
  }

  function updateCard(card, b) {
    data(card, 'model', b.model);
    data(card, 'region', b.region);
    data(card, 'cooldownMs', b.cooldown_ms);
    data(card, 'drained', b.drained);
    data(card, 'learned', b.learned);
    data(card, 'queuedInteractive', b.queued_interactive);
    data(card, 'queuedBatch', b.queued_batch);
    data(card, 'state', budgetState(b));
    text(card.querySelector('.region'), b.region);
    const badges = [];
    if (b.drained) badges.push(badge('drained', 'drained'));
    if (b.cooldown_ms > 0) badges.push(badge('cooldown', `cooling down ${duration(b.cooldown_ms)}`));
    if (b.learned) badges.push(badge('learned', 'learned limit'));
    if (badges.length === 0) badges.push(badge('ok', 'ok'));
    const holder = card.querySelector('.badges');
    const signature = badges.map((x) => x.textContent).join('|');
    if (holder.dataset.signature !== signature) {
      holder.replaceChildren(...badges);
      holder.dataset.signature = signature;
    }
    reconcile(card.querySelector('.dims'), b.dimensions, (d) => d.name, createDim, updateDim);
    const queued = b.queued_interactive + b.queued_batch;
    let foot = queued > 0 ? `${fmt(b.queued_interactive)} interactive and ${fmt(b.queued_batch)} batch waiting` : 'nobody waiting';
    const others = b.models.filter((m) => m !== b.model);
    if (b.models.length > 1 || others.length > 0) foot += ` · drawn on by ${b.models.join(', ')}`;
    text(card.querySelector('.card-foot'), foot);
  }

  function createModel() {
    const node = el('div', 'model');
    const head = el('div', 'model-head');
    head.append(el('h3', 'mono'), el('span', 'count'));
    node.append(head, el('div', 'cards'));
    return node;
  }

  function renderBudgets(budgets) {
    const groups = new Map();
    for (const b of budgets) {
      if (!groups.has(b.model)) groups.set(b.model, []);
      groups.get(b.model).push(b);
    }
    const parent = $('budgets');
    if (groups.size === 0) return emptyNote(parent, 'No budget configured.');
    reconcile(
      parent,
      Array.from(groups.entries()),
      ([model]) => model,
      createModel,
      (node, [model, list]) => {
        text(node.querySelector('h3'), model);
        text(node.querySelector('.count'), list.length === 1 ? '1 location' : `${list.length} locations`);
        reconcile(node.querySelector('.cards'), list, (b) => b.region, createCard, updateCard);
      },
    );
  }

  // --- summary ------------------------------------------------------------

  function renderSummary(o) {
    const budgets = o.budgets;
    const waiting = o.queues.reduce((n, q) => n + q.interactive + q.batch, 0);
    const stats = [
      ['budgets', 'budgets', budgets.length, false],
      ['requests', `requests in the ${o.window_secs}-s window`, budgets.reduce((n, b) => n + b.used.requests, 0), false],
      ['waiting', 'waiting for quota', waiting, waiting > 0],
      ['cooldown', 'cooling down', budgets.filter((b) => b.cooldown_ms > 0).length, budgets.some((b) => b.cooldown_ms > 0)],
      ['learned', 'learned limits', budgets.filter((b) => b.learned).length, budgets.some((b) => b.learned)],
      ['batch-items', 'batch items open', o.batches ? o.batches.open_items : 0, false],
    ];
    reconcile(
      $('summary'),
      stats,
      ([key]) => key,
      () => {
        const node = el('div', 'stat');
        node.append(el('div', 'value'), el('div', 'label'));
        return node;
      },
      (node, [key, label, value, alert]) => {
        data(node, 'stat', key);
        data(node, 'value', value);
        node.classList.toggle('alert', alert);
        text(node.querySelector('.value'), fmt(value));
        text(node.querySelector('.label'), label);
      },
    );
  }

  // --- queues -------------------------------------------------------------

  function renderQueues(queues) {
    reconcile(
      $('queues').tBodies[0],
      queues,
      (q) => q.model,
      () => {
        const row = el('tr');
        row.append(el('td', 'mono'), el('td', 'num'), el('td', 'num'), el('td', 'num'));
        return row;
      },
      (row, q) => {
        data(row, 'model', q.model);
        data(row, 'interactive', q.interactive);
        data(row, 'batch', q.batch);
        const longest = Math.max(q.longest_interactive_ms ?? -1, q.longest_batch_ms ?? -1);
        data(row, 'longestMs', longest < 0 ? '' : longest);
        const cells = row.cells;
        cells[1].classList.toggle('waiting', q.interactive > 0);
        cells[2].classList.toggle('waiting', q.batch > 0);
        cells[3].classList.toggle('waiting', longest >= 0);
        text(cells[0], q.model);
        text(cells[1], fmt(q.interactive));
        text(cells[2], fmt(q.batch));
        text(cells[3], longest < 0 ? '—' : duration(longest));
      },
    );
  }

  // --- batches ------------------------------------------------------------

  function renderBatches(batches) {
    const parent = $('batches');
    const rate = $('batch-rate');
    if (!batches) {
      text(rate, '');
      return emptyNote(parent, 'Batches are off on this gateway (batch.enabled = false).');
    }
    let pace = 'measuring the pace…';
    if (batches.items_per_sec > 0) pace = `${batches.items_per_sec.toFixed(2)} items/s over the last 30 s`;
    else if (batches.items_per_sec === 0) pace = 'no item finished in the last 30 s (interactive traffic goes first)';
    const open = batches.in_progress + batches.canceling;
    text(rate, `${fmt(open)} open · ${fmt(batches.open_items)} items left · ${pace}`);
    data(rate, 'itemsPerSec', batches.items_per_sec ?? '');
    if (batches.running.length === 0) return emptyNote(parent, 'No batch in progress.');
    reconcile(
      parent,
      batches.running,
      (b) => b.id,
      () => {
        const node = el('div', 'batch');
        const head = el('div', 'batch-head');
        head.append(el('span', 'mono'), el('span', 'who'), el('span', 'eta'));
        const bar = el('div', 'bar');
        for (const kind of ['succeeded', 'errored', 'ended', 'free']) bar.append(el('span', `seg ${kind}`));
        node.append(head, bar);
        return node;
      },
      (node, b) => {
        for (const k of ['total', 'succeeded', 'errored', 'canceled', 'expired', 'processing']) data(node, k, b[k]);
        data(node, 'batchId', b.id);
        data(node, 'etaSecs', b.eta_secs ?? '');
        const done = b.total - b.processing;
        text(node.querySelector('.mono'), b.id);
        const status = b.processing_status === 'canceling' ? ' · canceling' : '';
        text(node.querySelector('.who'), `${b.tenant} · ${fmt(done)} of ${fmt(b.total)} done${b.errored ? ` (${fmt(b.errored)} errored)` : ''}${status}`);
        let eta;
        if (b.processing === 0) eta = 'finishing';
        else if (batches.items_per_sec === 0) eta = 'ETA: none while nothing finishes';
        else if (b.eta_secs === null) eta = 'ETA: measuring…';
        else eta = `ETA ~${duration(b.eta_secs * 1000)}`;
        text(node.querySelector('.eta'), eta);
        const total = Math.max(b.total, 1);
        widths(node.querySelectorAll('.seg'), [
          b.succeeded / total,
          b.errored / total,
          (b.canceled + b.expired) / total,
          b.processing / total,
        ]);
      },
    );
  }

  // --- pools --------------------------------------------------------------

  /** A tenant's colour, stable for the tab's life. */
  const tenantColours = new Map();
  function colour(tenant) {
    if (!tenantColours.has(tenant)) tenantColours.set(tenant, `t${tenantColours.size % 6}`);
    return tenantColours.get(tenant);
  }

  function renderPools(pools) {
    const parent = $('pools');
    const used = pools.filter((p) => p.tenants.length > 0 || p.batch_held > 0 || p.interactive_demand > 0);
    if (used.length === 0) return emptyNote(parent, 'No traffic in the window yet.');
    reconcile(
      parent,
      used,
      (p) => p.model,
      () => {
        const node = el('div', 'pool');
        const table = el('table', 'grid');
        const head = el('tr');
        for (const [label, cls] of [['Who', ''], ['Held', 'num'], ['Asked', 'num'], ['Share', 'num']]) {
          const th = el('th', cls, label);
          th.scope = 'col';
          head.append(th);
        }
        table.append(el('thead'), el('tbody'));
        table.tHead.append(head);
        node.append(el('h3', 'mono'), el('div', 'bar'), table);
        return node;
      },
      (node, p) => {
        data(node, 'model', p.model);
        data(node, 'batchHeld', p.batch_held);
        data(node, 'interactiveDemand', p.interactive_demand);
        text(node.querySelector('h3'), p.model);
        const rows = [
          ...p.tenants.map((t) => ({ key: `tenant:${t.tenant}`, who: t.tenant, cls: colour(t.tenant), ...t })),
          { key: 'batch', who: 'batch', cls: 'batchheld', held: p.batch_held, demand: null, share: null },
        ];
        const segments = [...rows.map((r) => ({ key: r.key, cls: r.cls, held: r.held })), { key: 'idle', cls: 'free', held: 0 }];
        const held = rows.reduce((n, r) => n + r.held, 0);
        segments[segments.length - 1].held = Math.max(0, 1 - held);
        reconcile(
          node.querySelector('.bar'),
          segments,
          (s) => s.key,
          (s) => el('span', `seg ${s.cls}`),
          (seg, s) => {
            const w = `${Math.max(0, Math.min(1, s.held)) * 100}%`;
            if (seg.style.width !== w) seg.style.width = w;
            seg.title = s.key === 'idle' ? `idle ${pct(s.held)}` : `${s.key.replace('tenant:', '')} holds ${pct(s.held)}`;
          },
        );
        reconcile(
          node.querySelector('tbody'),
          rows,
          (r) => r.key,
          () => {
            const row = el('tr');
            const who = el('td');
            who.append(el('span', 'swatch'), el('span', 'name'));
            row.append(who, el('td', 'num'), el('td', 'num'), el('td', 'num'));
            return row;
          },
          (row, r) => {
            if (r.key.startsWith('tenant:')) data(row, 'tenant', r.who);
            data(row, 'held', r.held);
            data(row, 'demand', r.demand ?? '');
            data(row, 'share', r.share ?? '');
            row.querySelector('.swatch').className = `swatch ${r.cls}`;
            text(row.querySelector('.name'), r.who);
            text(row.cells[1], pct(r.held));
            text(row.cells[2], r.demand === null ? '—' : pct(r.demand));
            text(row.cells[3], r.share === null ? '—' : pct(r.share));
          },
        );
      },
    );
  }

  // --- one frame ------------------------------------------------------------

  let lastFrameAt = 0;
  /** The last frame, or the start of the connection waiting for one. */
  let lastActivity = 0;
  let frames = 0;

  function render(o) {
    renderSummary(o);
    renderBudgets(o.budgets);
    renderQueues(o.queues);
    renderBatches(o.batches);
    renderPools(o.pools);
    text($('window-note'), `per ${o.window_secs}-s window`);
    const age = o.state_age_ms === null ? 'not read yet' : `read ${duration(o.state_age_ms)} before`;
    text(
      $('foot'),
      `Frame of ${o.generated_at} · budgets ${age} · headroom ${pct(o.headroom)} · a frame a second from GET /admin/events`,
    );
    lastFrameAt = Date.now();
    lastActivity = lastFrameAt;
    frames += 1;
    const dash = $('dashboard');
    dash.dataset.generatedAtMs = String(o.generated_at_ms);
    dash.dataset.frames = String(frames);
    setLive('live');
  }

  // --- live status ------------------------------------------------------------

  let liveState = 'signed-out';
  let liveMessage = '';

  function setLive(state, message = '') {
    liveState = state;
    liveMessage = message;
    paintLive();
  }

  function paintLive() {
    const node = $('live');
    data(node, 'state', liveState);
    let label = liveMessage;
    if (liveState === 'live') label = `Live · updated ${duration(Date.now() - lastFrameAt)} ago`;
    if (liveState === 'signed-out') label = 'Signed out';
    text($('live-text'), label);
  }

  // --- the admin API ------------------------------------------------------------

  class AuthError extends Error {}

  /** The message of an Anthropic-shaped error body, or the status text. */
  async function problem(res) {
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) return `${body.error.type}: ${body.error.message}`;
    } catch {
      // not JSON
    }
    return res.statusText || 'no message';
  }

  async function refused(res) {
    const why = await problem(res);
    if (res.status === 401) return new AuthError(`That admin key was not accepted (401 ${why}).`);
    if (res.status === 403)
      return new AuthError(
        `The admin API is disabled on this gateway (403 ${why}). Set admin.key_sha256 (spillway hash-key KEY) and restart it.`,
      );
    return new Error(`The gateway answered ${res.status} (${why}).`);
  }

  function authHeaders(key) {
    return { Authorization: `Bearer ${key}` };
  }

  async function fetchOverview(key) {
    const res = await fetch('overview', {
      headers: authHeaders(key),
      cache: 'no-store',
      credentials: 'omit',
      signal: AbortSignal.timeout(STALE_MS * 2),
    });
    if (!res.ok) throw await refused(res);
    return res.json();
  }

  /** Reads the feed until it ends; every `overview` event is drawn. */
  async function readFeed(key, signal) {
    const res = await fetch('events', {
      headers: { ...authHeaders(key), Accept: 'text/event-stream' },
      cache: 'no-store',
      credentials: 'omit',
      signal,
    });
    if (!res.ok) throw await refused(res);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return 'ended';
      buffer += value.replace(/\r\n?/g, '\n');
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = 'message';
        const lines = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) event = line.slice(6).trim();
          else if (line.startsWith('data:')) lines.push(line.slice(5).replace(/^ /, ''));
        }
        if (event === 'overview' && lines.length) render(JSON.parse(lines.join('\n')));
        if (event === 'closing') {
          reader.cancel().catch(() => {});
          return 'closing';
        }
      }
    }
  }

  // --- session ----------------------------------------------------------------

  let session = null; // { key, controller }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function feedLoop(current) {
    let backoff = BACKOFF_MIN_MS;
    while (session === current) {
      current.controller = new AbortController();
      lastActivity = Date.now();
      if (liveState !== 'live') setLive('connecting', 'Connecting…');
      try {
        const how = await readFeed(current.key, current.controller.signal);
        backoff = BACKOFF_MIN_MS;
        if (session !== current) return;
        setLive('connecting', how === 'closing' ? 'The gateway is shutting down; reconnecting…' : 'The feed ended; reconnecting…');
      } catch (e) {
        if (session !== current) return;
        if (e instanceof AuthError) return signOut(e.message);
        if (liveState !== 'stale') setLive('error', `Disconnected; retrying in ${duration(backoff)}`);
      }
      await sleep(backoff);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }

  function start(key, first) {
    session = { key, controller: null };
    $('signin-panel').hidden = true;
    $('dashboard').hidden = false;
    $('signout').hidden = false;
    if (first) render(first);
    feedLoop(session);
  }

  function signOut(message) {
    const ending = session;
    session = null;
    if (ending && ending.controller) ending.controller.abort();
    sessionStorage.removeItem(KEY_STORAGE);
    // Nothing of the session stays on screen.
    for (const id of ['summary', 'budgets', 'batches', 'pools']) $(id).replaceChildren();
    $('queues').tBodies[0].replaceChildren();
    text($('batch-rate'), '');
    text($('foot'), '');
    delete $('dashboard').dataset.generatedAtMs;
    $('dashboard').hidden = true;
    $('signout').hidden = true;
    $('signin-panel').hidden = false;
    showError(message);
    setLive('signed-out');
    $('key').focus();
  }

  function showError(message) {
    const node = $('signin-error');
    node.hidden = !message;
    text(node, message || '');
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $('key');
    const key = input.value.trim();
    if (!key) return showError('Enter the admin key.');
    const button = $('signin-button');
    button.disabled = true;
    showError('');
    try {
      const first = await fetchOverview(key);
      sessionStorage.setItem(KEY_STORAGE, key);
      input.value = '';
      start(key, first);
    } catch (e) {
      let message = e.message;
      if (e instanceof TypeError) message = `Cannot reach the gateway (${e.message}).`;
      if (e.name === 'TimeoutError') message = `The gateway did not answer within ${duration(STALE_MS * 2)}.`;
      showError(message);
      input.select();
    } finally {
      button.disabled = false;
    }
  }

  // --- start ------------------------------------------------------------------

  /** A feed that went quiet (or a connection that never answered) is dropped and made again. */
  function watchdog() {
    const controller = session && session.controller;
    const quiet = Date.now() - lastActivity;
    if (controller && !controller.signal.aborted && quiet > STALE_MS) {
      setLive('stale', `No update for ${duration(quiet)}; reconnecting…`);
      controller.abort();
    }
    paintLive();
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('signin').addEventListener('submit', signIn);
    $('signout').addEventListener('click', () => signOut(''));
    setInterval(watchdog, 500);
    const saved = sessionStorage.getItem(KEY_STORAGE);
    if (saved) start(saved, null);
    else $('key').focus();
  });
})();
