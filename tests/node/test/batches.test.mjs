// The Message Batches API through the official TypeScript SDK (`Anthropic`
// client; the Vertex client has none): create, poll until ended, results,
// cancel, list, delete. The batch runner polls every 200 ms (the overlay's
// `[batch] poll_ms`) and runs the requests at batch priority through the
// gateway's own quota, against the simulator.
//
// A simulator and gateway of this file's own, so the quota its batches use
// does not change what other files see.

import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';

import Anthropic from '@anthropic-ai/sdk';

import { HAIKU, SONNET, makeClient } from '../lib/stack.mjs';
import { rejection, stackForFile } from '../lib/testing.mjs';

const TEST = { timeout: 60_000 };
const DAY_MS = 24 * 3600 * 1000;

// Shorter retry backoff than the default (1 s doubling): the errored Sonnet
// item of the first test is tried max_item_attempts (5) times, and at the
// default backoff that alone takes about 14 s. Batch admissions are still
// paced at the quota's refill interval (1 s at 60 requests/min), so it takes
// about 4 s.
let client;
const stack = stackForFile({ batch: { retry_base_ms: 50, retry_max_ms: 200 } }, (s) => {
  client = makeClient('anthropic', s);
});

function request(customId, { model = HAIKU, outputTokens = 3 } = {}) {
  return {
    custom_id: customId,
    params: {
      model,
      max_tokens: 32,
      messages: [{ role: 'user', content: `Say something. SIM_OUTPUT_TOKENS=${outputTokens}` }],
    },
  };
}

async function waitEnded(id, timeoutMs = 45_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const batch = await client.messages.batches.retrieve(id);
    if (batch.processing_status === 'ended') return batch;
    assert.ok(Date.now() < deadline, `batch not ended: ${JSON.stringify(batch)}`);
    await sleep(200);
  }
}

async function results(id) {
  const out = [];
  for await (const line of await client.messages.batches.results(id)) out.push(line);
  return out;
}

describe('messages.batches', () => {
  it('create, poll until ended, results', TEST, async () => {
    const requests = [0, 1, 2, 3].map((i) => request(`r${i}`, { outputTokens: i + 1 }));
    requests.push(request('bad-model', { model: SONNET }));
    const batch = await client.messages.batches.create({ requests });
    assert.match(batch.id, /^msgbatch_/);
    assert.equal(batch.type, 'message_batch');
    assert.equal(batch.processing_status, 'in_progress');
    assert.equal(batch.request_counts.processing, 5);
    assert.equal(batch.results_url, null);
    assert.equal(Date.parse(batch.expires_at) - Date.parse(batch.created_at), DAY_MS);

    const ended = await waitEnded(batch.id);
    assert.deepEqual(ended.request_counts, { processing: 0, succeeded: 4, errored: 1, canceled: 0, expired: 0 });
    assert.ok(ended.ended_at, 'ended_at set');
    assert.equal(ended.results_url, `${stack.url}/v1/messages/batches/${batch.id}/results`);

    const byId = Object.fromEntries((await results(batch.id)).map((r) => [r.custom_id, r.result]));
    assert.deepEqual(Object.keys(byId).sort(), ['bad-model', 'r0', 'r1', 'r2', 'r3']);
    for (const i of [0, 1, 2, 3]) {
      const result = byId[`r${i}`];
      assert.equal(result.type, 'succeeded');
      assert.equal(result.message.role, 'assistant');
      assert.equal(result.message.usage.output_tokens, i + 1);
    }
    // Sonnet is not enabled in its one configured region: the gateway's
    // setup error (api_error), retried, then recorded.
    assert.equal(byId['bad-model'].type, 'errored');
    assert.equal(byId['bad-model'].error.error.type, 'api_error');
  });

  it('results before the end: the SDK refuses (no results_url); cancel ends it', TEST, async () => {
    const batch = await client.messages.batches.create({
      requests: Array.from({ length: 30 }, (_, i) => request(`slow${i}`)),
    });
    const error = await rejection(client.messages.batches.results(batch.id));
    assert.ok(error instanceof Anthropic.AnthropicError);
    assert.match(error.message, /results_url/);
    const canceling = await client.messages.batches.cancel(batch.id);
    assert.ok(['canceling', 'ended'].includes(canceling.processing_status), canceling.processing_status);
    assert.ok(canceling.cancel_initiated_at, 'cancel_initiated_at set');
    const ended = await waitEnded(batch.id);
    const counts = ended.request_counts;
    assert.equal(counts.succeeded + counts.canceled + counts.errored, 30);
    const kinds = (await results(batch.id)).map((r) => r.result.type);
    assert.equal(kinds.length, 30);
    assert.equal(kinds.filter((k) => k === 'canceled').length, counts.canceled);
    assert.equal(kinds.filter((k) => k === 'succeeded').length, counts.succeeded);
  });

  it('list: newest first, pages of `limit`, auto-pagination', TEST, async () => {
    const created = [];
    for (let i = 0; i < 3; i++) created.push((await client.messages.batches.create({ requests: [request('one')] })).id);
    const page = await client.messages.batches.list({ limit: 2 });
    assert.equal(page.data.length, 2);
    assert.equal(page.has_more, true);
    assert.equal(page.first_id, created[2]);
    assert.equal(page.last_id, created[1]);
    const seen = [];
    for await (const batch of client.messages.batches.list({ limit: 2 })) seen.push(batch.id);
    assert.ok(seen.indexOf(created[2]) < seen.indexOf(created[1]));
    assert.ok(seen.indexOf(created[1]) < seen.indexOf(created[0]));
    assert.ok(seen.indexOf(created[2]) >= 0);
    assert.equal(new Set(seen).size, seen.length, 'no batch listed twice');
    const error = await rejection(client.messages.batches.list({ limit: 0 }));
    assert.ok(error instanceof Anthropic.BadRequestError, `got ${error}`);
    for (const id of created) await waitEnded(id);
  });

  it('delete: refused while processing, then gone', TEST, async () => {
    const running = await client.messages.batches.create({
      requests: Array.from({ length: 30 }, (_, i) => request(`d${i}`)),
    });
    const refused = await rejection(client.messages.batches.delete(running.id));
    assert.ok(refused instanceof Anthropic.BadRequestError, `got ${refused}`);
    assert.match(refused.message, /still processing/);
    await client.messages.batches.cancel(running.id);
    await waitEnded(running.id);
    const deleted = await client.messages.batches.delete(running.id);
    assert.deepEqual(deleted, { id: running.id, type: 'message_batch_deleted' });
    const gone = await rejection(client.messages.batches.retrieve(running.id));
    assert.ok(gone instanceof Anthropic.NotFoundError, `got ${gone}`);
  });

  it('an invalid batch is rejected whole', TEST, async () => {
    const bad = [request('ok'), request('no-max-tokens'), request('ok2')];
    delete bad[1].params.max_tokens;
    const before = (await client.messages.batches.list({ limit: 1000 })).data.map((b) => b.id);
    const error = await rejection(client.messages.batches.create({ requests: bad }));
    assert.ok(error instanceof Anthropic.BadRequestError, `got ${error}`);
    assert.match(error.message, /requests\[1\]\.params/);
    assert.match(error.message, /max_tokens/);
    const dup = await rejection(client.messages.batches.create({ requests: [request('same'), request('same')] }));
    assert.ok(dup instanceof Anthropic.BadRequestError, `got ${dup}`);
    assert.match(dup.message, /unique/);
    const afterIds = (await client.messages.batches.list({ limit: 1000 })).data.map((b) => b.id);
    assert.deepEqual(afterIds, before, 'no batch was created');
  });

  it('unknown batch: NotFoundError; wrong key: AuthenticationError', TEST, async () => {
    const missing = await rejection(client.messages.batches.retrieve('msgbatch_01DoesNotExist000000000'));
    assert.ok(missing instanceof Anthropic.NotFoundError, `got ${missing}`);
    assert.equal(missing.status, 404);
    const wrongKey = makeClient('anthropic', stack, { key: 'sk-wrong' });
    const denied = await rejection(wrongKey.messages.batches.list());
    assert.ok(denied instanceof Anthropic.AuthenticationError, `got ${denied}`);
    assert.equal(denied.status, 401);
  });
});
