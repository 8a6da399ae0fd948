// The real binaries, run as subprocesses, for the Claude Code test.
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
// Self-contained (tests/node/lib/stack.mjs loads the TypeScript SDKs, which
// this package does not install).

import { execFileSync, spawn } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import { track } from './children.mjs';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const TENANT = 'claude-code';
export const CLIENT_KEY = 'sk-spw-claude-code-0123456789abcdefghijklmnopqrs';
export const UPSTREAM_TOKEN = 'sim-upstream-token-claude-code';

const STARTUP_TIMEOUT_MS = 30_000;
const POLL_MS = 50;
const STOP_TIMEOUT_MS = 10_000;

/** The binary named by `envVar` (or its default); throws a clear error if it is missing. */
function binary(envVar, defaultPath) {
  const p = process.env[envVar] || path.join(REPO, defaultPath);
  let ok = false;
  try {
    ok = statSync(p).isFile();
  } catch {
    ok = false;
  }
  if (!ok) throw new Error(`${envVar}: ${p} not found; run \`cargo build --bins\` in ${REPO} first`);
  return p;
}

class Proc {
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
    const stopped = await Promise.race([this.exited.then(() => true), sleep(STOP_TIMEOUT_MS, false, { ref: false })]);
    if (!stopped) {
      this.child.kill('SIGKILL');
      await this.exited;
    }
  }
}

/** One HTTP call with an optional JSON body: `{ status, body }` (parsed JSON, text, or null). */
export async function http(method, url, body) {
  const res = await fetch(url, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const raw = await res.text();
  let parsed = raw || null;
  try {
    parsed = raw ? JSON.parse(raw) : null;
  } catch {
    // not JSON (e.g. /metrics): keep the text
  }
  return { status: res.status, body: parsed };
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

/**
 * The test layer over the config files: client auth on with one tenant;
 * upstream pointed at the simulator with the simulator's bearer. Nothing
 * about quotas: the demo's (or the example's) limits are the ones in force.
 */
function overlay(simUrl, port, keySha256) {
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

[tenants.${TENANT}]
key_sha256 = ${q(keySha256)}
`;
}

/**
 * Starts a simulator and a gateway of their own. `configs`: repo-relative
 * config files layered between config/demo.toml and the test overlay.
 * Call `stop()` when done.
 */
export async function startStack({ configs = [] } = {}) {
  const bins = { spillway: binary('SPILLWAY_BIN', 'target/debug/spillway'), sim: binary('SPILLWAY_SIM_BIN', 'target/debug/spillway-sim') };
  const dir = mkdtempSync(path.join(tmpdir(), 'spillway-claude-code-'));
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
    const config = path.join(dir, 'claude-code-tests.toml');
    writeFileSync(config, overlay(simUrl, port, digest));
    const layers = ['config/demo.toml', ...configs].flatMap((c) => ['--config', path.join(REPO, c)]);
    // Info level: the gateway's log names every request it served.
    const gateway = new Proc('spillway', [bins.spillway, 'serve', ...layers, '--config', config], dir, {
      RUST_LOG: 'info',
    });
    procs.push(gateway);
    const url = `http://127.0.0.1:${port}`;
    await gateway.waitFor('answer on GET /healthz', async () => {
      try {
        return (await http('GET', `${url}/healthz`)).status === 200 ? url : undefined;
      } catch {
        return undefined;
      }
    });

    /** Calls the simulator's control API; throws on a non-2xx answer. */
    const simCall = async (method, p, body) => {
      const { status, body: parsed } = await http(method, `${simUrl}${p}`, body);
      if (status < 200 || status >= 300) throw new Error(`${method} ${p}: ${status} ${JSON.stringify(parsed)}`);
      return parsed;
    };
    /** `spillway_requests_total` of the test tenant, by outcome, from /metrics. */
    const tenantRequests = async () => {
      const { body } = await http('GET', `${url}/metrics`);
      const counts = {};
      for (const line of String(body).split('\n')) {
        const m = line.match(/^spillway_requests_total\{([^}]*)\} (\d+)/);
        if (!m || !m[1].includes(`tenant="${TENANT}"`)) continue;
        const outcome = (m[1].match(/outcome="([^"]*)"/) || [])[1];
        counts[outcome] = (counts[outcome] || 0) + Number(m[2]);
      }
      return counts;
    };
    return { url, simUrl, key: CLIENT_KEY, dir, sim: simCall, tenantRequests, gateway, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}
