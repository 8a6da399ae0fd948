#!/usr/bin/env bash
# What one request costs the gateway, beside the direct path, in one run:
#   bash scripts/bench/cost.sh [extra `spillway-bench cost` flags]
# Builds the release binaries, then runs `spillway-bench cost` (see
# crates/spillway-bench/src/cost/mod.rs): the canned upstream, the release
# gateway with info-level JSON request logs, and a closed-loop driver.
# Reports gateway CPU µs per request (from /proc), added latency at c=1 and
# closed-loop throughput at c=50, for unary and streaming requests.
#
# Knobs (environment): PIN (1, the default: for c=1 latency all on CPU 0;
# for throughput and CPU per request the gateway on CPU 1, driver and
# upstream on CPU 0, so the gateway's CPU time is not taken by the others;
# 0: no pinning, everything shares both cores), SECS (measured seconds per
# run, 10), ROUNDS (3), OUT (result folder), SKIP_BUILD (1: use built bins),
# FLOOR (1, the default: also the bare proxy, `spillway-bench bare-proxy`, as
# a third path on the gateway's CPUs, the floor two hops cost on this box),
# CARGO_TARGET_DIR, SPILLWAY_BIN (measure this gateway binary instead, e.g. a
# build of an older commit, for a before/after in one sitting). About 9
# minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET/bench/cost-$(date -u +%Y%m%dT%H%M%SZ)}
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  cargo build --release -p spillway -p spillway-bench -q
fi
mkdir -p "$OUT"
# Copy the binaries so a concurrent rebuild cannot swap them mid-run.
cp "$TARGET/release/spillway" "$TARGET/release/spillway-bench" "$OUT/"
if [[ -n ${SPILLWAY_BIN:-} ]]; then cp "$SPILLWAY_BIN" "$OUT/spillway"; fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD) ($(git status --porcelain | wc -l) uncommitted paths)"
  echo "nproc: $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "kernel: $(uname -sr); load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "gateway sha256: $(sha256sum "$OUT/spillway" | cut -c1-16)"
} | tee "$OUT/machine.txt"
ulimit -n "$(ulimit -Hn)"
args=(cost --spillway "$OUT/spillway" --secs "${SECS:-10}" --rounds "${ROUNDS:-3}")
if [[ ${FLOOR:-1} == 1 ]]; then args+=(--floor); fi
args+=("$@")
if [[ ${PIN:-1} == 1 && $(nproc) -ge 2 ]]; then
  # c=1 latency: all three processes on one CPU. On these VMs a wake-up
  # across CPUs costs ~90 µs (an IPI through the hypervisor): with the
  # gateway on a CPU of its own, each of its four hops per request would
  # pay one, and the figure would measure the hypervisor.
  taskset -c 0 "$OUT/spillway-bench" "${args[@]}" --parts latency --gateway-cpus 0 --out "$OUT/latency"
  # Throughput and CPU per request: the gateway alone on CPU 1.
  taskset -c 0 "$OUT/spillway-bench" "${args[@]}" --parts unary,stream --gateway-cpus 1 --out "$OUT/throughput"
else
  "$OUT/spillway-bench" "${args[@]}" --out "$OUT"
fi
