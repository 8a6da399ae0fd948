// The stack (simulator and gateway, tests/js-support/stack.mjs) for the
// TypeScript-SDK suite, and its SDK clients.
//
// As tests/python/conftest.py: client auth on with one tenant, Sonnet routed
// to europe-west4, where the simulator does not offer it, and batches in a
// SQLite file of the stack's temp directory.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import Anthropic from '@anthropic-ai/sdk';
import { AnthropicVertex } from '@anthropic-ai/vertex-sdk';
import { OAuth2Client } from 'google-auth-library';

import * as support from '../../js-support/stack.mjs';

export { REPO, binaries, binary, httpJson } from '../../js-support/stack.mjs';

export const CLIENT_KEY = 'sk-spw-sdk-tests-0123456789abcdefghijklmnopqrstuv';
export const UPSTREAM_TOKEN = 'sim-upstream-token-sdk-tests';

export const HAIKU = 'claude-3-haiku@20240307'; // Vertex form; served in us-central1 and europe-west4
export const HAIKU_ANTHROPIC = 'claude-3-haiku-20240307'; // Anthropic form, as the simulator answers
export const SONNET = 'claude-3-sonnet@20240229'; // routed to europe-west4, which the simulator lacks
export const CLIENTS = ['anthropic', 'vertex'];

// --- a hermetic environment ---------------------------------------------------

// The SDKs read ANTHROPIC_* (base URLs, keys, profiles, custom headers) and
// CLOUD_ML_REGION; google-auth-library reads the Google ones. Ignore the
// caller's, so the suite runs the same everywhere. The children get the same
// environment minus SPILLWAY__* (which would override the test config).
for (const name of Object.keys(process.env)) {
  if (
    name.startsWith('ANTHROPIC_') ||
    name.startsWith('SPILLWAY__') ||
    name === 'CLOUD_ML_REGION' ||
    name === 'GOOGLE_APPLICATION_CREDENTIALS' ||
    name === 'GOOGLE_CLOUD_PROJECT' ||
    name === 'GCLOUD_PROJECT' ||
    name === 'GCE_METADATA_HOST' ||
    name === 'GCE_METADATA_IP'
  ) {
    delete process.env[name];
  }
}
// No Google credentials either: no gcloud ADC file (an empty config dir) and
// no metadata-server probe, so a Vertex client without `authClient` fails the
// same, fast, everywhere.
process.env.CLOUDSDK_CONFIG = mkdtempSync(path.join(tmpdir(), 'spillway-node-gcloud-'));
process.env.METADATA_SERVER_DETECTION = 'none';
process.on('exit', () => rmSync(process.env.CLOUDSDK_CONFIG, { recursive: true, force: true }));

// --- the stack ---------------------------------------------------------------------

/**
 * The suite's layer over the shared overlay: Sonnet routed to europe-west4,
 * where the simulator does not offer it; batches in a SQLite file of the
 * stack's temp directory, polled every 200 ms, plus whatever `[batch]` keys
 * the caller adds (numbers, strings or booleans).
 */
function extraToml(dir, batch) {
  const q = support.tomlString;
  const settings = { sqlite_path: path.join(dir, 'batches.sqlite3'), poll_ms: 200, ...batch };
  return `
[models."claude-3-sonnet@20240229"]
regions = [{ name = "europe-west4" }]

[batch]
${Object.entries(settings)
  .map(([k, v]) => `${k} = ${q(v)}`)
  .join('\n')}
`;
}

/**
 * Starts a simulator and a gateway of their own; returns the stack. Call
 * `stop()` when done (an `after` hook). `batch`: extra `[batch]` settings,
 * e.g. `{ retry_base_ms: 100 }`.
 */
export function startStack({ batch = {} } = {}) {
  return support.startStack({
    clientKey: CLIENT_KEY,
    tenant: 'sdk-tests',
    upstreamToken: UPSTREAM_TOKEN,
    tmpPrefix: 'spillway-node-',
    overlayName: 'sdk-tests.toml',
    extraToml: (dir) => extraToml(dir, batch),
  });
}

// --- SDK clients ---------------------------------------------------------------------

/**
 * What `authClient` must provide to @anthropic-ai/vertex-sdk 1.x: an async
 * `getRequestHeaders()` resolving to a `Headers` (the client calls
 * `.get('x-goog-user-project')` on it when the auth client has no
 * `projectId`). Its headers go on every request.
 */
export function bearerAuthClient(key) {
  return { getRequestHeaders: async () => new Headers({ Authorization: `Bearer ${key}` }) };
}

/**
 * The README's form: google-auth-library's own OAuth2Client holding the
 * Spillway key as its access token (no expiry, no refresh token: it sends
 * `authorization: Bearer KEY` as is).
 */
export function keyAsAccessToken(key) {
  const client = new OAuth2Client();
  client.setCredentials({ access_token: key });
  return client;
}

/** An SDK client of `kind` ('anthropic' | 'vertex') pointed at the gateway, authenticating with `key`. */
export function makeClient(kind, stack, { key = stack.key, ...options } = {}) {
  if (kind === 'vertex') {
    return new AnthropicVertex({
      baseURL: `${stack.url}/v1`,
      region: 'us-east5',
      projectId: 'some-project',
      authClient: keyAsAccessToken(key),
      ...options,
    });
  }
  return new Anthropic({ baseURL: stack.url, apiKey: key, ...options });
}

/** A one-turn conversation asking the simulator for `outputTokens` tokens. */
export function ask(outputTokens, text = 'Tell me something.') {
  return [{ role: 'user', content: `${text} SIM_OUTPUT_TOKENS=${outputTokens}` }];
}

/** Predict calls the simulator has received so far. */
export async function upstreamTotal(stack) {
  return (await stack.sim('GET', '/_sim/counters')).total_requests;
}
