// Spillway's 429 through the official TypeScript SDKs: `RateLimitError` with
// `retry-after`, and the SDKs' own retry honouring it, then succeeding.
//
// Each test gets a simulator and gateway of its own (about 0.2 s to start):
// an upstream 429 teaches a gateway a lower quota, which would change what
// any later test sees.
//
// The setup is the Python suite's (test_upstream_429_is_rate_limit): both
// Haiku regions refuse once with Vertex's quota 429, so Spillway falls back
// from one region to the other, then, told by `x-spillway-max-wait-ms: 0`
// not to wait itself, answers 429 with `retry-after` / `retry-after-ms` (when
// a region's cooldown ends).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import Anthropic from '@anthropic-ai/sdk';

import { CLIENTS, HAIKU, HAIKU_ANTHROPIC, ask, makeClient, startStack, upstreamTotal } from '../lib/stack.mjs';

const TEST = { timeout: 60_000 };
const DONT_WAIT = { 'x-spillway-max-wait-ms': '0' };

/** Runs `fn(stack)` against a fresh stack whose two Haiku regions each answer 429 once. */
async function withRefusingStack(fn) {
  const stack = await startStack();
  try {
    for (const region of ['us-central1', 'europe-west4']) {
      await stack.sim('POST', '/_sim/faults', {
        region,
        model: HAIKU,
        kind: { type: 'status', status: 429 },
        remaining: 1,
      });
    }
    return await fn(stack);
  } finally {
    await stack.stop();
  }
}

/** A `fetch` that records when each request went out and what came back. */
function recordingFetch() {
  const exchanges = [];
  const fetchFn = async (url, init) => {
    const sent = performance.now();
    const response = await fetch(url, init);
    exchanges.push({ sent, received: performance.now(), status: response.status, headers: response.headers });
    return response;
  };
  return { fetchFn, exchanges };
}

function create(client, params = {}) {
  return client.messages.create({ model: HAIKU, max_tokens: 64, messages: ask(5), ...params });
}

describe('429 from Spillway', () => {
  for (const kind of CLIENTS) {
    for (const stream of [false, true]) {
      it(`${kind} client${stream ? ', streamed' : ''}, maxRetries: 0: RateLimitError 429 with retry-after`, TEST, () =>
        withRefusingStack(async (stack) => {
          const impatient = makeClient(kind, stack, { maxRetries: 0, defaultHeaders: DONT_WAIT });
          const before = await upstreamTotal(stack);
          let error;
          try {
            if (stream) {
              await impatient.messages.stream({ model: HAIKU, max_tokens: 64, messages: ask(5) }).finalMessage();
            } else {
              await create(impatient);
            }
          } catch (e) {
            error = e;
          }
          assert.ok(error instanceof Anthropic.RateLimitError, `expected RateLimitError, got ${error}`);
          assert.equal(error.status, 429);
          assert.equal(error.type, 'rate_limit_error');
          assert.equal(error.error?.type, 'error');
          assert.equal(error.error.error.type, 'rate_limit_error');
          assert.match(error.requestID ?? '', /^req_/);
          const retryAfter = Number(error.headers.get('retry-after'));
          assert.ok(Number.isInteger(retryAfter) && retryAfter >= 1 && retryAfter <= 60, `retry-after ${retryAfter}`);
          const retryAfterMs = Number(error.headers.get('retry-after-ms'));
          assert.ok(retryAfterMs > 0 && Math.ceil(retryAfterMs / 1000) === retryAfter, `retry-after-ms ${retryAfterMs}`);
          assert.equal((await upstreamTotal(stack)) - before, 2, 'one try per Haiku region');
          assert.deepEqual(await stack.sim('GET', '/_sim/faults'), [], 'each fault used up by exactly one call');
        }),
      );
    }

    it(`${kind} client, default retries: the SDK waits what Spillway says, then succeeds`, TEST, () =>
      withRefusingStack(async (stack) => {
        const { fetchFn, exchanges } = recordingFetch();
        // The SDK's own retry (maxRetries defaults to 2); Spillway does not wait.
        const client = makeClient(kind, stack, { fetch: fetchFn, defaultHeaders: DONT_WAIT });
        const before = await upstreamTotal(stack);
        const message = await create(client);

        assert.equal(message.model, HAIKU_ANTHROPIC);
        assert.equal(message.usage.output_tokens, 5);
        assert.deepEqual(
          exchanges.map((e) => e.status),
          [429, 200],
          'one 429, then the retry succeeds',
        );
        const [refused, served] = exchanges;
        const retryAfterMs = Number(refused.headers.get('retry-after-ms'));
        const retryAfter = Number(refused.headers.get('retry-after'));
        assert.ok(retryAfterMs > 0 && Math.ceil(retryAfterMs / 1000) === retryAfter, `retry-after ${retryAfter}, -ms ${retryAfterMs}`);
        // The SDK sleeps exactly retry-after-ms (it prefers it to the
        // whole-second retry-after) before the retry; its own backoff for a
        // first retry would be 375-500 ms whatever the header said.
        const waited = served.sent - refused.received;
        assert.ok(waited >= retryAfterMs - 5, `waited ${waited.toFixed(0)} ms, retry-after-ms ${retryAfterMs}`);
        assert.ok(waited < retryAfterMs + 1000, `waited ${waited.toFixed(0)} ms, retry-after-ms ${retryAfterMs}`);
        assert.equal((await upstreamTotal(stack)) - before, 3, 'two refused tries, then the one that served');
      }),
    );
  }
});
