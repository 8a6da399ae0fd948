// Claude Code, the CLI as published (pinned in ../package.json), through the
// real `spillway` binary in front of the real `spillway-sim`, in both of its
// modes:
//
// 1. the Anthropic API: ANTHROPIC_BASE_URL=<gateway>, ANTHROPIC_API_KEY=<key>;
// 2. Vertex AI: CLAUDE_CODE_USE_VERTEX=1, ANTHROPIC_VERTEX_BASE_URL=<gateway>/v1,
//    CLAUDE_CODE_SKIP_VERTEX_AUTH=1, and the key in ANTHROPIC_CUSTOM_HEADERS
//    (`x-api-key: KEY` or `Authorization: Bearer KEY`).
//
// Each test runs `claude -p` once against a simulator and gateway of its
// own (fresh quota windows: one Claude Code turn on the demo's Claude 3
// Haiku reserves most of a region's 50,000 tokens a minute). A served turn
// (`servesOneTurn`) must show: exit 0; the simulator's answer (its
// lorem-ipsum words, as many as SIM_OUTPUT_TOKENS in the prompt asks); the
// gateway serving it as the test's tenant (`spillway_requests_total`); the
// simulator getting exactly that one call, with the gateway's upstream
// bearer and not the client key anywhere in what it recorded. Two more: a
// 429 of Spillway's own that Claude Code retries through, and a wrong key.

import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';

import { anthropicEnv, claudeVersion, INVOCATION_TIMEOUT_MS, pinnedVersion, runClaude, vertexEnv } from '../lib/claude.mjs';
import { UPSTREAM_TOKEN, startStack } from '../lib/stack.mjs';

// One invocation's bound, plus the stack's start and stop.
const TEST = { timeout: INVOCATION_TIMEOUT_MS + 30_000 };

// What the simulator writes: one lorem-ipsum word per output token
// (crates/spillway-sim/src/message.rs).
const LOREM = 'lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor'.split(' ');
const answerOf = (n) => LOREM.slice(0, n).join(' ');

// The demo's models (config/demo.toml, config/default.toml): Claude 3 Haiku,
// in the Anthropic API's form and in Vertex's.
const DEMO_HAIKU = { anthropic: 'claude-3-haiku-20240307', vertex: 'claude-3-haiku@20240307' };

// Today's models, as config/examples/claude-4.toml serves them (layered
// over the demo), with that file's limits on `global` offered by the
// simulator too.
const CLAUDE_4 = 'config/examples/claude-4.toml';
const SONNET_4_6 = { anthropic: 'claude-sonnet-4-6', vertex: 'claude-sonnet-4-6' };
const HAIKU_4_5 = { anthropic: 'claude-haiku-4-5-20251001', vertex: 'claude-haiku-4-5@20251001' };
const CLAUDE_4_GLOBAL = [
  { model: 'claude-sonnet-4-6', requests_per_min: 200, input_tokens_per_min: 400000, output_tokens_per_min: 40000 },
  { model: 'claude-haiku-4-5@20251001', requests_per_min: 300, input_tokens_per_min: 500000, output_tokens_per_min: 50000 },
];

/** A fresh stack for `fn`, stopped after; its logs are shown if `fn` throws. */
async function withStack(options, fn) {
  const stack = await startStack(options);
  try {
    return await fn(stack);
  } catch (e) {
    e.message += `\n--- gateway log (tail) ---\n${stack.gateway.stderr().slice(-3000)}`;
    throw e;
  } finally {
    await stack.stop();
  }
}

/** What a failed run printed, for assertion messages. */
const shown = (run) =>
  `exit ${run.code}${run.signal ? ` (${run.signal})` : ''} after ${run.ms} ms\n` +
  `--- stdout ---\n${run.stdout.slice(-3000)}\n--- stderr ---\n${run.stderr.slice(-3000)}`;

/**
 * Runs one prompt with `env(stack)` and checks everything the header says.
 * `model`: the Vertex id the simulator must have been asked for.
 */
async function servesOneTurn(stack, env, { model, words }) {
  const before = (await stack.sim('GET', '/_sim/counters')).total_requests;
  const run = await runClaude(`Say hello in a few words. SIM_OUTPUT_TOKENS=${words}`, env);

  assert.equal(run.code, 0, shown(run));
  assert.ok(run.result, `not JSON on stdout: ${shown(run)}`);
  assert.equal(run.result.is_error, false, shown(run));
  assert.equal(run.result.result, answerOf(words), shown(run));

  const served = await stack.tenantRequests();
  assert.deepEqual(served, { ok: 1 }, 'spillway_requests_total of the tenant');

  const calls = (await stack.sim('GET', '/_sim/requests')).slice(before);
  assert.equal(calls.length, 1, `upstream calls: ${JSON.stringify(calls.map(({ body, ...c }) => c))}`);
  const [call] = calls;
  assert.equal(call.model, model);
  assert.equal(call.action, 'streamRawPredict');
  assert.equal(call.status, 200);
  assert.equal(call.authorization, `Bearer ${UPSTREAM_TOKEN}`);
  assert.equal(call.has_x_api_key, false);
  assert.ok(!JSON.stringify(call).includes(stack.key), 'the client key reached the upstream');
  // Claude Code's beta flags travel on (Vertex takes them as a header too).
  assert.match(call.anthropic_beta ?? '', /\bclaude-code-20250219\b/);
  assert.ok(call.body?.tools?.length > 0, 'Claude Code sent its tools');
  return { run, call };
}

before(async () => {
  // The package's postinstall swaps its bin/claude.exe for the native binary.
  assert.equal(await claudeVersion(), `${pinnedVersion()} (Claude Code)`);
});

describe('Claude Code through Spillway on the demo models', () => {
  it('Anthropic API mode: ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY', TEST, () =>
    withStack({}, (stack) =>
      servesOneTurn(stack, anthropicEnv(stack, { model: DEMO_HAIKU.anthropic }), { model: DEMO_HAIKU.vertex, words: 5 }),
    ));

  for (const header of ['x-api-key', 'authorization']) {
    it(`Vertex mode, the key as ${header} in ANTHROPIC_CUSTOM_HEADERS`, TEST, () =>
      withStack({}, (stack) =>
        servesOneTurn(stack, vertexEnv(stack, { model: DEMO_HAIKU.vertex, header }), {
          model: DEMO_HAIKU.vertex,
          words: 6,
        }),
      ));
  }

  it("Vertex's 429 in both regions: Spillway's own 429 and retry-after, which Claude Code honours", TEST, () =>
    withStack({}, async (stack) => {
      // Each Haiku region refuses once with Vertex's quota 429; told by
      // `x-spillway-max-wait-ms: 0` (a second custom header) not to wait,
      // Spillway answers 429 with retry-after, and Claude Code retries.
      for (const region of ['us-central1', 'europe-west4']) {
        await stack.sim('POST', '/_sim/faults', {
          region,
          model: DEMO_HAIKU.vertex,
          kind: { type: 'status', status: 429 },
          remaining: 1,
        });
      }
      const env = vertexEnv(stack, { model: DEMO_HAIKU.vertex });
      env.ANTHROPIC_CUSTOM_HEADERS += '\nx-spillway-max-wait-ms: 0';
      const run = await runClaude('Say hello. SIM_OUTPUT_TOKENS=4', env);
      assert.equal(run.code, 0, shown(run));
      assert.equal(run.result?.result, answerOf(4), shown(run));
      assert.deepEqual(await stack.tenantRequests(), { ok: 1, rejected: 1 });
      const statuses = (await stack.sim('GET', '/_sim/requests')).map((c) => c.status);
      assert.deepEqual(statuses, [429, 429, 200]);
    }));

  it('a wrong key is refused by the gateway and never reaches upstream', TEST, () =>
    withStack({}, async (stack) => {
      const env = anthropicEnv(stack, { model: DEMO_HAIKU.anthropic, key: 'sk-spw-not-a-key-of-this-gateway' });
      const run = await runClaude('Say hello. SIM_OUTPUT_TOKENS=3', env);
      assert.notEqual(run.code, 0, shown(run));
      assert.equal(run.result?.api_error_status, 401, shown(run));
      assert.equal((await stack.sim('GET', '/_sim/counters')).total_requests, 0);
      assert.deepEqual(await stack.tenantRequests(), {});
    }));
});

describe("Claude Code through Spillway on today's models (config/examples/claude-4.toml)", () => {
  const claude4 = async (fn) =>
    withStack({ configs: [CLAUDE_4] }, async (stack) => {
      for (const limits of CLAUDE_4_GLOBAL) await stack.sim('PUT', '/_sim/quota', { region: 'global', ...limits });
      return fn(stack);
    });

  it('Anthropic API mode, Sonnet 4.6 with thinking, context management and the current betas', TEST, () =>
    claude4(async (stack) => {
      const env = anthropicEnv(stack, { model: SONNET_4_6.anthropic, smallModel: HAIKU_4_5.anthropic });
      const { call } = await servesOneTurn(stack, env, { model: SONNET_4_6.vertex, words: 7 });
      // What a current model gets and the Claude 3 ones do not.
      assert.equal(typeof call.body.thinking, 'object');
      assert.ok(call.body.context_management, 'context_management');
      assert.match(call.anthropic_beta, /\binterleaved-thinking-/);
    }));

  it('Vertex mode, Sonnet 4.6', TEST, () =>
    claude4(async (stack) => {
      const env = vertexEnv(stack, { model: SONNET_4_6.vertex, smallModel: HAIKU_4_5.vertex, header: 'authorization' });
      const { call } = await servesOneTurn(stack, env, { model: SONNET_4_6.vertex, words: 8 });
      assert.equal(typeof call.body.thinking, 'object');
    }));
});
