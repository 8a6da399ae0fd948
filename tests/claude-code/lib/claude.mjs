// Runs the pinned Claude Code CLI (`claude -p`, print mode) in a hermetic
// environment: a new HOME and working directory, no variable of the
// caller's but PATH (no proxy, no ANTHROPIC_* or Google settings), no
// telemetry, error reports, update checks or other nonessential traffic.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { track } from '../../js-support/stack.mjs';

const HERE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const PACKAGE = '@anthropic-ai/claude-code';

/** How long one `claude` invocation may take before it is killed. */
export const INVOCATION_TIMEOUT_MS = 120_000;

/** The version package.json pins (an exact version, no range). */
export function pinnedVersion() {
  return JSON.parse(readFileSync(path.join(HERE, 'package.json'), 'utf8')).dependencies[PACKAGE];
}

/**
 * The installed CLI as `[file, ...args]`: the package's `bin/claude.exe`,
 * which its postinstall replaces with the platform package's native
 * binary; if an npm that skips install scripts left the 500-byte
 * placeholder there, the package's own `cli-wrapper.cjs` (which finds and
 * runs the same native binary). Throws a clear error if the package is not
 * installed.
 */
export function claudeCommand() {
  const require = createRequire(path.join(HERE, 'package.json'));
  let manifest;
  try {
    manifest = require.resolve(`${PACKAGE}/package.json`);
  } catch {
    throw new Error(`${PACKAGE} is not installed: run \`npm ci --prefix tests/claude-code\``);
  }
  const dir = path.dirname(manifest);
  const native = path.join(dir, 'bin', 'claude.exe');
  if (statSync(native).size > 1 << 20) return [native];
  return [process.execPath, path.join(dir, 'cli-wrapper.cjs')];
}

/** The settings every run gets: nothing but the CLI's own traffic to the gateway. */
const QUIET = {
  DISABLE_TELEMETRY: '1',
  DISABLE_ERROR_REPORTING: '1',
  DISABLE_AUTOUPDATER: '1',
  DISABLE_BUG_COMMAND: '1',
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: '1',
  CLAUDE_CODE_DISABLE_TERMINAL_TITLE: '1',
};

/** The environment of the first mode: the Anthropic API at the gateway. */
export function anthropicEnv(stack, { model, smallModel = model, key = stack.key }) {
  return {
    ANTHROPIC_BASE_URL: stack.url,
    ANTHROPIC_API_KEY: key,
    ANTHROPIC_MODEL: model,
    ANTHROPIC_DEFAULT_HAIKU_MODEL: smallModel,
    ANTHROPIC_SMALL_FAST_MODEL: smallModel,
  };
}

/**
 * The environment of the second mode: Vertex AI at the gateway, Google
 * auth skipped, the client key in a custom header (`header` is
 * `x-api-key` or `authorization`).
 */
export function vertexEnv(stack, { model, smallModel = model, header = 'x-api-key', key = stack.key }) {
  const value = header === 'authorization' ? `Authorization: Bearer ${key}` : `x-api-key: ${key}`;
  return {
    CLAUDE_CODE_USE_VERTEX: '1',
    CLAUDE_CODE_SKIP_VERTEX_AUTH: '1',
    ANTHROPIC_VERTEX_BASE_URL: `${stack.url}/v1`,
    ANTHROPIC_VERTEX_PROJECT_ID: 'claude-code-tests',
    CLOUD_ML_REGION: 'global',
    ANTHROPIC_CUSTOM_HEADERS: value,
    ANTHROPIC_MODEL: model,
    ANTHROPIC_DEFAULT_HAIKU_MODEL: smallModel,
    ANTHROPIC_SMALL_FAST_MODEL: smallModel,
  };
}

/**
 * `claude -p PROMPT --output-format json` with `env` on top of the quiet,
 * hermetic base. Resolves to `{ code, signal, stdout, stderr, result, ms }`
 * (`result`: the parsed JSON summary, or null); never rejects on a bad exit.
 */
export function runClaude(prompt, env, { timeoutMs = INVOCATION_TIMEOUT_MS } = {}) {
  const home = mkdtempSync(path.join(tmpdir(), 'claude-code-home-'));
  const cwd = mkdtempSync(path.join(tmpdir(), 'claude-code-cwd-'));
  const fullEnv = { PATH: process.env.PATH || '/usr/bin:/bin', HOME: home, TMPDIR: tmpdir(), ...QUIET, ...env };
  const started = Date.now();
  return new Promise((resolve) => {
    const [file, ...args] = claudeCommand();
    const child = track(
      spawn(file, [...args, '-p', prompt, '--output-format', 'json'], {
        cwd,
        env: fullEnv,
        stdio: ['ignore', 'pipe', 'pipe'],
        timeout: timeoutMs,
        killSignal: 'SIGKILL',
      }),
    );
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const finish = (code, signal) => {
      rmSync(home, { recursive: true, force: true });
      rmSync(cwd, { recursive: true, force: true });
      let result = null;
      try {
        result = JSON.parse(stdout);
      } catch {
        result = null;
      }
      resolve({ code, signal, stdout, stderr, result, ms: Date.now() - started });
    };
    child.once('error', (e) => {
      stderr += `spawn error: ${e.message}`;
      finish(null, null);
    });
    child.once('close', finish);
  });
}

/** `claude --version`'s output. */
export function claudeVersion() {
  const home = mkdtempSync(path.join(tmpdir(), 'claude-code-home-'));
  return new Promise((resolve, reject) => {
    const [file, ...args] = claudeCommand();
    const child = spawn(file, [...args, '--version'], {
      env: { PATH: process.env.PATH || '/usr/bin:/bin', HOME: home, ...QUIET },
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 30_000,
    });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    child.once('error', reject);
    child.once('close', (code) => {
      rmSync(home, { recursive: true, force: true });
      if (code === 0) resolve(out.trim());
      else reject(new Error(`claude --version: exit ${code}: ${out}`));
    });
  });
}
