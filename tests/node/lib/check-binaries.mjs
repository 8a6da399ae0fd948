// `npm test` runs this first (the `pretest` script): without the binaries
// there is nothing to test, so stop with one clear message instead of a
// failure per test file.
import { binaries } from './stack.mjs';

try {
  const { spillway, sim } = binaries();
  console.log(`spillway: ${spillway}\nspillway-sim: ${sim}`);
} catch (e) {
  console.error(`\nThe Spillway binaries are missing.\n${e.message}\n`);
  process.exit(2);
}
