// Helpers the test files share.

import assert from 'node:assert/strict';
import { after, before } from 'node:test';

import { startStack } from './stack.mjs';

/**
 * One simulator and gateway for the whole file: started in a `before` hook,
 * stopped in an `after` hook. Returns the stack object, empty until the
 * `before` hook has run, then the one `startStack(options)` returns.
 * `onStart(stack)`: more setup, in the same hook (Node 20 runs a file's
 * top-level `before` hooks concurrently, so a second one would not see the
 * stack).
 */
export function stackForFile(options, onStart = () => {}) {
  const stack = {};
  before(async () => {
    Object.assign(stack, await startStack(options));
    await onStart(stack);
  }, { timeout: 60_000 });
  after(async () => {
    await stack.stop?.();
  }, { timeout: 30_000 });
  return stack;
}

/** The error `promise` rejects with (fails if it resolves). */
export async function rejection(promise) {
  try {
    await promise;
  } catch (e) {
    return e;
  }
  assert.fail('expected the call to fail');
}
