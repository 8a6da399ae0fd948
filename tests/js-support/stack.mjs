// The real binaries, run as subprocesses, for the Node test suites
// (tests/node: the TypeScript SDKs; tests/claude-code: the Claude Code CLI).
// Node built-ins only, so either package imports it by relative path
// without installing the other's dependencies.
//
// Started as tests/python/conftest.py starts them: `spillway-sim` (the
// simulated Vertex AI) on a free port, announced on stdout as
// `spillway-sim listening on URL`, and `spillway serve --config
// config/demo.toml [--config <more>] --config <overlay>` in front of it,
// with client auth on and one tenant whose key digest comes from
// `spillway hash-key KEY`. Ready once GET /healthz answers 200.
//
// Binaries: $SPILLWAY_BIN and $SPILLWAY_SIM_BIN, defaulting to
// target/debug/spillway and target/debug/spillway-sim in the repo root.

import { execFileSync, spawn } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

const STARTUP_TIMEOUT_MS = 30_000;
const POLL_MS = 50;
const STOP_TIMEOUT_MS = 10_000;

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

// --- child processes --------------------------------------------------------------

// Child processes that must not outlive the test process: the simulator, the
// gateway and anything else a suite tracks (a `claude` still running), when
// it ends with them still up (a failed hook, a timeout, Ctrl-C, the runner
// going away).
const running = new Set();

const killAll = () => {
  for (const child of running) child.kill('SIGKILL');
};
process.on('exit', killAll);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    killAll();
    process.kill(process.pid, signal); // then die of it, as without this handler
  });
}

/** Kills `child` if this process ends first; forgets it once it exits. */
export function track(child) {
  running.add(child);
  const forget = () => running.delete(child);
  child.once('exit', forget);
  child.once('error', forget);
  return child;
}

/** A child process with its stdout and stderr in files of `dir`. */
export class Proc {
  constructor(name, argv, dir, env = {}) {
    this.name = name;
    this.stdoutPath = path.join(dir, `${name}.stdout`);
    this.stderrPath = path.join(dir, `${name}.stderr`);
    // Files, not pipes: a pipe nobody reads could fill up and block the child.
    const out = openSync(this.stdoutPath, 'w');
    const err = openSync(this.stderrPath, 'w');
    // The environment's SPILLWAY__* variables would override the test config.
    const base = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('SPILLWAY__')));
    this.child = track(spawn(argv[0], argv.slice(1), { stdio: ['ignore', out, err], env: { ...base, ...env } }));
    closeSync(out);
    closeSync(err);
    this.exitCode = undefined;
    this.exited = new Promise((resolve) => {
      const done = (code) => {
        this.exitCode = code;
        resolve();
      };
      this.child.once('exit', (code, signal) => done(code ?? signal));
      this.child.once('error', (e) => done(`spawn error: ${e.message}`));
    });
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

/** One HTTP call with an optional JSON body: `{ status, body, headers }` (body: parsed JSON, text, or null). */
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
      parsed = raw; // not JSON (e.g. /metrics): keep the text
    }
  }
  return { status: res.status, body: parsed, headers: res.headers };
}

export function freePort() {
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

/** A TOML basic string: a JSON string of plain ASCII is one. */
export const tomlString = JSON.stringify;

/**
 * The test layer over the config files: client auth on with one tenant;
 * upstream pointed at the simulator with the simulator's bearer; then
 * `extra` (more TOML) as is.
 */
function overlay({ simUrl, port, upstreamToken, tenant, keySha256, extra }) {
  const q = tomlString;
  return `
[server]
listen = ${q(`127.0.0.1:${port}`)}
auth = "api_key"

[upstream]
regional_url = ${q(simUrl)}
global_url = ${q(simUrl)}
auth = "static"
token = ${q(upstreamToken)}

[tenants.${tenant}]
key_sha256 = ${q(keySha256)}
${extra}`;
}

/**
 * Starts a simulator and a gateway of their own; returns the stack. Call
 * `stop()` when done (an `after` hook).
 *
 * - `clientKey`, `tenant`: the one tenant and its key;
 * - `upstreamToken`: the simulator's bearer, the gateway's upstream token;
 * - `tmpPrefix`: the stack's directory, `$TMPDIR/<tmpPrefix>*` (kept when
 *   SPILLWAY_KEEP_TEST_LOGS is set), and `overlayName`, the overlay's file in it;
 * - `configs`: repo-relative config files layered between config/demo.toml
 *   and the overlay;
 * - `extraToml(dir)`: more TOML for the overlay (`dir`: the stack's directory);
 * - `gatewayEnv`: environment variables for the gateway.
 */
export async function startStack({
  clientKey,
  tenant,
  upstreamToken,
  tmpPrefix,
  overlayName,
  configs = [],
  extraToml = () => '',
  gatewayEnv = {},
}) {
  const bins = binaries();
  const dir = mkdtempSync(path.join(tmpdir(), tmpPrefix));
  const procs = [];
  const stop = async () => {
    for (const p of procs.reverse()) await p.stop();
    if (!process.env.SPILLWAY_KEEP_TEST_LOGS) rmSync(dir, { recursive: true, force: true });
  };
  try {
    const sim = new Proc('spillway-sim', [bins.sim, '--listen', '127.0.0.1:0', '--bearer', upstreamToken], dir);
    procs.push(sim);
    const prefix = 'spillway-sim listening on ';
    const simUrl = await sim.waitFor('listening line on stdout', () => {
      const line = sim
        .stdout()
        .split('\n')
        .find((l) => l.startsWith(prefix));
      return line ? line.slice(prefix.length).trim() : undefined;
    });

    const keySha256 = execFileSync(bins.spillway, ['hash-key', clientKey], { encoding: 'utf8' }).trim();
    const port = await freePort();
    const config = path.join(dir, overlayName);
    writeFileSync(config, overlay({ simUrl, port, upstreamToken, tenant, keySha256, extra: extraToml(dir) }));
    const layers = ['config/demo.toml', ...configs].flatMap((c) => ['--config', path.join(REPO, c)]);
    const gateway = new Proc('spillway', [bins.spillway, 'serve', ...layers, '--config', config], dir, gatewayEnv);
    procs.push(gateway);
    const url = `http://127.0.0.1:${port}`;
    await gateway.waitFor('answer on GET /healthz', async () => {
      try {
        return (await httpJson('GET', `${url}/healthz`)).status === 200 ? url : undefined;
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
    return { url, simUrl, key: clientKey, upstreamToken, dir, sim: simCall, gateway, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}
