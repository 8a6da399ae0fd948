// Child processes that must not outlive the test process: the simulator,
// the gateway and any `claude` still running when it ends (a failed hook,
// a timeout, Ctrl-C, the runner going away).

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
