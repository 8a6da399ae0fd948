// The real binaries, run as subprocesses, for the TypeScript-SDK suite.
//
// Mirrors tests/python/conftest.py: `spillway-sim` (the simulated Vertex AI)
// on a free port, announced on stdout as `spillway-sim listening on URL`,
// and `spillway serve --config config/demo.toml --config <overlay>` in front
// of it, with client auth on and one tenant whose key digest comes from
// `spillway hash-key KEY`. Ready once GET /healthz answers 200.
//
// Binaries: $SPILLWAY_BIN and $SPILLWAY_SIM_BIN, defaulting to
// target/debug/spillway and target/debug/spillway-sim in the repo root.

import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

import Anthropic from '@anthropic-ai/sdk';
import { AnthropicVertex } from '@anthropic-ai/vertex-sdk';
import { OAuth2Client } from 'google-auth-library';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const CLIENT_KEY = 'sk-spw-sdk-tests-0123456789abcdefghijklmnopqrstuv';
export const UPSTREAM_TOKEN = 'sim-upstream-token-sdk-tests';

export const HAIKU = 'claude-3-haiku@20240307'; // Vertex form; served in us-central1 and europe-west4
export const HAIKU_ANTHROPIC = 'claude-3-haiku-20240307'; // Anthropic form, as the simulator answers
export const SONNET = 'claude-3-sonnet@20240229'; // routed to europe-west4, which the simulator lacks
export const CLIENTS = ['anthropic', 'vertex'];

const STARTUP_TIMEOUT_MS = 30_000;
const POLL_MS = 50;
const STOP_TIMEOUT_MS = 10_000;

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

// --- binaries -------------------------------------------------------------------

/** The binary named by `envVar` (or its default); throws a clear error if it is missing. */
export function binary(envVar, defaultPath) {
  const p = process.env[envVar] || path.join(REPO, defaultPath);
  let ok = false;
  try {
    ok = statSync(p).isFile();
  } catch {
    ok = false;
  }
  if (!ok) {
    throw new Error(
      `${envVar}: ${p} not found; run \`cargo build -p spillway -p spillway-sim\` in ${REPO} first, ` +
        `or point ${envVar} at the binary`,
    );
  }
  return p;
}

export function binaries() {
  return {
    spillway: binary('SPILLWAY_BIN', 'target/debug/spillway'),
    sim: binary('SPILLWAY_SIM_BIN', 'target/debug/spillway-sim'),
  };
}

// --- processes ------------------------------------------------------------------

const running = new Set();
// If the test process ends with children still up (a failed hook, a timeout,
// Ctrl-C, the runner going away), do not leave them behind.
const killChildren = () => {
  for (const child of running) child.kill('SIGKILL');
};
process.on('exit', killChildren);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    killChildren();
    process.kill(process.pid, signal); // then die of it, as without this handler
  });
}

class Proc {
  constructor(name, argv, dir) {
    this.name = name;
    this.stdoutPath = path.join(dir, `${name}.stdout`);
    this.stderrPath = path.join(dir, `${name}.stderr`);
    // Files, not pipes: a pipe nobody reads could fill up and block the child.
    const out = openSync(this.stdoutPath, 'w');
    const err = openSync(this.stderrPath, 'w');
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('SPILLWAY__')));
    this.child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', out, err], env });
    closeSync(out);
    closeSync(err);
    this.exitCode = undefined;
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exitCode = code ?? signal;
        running.delete(this.child);
        resolve();
      });
      this.child.once('error', (e) => {
        this.exitCode = `spawn error: ${e.message}`;
        running.delete(this.child);
        resolve();
      });
    });
    running.add(this.child);
  }

  stdout() {
    return existsSync(this.stdoutPath) ? readFileSync(this.stdoutPath, 'utf8') : '';
  }

  stderr() {
    return existsSync(this.stderrPath) ? readFileSync(this.stderrPath, 'utf8') : '';
  }

  fail(problem) {
    return new Error(
      `${this.name} ${problem}\n--- stderr ---\n${this.stderr().slice(-4000)}` +
        `\n--- stdout ---\n${this.stdout().slice(-4000)}`,
    );
  }

  /** Polls `probe` until it returns a value; throws with the process's output otherwise. */
  async waitFor(what, probe) {
    const deadline = Date.now() + STARTUP_TIMEOUT_MS;
    while (Date.now() < deadline) {
      if (this.exitCode !== undefined) throw this.fail(`exited (${this.exitCode}) before ${what}`);
      const value = await probe();
      if (value !== undefined && value !== null) return value;
      await sleep(POLL_MS);
    }
    throw this.fail(`gave no ${what} within ${STARTUP_TIMEOUT_MS / 1000} s`);
  }

  async stop() {
    if (this.exitCode !== undefined) return;
    this.child.kill('SIGTERM');
    // An unref'd timer: once the child is gone it must not keep this process alive.
    const stopped = await Promise.race([this.exited.then(() => true), sleep(STOP_TIMEOUT_MS, false, { ref: false })]);
    if (!stopped) {
      this.child.kill('SIGKILL');
      await this.exited;
    }
  }
}

// --- HTTP -------------------------------------------------------------------------

/** One HTTP call with an optional JSON body: `{ status, body }` (parsed JSON, text, or null). */
export async function httpJson(method, url, body) {
  const res = await fetch(url, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const raw = await res.text();
  let parsed = null;
  if (raw) {
    try {
      parsed = JSON.parse(raw);
    } catch {
      parsed = raw;
    }
  }
  return { status: res.status, body: parsed, headers: res.headers };
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// --- the stack ---------------------------------------------------------------------

/**
 * The test layer over config/demo.toml: client auth on with one tenant;
 * upstream pointed at the simulator with the simulator's bearer; Sonnet
 * routed to europe-west4, where the simulator does not offer it; batches in
 * a SQLite file of the stack's temp directory, polled every 200 ms, plus
 * whatever `[batch]` keys the caller adds (numbers, strings or booleans).
 */
function overlay(simUrl, port, keySha256, batch) {
  const q = JSON.stringify; // a JSON string of plain ASCII is a valid TOML basic string
  return `
[server]
listen = ${q(`127.0.0.1:${port}`)}
auth = "api_key"

[upstream]
regional_url = ${q(simUrl)}
global_url = ${q(simUrl)}
auth = "static"
token = ${q(UPSTREAM_TOKEN)}

[models."claude-3-sonnet@20240229"]
regions = [{ name = "europe-west4" }]

[tenants.sdk-tests]
key_sha256 = ${q(keySha256)}

[batch]
${Object.entries(batch)
  .map(([k, v]) => `${k} = ${q(v)}`)
  .join('\n')}
`;
}

/**
 * Starts a simulator and a gateway of their own; returns the stack. Call
 * `stop()` when done (an `after` hook). `batch`: extra `[batch]` settings,
 * e.g. `{ retry_base_ms: 100 }`.
 */
export async function startStack({ batch = {} } = {}) {
  const bins = binaries();
  const dir = mkdtempSync(path.join(tmpdir(), 'spillway-node-'));
  const procs = [];
  const stop = async () => {
    for (const p of procs.reverse()) await p.stop();
    if (!process.env.SPILLWAY_KEEP_TEST_LOGS) rmSync(dir, { recursive: true, force: true });
  };
  try {
    const sim = new Proc('spillway-sim', [bins.sim, '--listen', '127.0.0.1:0', '--bearer', UPSTREAM_TOKEN], dir);
    procs.push(sim);
    const prefix = 'spillway-sim listening on ';
    const simUrl = await sim.waitFor('listening line on stdout', () => {
      const line = sim
        .stdout()
        .split('\n')
        .find((l) => l.startsWith(prefix));
      return line ? line.slice(prefix.length).trim() : undefined;
    });

    const digest = execFileSync(bins.spillway, ['hash-key', CLIENT_KEY], { encoding: 'utf8' }).trim();
    const port = await freePort();
    const config = path.join(dir, 'sdk-tests.toml');
    writeFileSync(
      config,
      overlay(simUrl, port, digest, { sqlite_path: path.join(dir, 'batches.sqlite3'), poll_ms: 200, ...batch }),
    );

    const gateway = new Proc(
      'spillway',
      [bins.spillway, 'serve', '--config', path.join(REPO, 'config/demo.toml'), '--config', config],
      dir,
    );
    procs.push(gateway);
    const url = `http://127.0.0.1:${port}`;
    await gateway.waitFor('answer on GET /healthz', async () => {
      try {
        const { status } = await httpJson('GET', `${url}/healthz`);
        return status === 200 ? url : undefined;
      } catch {
        return undefined;
      }
    });

    /** Calls the simulator's control API; throws on a non-2xx answer. */
    const simCall = async (method, p, body) => {
      const { status, body: parsed } = await httpJson(method, `${simUrl}${p}`, body);
      if (status < 200 || status >= 300) throw new Error(`${method} ${p}: ${status} ${JSON.stringify(parsed)}`);
      return parsed;
    };
    return { url, simUrl, key: CLIENT_KEY, upstreamToken: UPSTREAM_TOKEN, dir, sim: simCall, gateway, stop };
  } catch (e) {
    await stop();
    throw e;
  }
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
