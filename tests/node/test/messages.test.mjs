// The official TypeScript SDKs, unchanged, against the real `spillway` binary:
// messages (unary, streamed), countTokens, models, and the errors a client
// sees. Both client surfaces: `Anthropic({ baseURL: gateway })` and
// `AnthropicVertex({ baseURL: gateway + '/v1', authClient })`.
//
// One simulator and gateway for the whole file (see lib/stack.mjs); tests
// that make upstream answer 429 use stacks of their own (rate-limit.test.mjs).

import assert from 'node:assert/strict';
import { beforeEach, describe, it } from 'node:test';

import Anthropic from '@anthropic-ai/sdk';

import { CLIENTS, HAIKU, HAIKU_ANTHROPIC, SONNET, ask, makeClient, upstreamTotal } from '../lib/stack.mjs';
import { rejection, stackForFile } from '../lib/testing.mjs';

const TEST = { timeout: 30_000 };
const STREAM_EVENT_TYPES = [
  'content_block_delta',
  'content_block_start',
  'content_block_stop',
  'message_delta',
  'message_start',
  'message_stop',
];

const stack = stackForFile();
beforeEach(async () => {
  await stack.sim('DELETE', '/_sim/faults');
}, { timeout: 10_000 });

// --- helpers -----------------------------------------------------------------

function create(client, { model = HAIKU, outputTokens = 5, ...params } = {}) {
  return client.messages.create({ model, max_tokens: 64, messages: ask(outputTokens), ...params });
}

/** Runs `fn` and asserts it made exactly `expected` predict calls reach the simulator. */
async function expectUpstreamCalls(expected, fn) {
  const before = await upstreamTotal(stack);
  try {
    return await fn();
  } finally {
    assert.equal((await upstreamTotal(stack)) - before, expected, 'predict calls that reached the simulator');
  }
}

function assertTextMessage(message, outputTokens) {
  assert.equal(message.type, 'message');
  assert.equal(message.role, 'assistant');
  assert.equal(message.model, HAIKU_ANTHROPIC);
  assert.match(message.id, /^msg_/);
  assert.equal(message.stop_reason, 'end_turn');
  assert.deepEqual(
    message.content.map((b) => b.type),
    ['text'],
  );
  assert.equal(message.content[0].text.split(/\s+/).filter(Boolean).length, outputTokens);
  assert.ok(message.usage.input_tokens > 0, 'input tokens counted');
  assert.equal(message.usage.output_tokens, outputTokens);
}

/** An Anthropic-shaped error body with the status the SDK mapped, and a request id. */
function assertApiError(error, ErrorClass, status, errorType) {
  assert.ok(error instanceof ErrorClass, `expected ${ErrorClass.name}, got ${error?.constructor?.name}: ${error}`);
  assert.equal(error.status, status);
  assert.equal(error.type, errorType);
  assert.equal(error.error?.type, 'error', JSON.stringify(error.error));
  assert.equal(error.error.error.type, errorType);
  assert.ok(error.error.error.message, 'an error message');
  assert.match(error.requestID ?? '', /^req_/);
}

// --- success paths -------------------------------------------------------------

describe('messages.create', () => {
  for (const [kind, model] of [
    ['vertex', HAIKU],
    ['anthropic', HAIKU_ANTHROPIC],
    ['anthropic', HAIKU],
  ]) {
    it(`${kind} client, model ${model}`, TEST, async () => {
      const client = makeClient(kind, stack);
      const { data, response, request_id } = await expectUpstreamCalls(1, () =>
        create(client, { model, outputTokens: 5 }).withResponse(),
      );
      assertTextMessage(data, 5);
      assert.match(request_id ?? '', /^req_/);
      assert.ok(['us-central1', 'europe-west4'].includes(response.headers.get('x-spillway-region')));
      assert.ok(Number(response.headers.get('anthropic-ratelimit-requests-limit')) > 0);
    });
  }
});

describe('messages.stream', () => {
  for (const kind of CLIENTS) {
    it(`${kind} client: text events, then finalMessage() with usage and stop_reason`, TEST, async () => {
      const client = makeClient(kind, stack);
      const stream = client.messages.stream({ model: HAIKU, max_tokens: 64, messages: ask(7) });
      const deltas = [];
      const types = new Set();
      stream.on('text', (delta) => deltas.push(delta));
      stream.on('streamEvent', (event) => types.add(event.type));
      const final = await stream.finalMessage();
      assert.ok(deltas.length > 1, `the text should arrive in several deltas, got ${deltas.length}`);
      assert.equal(deltas.join(''), final.content[0].text);
      assertTextMessage(final, 7);
      assert.deepEqual([...types].sort(), STREAM_EVENT_TYPES, 'only Anthropic events (no vertex_event)');
      assert.match(stream.request_id ?? '', /^req_/);
    });
  }

  it('raw stream: create({ stream: true }) yields the events in order', TEST, async () => {
    const client = makeClient('anthropic', stack);
    const events = [];
    for await (const event of await create(client, { outputTokens: 4, stream: true })) events.push(event);
    assert.equal(events[0].type, 'message_start');
    assert.equal(events.at(-1).type, 'message_stop');
    const text = events
      .filter((e) => e.type === 'content_block_delta')
      .map((e) => e.delta.text)
      .join('');
    assert.equal(text.split(/\s+/).filter(Boolean).length, 4);
    const [messageDelta] = events.filter((e) => e.type === 'message_delta');
    assert.equal(messageDelta.usage.output_tokens, 4);
    assert.equal(messageDelta.delta.stop_reason, 'end_turn');
  });
});

describe('messages.countTokens', () => {
  for (const kind of CLIENTS) {
    it(`${kind} client: upstream's count, what a real call is billed`, TEST, async () => {
      const client = makeClient(kind, stack);
      const counted = (await client.messages.countTokens({ model: HAIKU, messages: ask(5) })).input_tokens;
      const billed = (await create(client, { outputTokens: 5 })).usage.input_tokens;
      assert.ok(counted > 0);
      assert.equal(counted, billed);
      const longer = (await client.messages.countTokens({ model: HAIKU, messages: ask(5, 'hi '.repeat(200)) }))
        .input_tokens;
      assert.ok(longer > counted, `${longer} > ${counted}`);
    });
  }
});

describe('models', () => {
  it('list and retrieve (Anthropic client; Vertex has no Models API)', TEST, async () => {
    const client = makeClient('anthropic', stack);
    const ids = [];
    for await (const model of client.models.list()) ids.push(model.id);
    assert.ok(ids.includes(HAIKU_ANTHROPIC), `${HAIKU_ANTHROPIC} in ${ids}`);
    assert.equal(new Set(ids).size, ids.length, 'no model listed twice');
    const model = await client.models.retrieve(HAIKU_ANTHROPIC);
    assert.equal(model.id, HAIKU_ANTHROPIC);
    assert.equal(model.type, 'model');
    assert.equal(model.display_name, 'Claude 3 Haiku');
    assert.equal(new Date(model.created_at).getUTCFullYear(), 2024);
    assertApiError(await rejection(client.models.retrieve('claude-9')), Anthropic.NotFoundError, 404, 'not_found_error');
  });
});

// --- errors --------------------------------------------------------------------

describe('errors', () => {
  for (const kind of CLIENTS) {
    it(`${kind} client: a wrong key is AuthenticationError (401), never sent upstream`, TEST, async () => {
      const client = makeClient(kind, stack, { key: 'sk-spw-not-a-configured-key' });
      const error = await expectUpstreamCalls(0, () => rejection(create(client)));
      assertApiError(error, Anthropic.AuthenticationError, 401, 'authentication_error');
      assert.equal(error.headers.get('x-should-retry'), 'false');
    });

    it(`${kind} client: an unknown model is NotFoundError (404), never sent upstream`, TEST, async () => {
      const client = makeClient(kind, stack);
      const error = await expectUpstreamCalls(0, () => rejection(create(client, { model: 'claude-nonexistent@20990101' })));
      assertApiError(error, Anthropic.NotFoundError, 404, 'not_found_error');
    });

    it(`${kind} client: roles not alternating is BadRequestError (400), never sent upstream`, TEST, async () => {
      const client = makeClient(kind, stack);
      const messages = [
        { role: 'user', content: 'one' },
        { role: 'user', content: 'two' },
      ];
      const error = await expectUpstreamCalls(0, () =>
        rejection(client.messages.create({ model: HAIKU, max_tokens: 64, messages })),
      );
      assertApiError(error, Anthropic.BadRequestError, 400, 'invalid_request_error');
      assert.match(error.error.error.message, /alternate/);
    });

    for (const stream of [false, true]) {
      it(`${kind} client${stream ? ', streamed' : ''}: a model upstream 404s (not enabled) is the gateway's 502`, TEST, async () => {
        // Vertex's 404 "Publisher Model ... not found" for Sonnet (routed to
        // europe-west4, where the simulator lacks it) is about the gateway's
        // setup: the SDK gets a 502 api_error, never a NotFoundError.
        const client = makeClient(kind, stack, { maxRetries: 0 });
        const error = await expectUpstreamCalls(1, () =>
          rejection(
            stream
              ? client.messages.stream({ model: SONNET, max_tokens: 64, messages: ask(5) }).finalMessage()
              : create(client, { model: SONNET }),
          ),
        );
        assertApiError(error, Anthropic.InternalServerError, 502, 'api_error');
        assert.match(error.error.error.message, /not enabled/);
        const last = (await stack.sim('GET', '/_sim/requests')).at(-1);
        assert.deepEqual([last.region, last.model, last.status], ['europe-west4', SONNET, 404]);
      });
    }
  }
});

// --- what reached upstream (last: it checks everything the file sent) ----------

describe('upstream', () => {
  it('never sees a client credential or an anthropic-version header', TEST, async () => {
    // One request of each kind through both clients, so this proves
    // something even when run alone.
    for (const kind of CLIENTS) {
      const client = makeClient(kind, stack);
      await create(client);
      await client.messages.stream({ model: HAIKU, max_tokens: 64, messages: ask(3) }).done();
      await client.messages.countTokens({ model: HAIKU, messages: ask(3) });
    }
    const recorded = await stack.sim('GET', '/_sim/requests');
    const actions = new Set(recorded.map((r) => `${r.model} ${r.action}`));
    for (const expected of [`${HAIKU} rawPredict`, `${HAIKU} streamRawPredict`, 'count-tokens rawPredict']) {
      assert.ok(actions.has(expected), `${expected} in ${[...actions]}`);
    }
    for (const record of recorded) {
      assert.equal(record.authorization, `Bearer ${stack.upstreamToken}`, JSON.stringify(record));
      assert.equal(record.has_x_api_key, false, JSON.stringify(record));
      assert.equal(record.anthropic_version_header, null, JSON.stringify(record));
      assert.ok(!JSON.stringify(record).includes(stack.key), JSON.stringify(record));
    }
  });
});
