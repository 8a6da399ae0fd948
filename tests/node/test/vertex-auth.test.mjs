// How `AnthropicVertex` (@anthropic-ai/vertex-sdk) authenticates to Spillway.
//
// The client takes its credentials only from Google auth: `authClient` (any
// object with an async `getRequestHeaders()`), `googleAuth`, or Application
// Default Credentials. Its `accessToken` option is stored but never sent,
// so the Spillway key goes in an `authClient` that returns it as a bearer:
// google-auth-library's own `OAuth2Client` holding the key as its access
// token (what the README shows: it type-checks as the `AuthClient` the
// option is declared as), or, in plain JavaScript, any object with
// `getRequestHeaders`. These tests pin what the README says, for the pinned
// versions.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import Anthropic from '@anthropic-ai/sdk';
import { AnthropicVertex } from '@anthropic-ai/vertex-sdk';
import { VERSION as VERTEX_SDK_VERSION } from '@anthropic-ai/vertex-sdk/version';
import { OAuth2Client } from 'google-auth-library';

import { HAIKU, HAIKU_ANTHROPIC, ask, bearerAuthClient, upstreamTotal } from '../lib/stack.mjs';
import { rejection, stackForFile } from '../lib/testing.mjs';

const TEST = { timeout: 30_000 };

const stack = stackForFile();

function vertex(options) {
  return new AnthropicVertex({
    baseURL: `${stack.url}/v1`,
    region: 'us-east5',
    projectId: 'unused',
    maxRetries: 0,
    ...options,
  });
}

function create(client) {
  return client.messages.create({ model: HAIKU, max_tokens: 64, messages: ask(3) });
}

describe(`AnthropicVertex ${VERTEX_SDK_VERSION}`, () => {
  it('authClient = { getRequestHeaders } returning the key as a bearer: served', TEST, async () => {
    const calls = [];
    const authClient = {
      getRequestHeaders: async () => {
        calls.push(Date.now());
        return new Headers({ Authorization: `Bearer ${stack.key}` });
      },
    };
    const client = vertex({ authClient });
    const message = await create(client);
    assert.equal(message.model, HAIKU_ANTHROPIC);
    assert.equal(message.usage.output_tokens, 3);
    await client.messages.countTokens({ model: HAIKU, messages: ask(3) });
    assert.equal(calls.length, 2, 'asked for headers once per request');
    // What went upstream is the gateway's own token, not the client's key.
    const last = (await stack.sim('GET', '/_sim/requests')).at(-1);
    assert.equal(last.authorization, `Bearer ${stack.upstreamToken}`);
  });

  it("authClient = google-auth-library's OAuth2Client with the key as access token (the README's form)", TEST, async () => {
    const authClient = new OAuth2Client();
    authClient.setCredentials({ access_token: stack.key });
    const client = vertex({ authClient });
    assert.equal(client.accessToken, null);
    const message = await create(client);
    assert.equal(message.model, HAIKU_ANTHROPIC);
    assert.equal(message.usage.output_tokens, 3);
    const stream = client.messages.stream({ model: HAIKU, max_tokens: 64, messages: ask(4) });
    const deltas = [];
    stream.on('text', (d) => deltas.push(d));
    const final = await stream.finalMessage();
    assert.equal(final.usage.output_tokens, 4);
    assert.equal(deltas.join(''), final.content[0].text);
    const counted = await client.messages.countTokens({ model: HAIKU, messages: ask(3) });
    assert.equal(counted.input_tokens, message.usage.input_tokens);
  });

  it('authClient with a wrong key: AuthenticationError, nothing upstream', TEST, async () => {
    const before = await upstreamTotal(stack);
    const error = await rejection(create(vertex({ authClient: bearerAuthClient('sk-spw-wrong') })));
    assert.ok(error instanceof Anthropic.AuthenticationError, `got ${error}`);
    assert.equal(error.status, 401);
    assert.equal(await upstreamTotal(stack), before);
  });

  it('accessToken alone is never sent: "Failed to acquire Google OAuth credentials"', TEST, async () => {
    // lib/stack.mjs removes every source of Google credentials (no
    // GOOGLE_APPLICATION_CREDENTIALS, an empty CLOUDSDK_CONFIG, no
    // metadata server), as on a machine that only has a Spillway key.
    const before = await upstreamTotal(stack);
    const client = vertex({ accessToken: stack.key });
    assert.equal(client.accessToken, stack.key, 'the option is accepted and stored');
    const error = await rejection(create(client));
    assert.ok(error instanceof Anthropic.APIConnectionError, `got ${error}`);
    assert.match(error.message, /Failed to acquire Google OAuth credentials/);
    assert.equal(await upstreamTotal(stack), before, 'no request reached upstream');
  });

  it('getRequestHeaders must resolve to a Headers, not a plain object', TEST, async () => {
    // The client calls `.get('x-goog-user-project')` on what it returns
    // (unless the auth client has a `projectId`).
    const client = vertex({
      authClient: { getRequestHeaders: async () => ({ Authorization: `Bearer ${stack.key}` }) },
    });
    const error = await rejection(create(client));
    assert.ok(error instanceof TypeError, `got ${error}`);
    assert.match(error.message, /\.get is not a function/);
  });

  it('has no batches and no models (the Anthropic client has them)', TEST, () => {
    const client = vertex({ authClient: bearerAuthClient(stack.key) });
    assert.equal(client.messages.batches, undefined);
    assert.equal(client.models, undefined);
    assert.equal(typeof client.messages.countTokens, 'function');
  });
});
