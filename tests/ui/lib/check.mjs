// `npm test` runs this first (the `pretest` script): without the spillway
// binary or Chromium there is nothing to test, so stop with one clear
// message instead of a failure per test.
import { chromiumPath, spillwayBinary } from './demo.mjs';

try {
  console.log(`spillway: ${spillwayBinary()}\nchromium: ${chromiumPath()}`);
} catch (e) {
  console.error(`\n${e.message}\n`);
  process.exit(2);
}
