#!/usr/bin/env bash
# Spillway proxy benchmark, end to end and loopback only:
#   bash scripts/bench/proxy.sh
# builds release binaries, starts the Vertex simulator and the gateway on free
# 127.0.0.1 ports, measures unary and streaming latency (fixed rate, with
# coordinated-omission correction) and closed-loop throughput, directly
# against the simulator and through Spillway, then memory with N open streams,
# prints a table and stops everything. Bounded: about 8 minutes with defaults.
#
# Knobs (environment): SECS (fixed-rate run length, 30), MAX_SECS (closed-loop
# run length, 20), UNARY_QPS (1000), STREAM_QPS (500), CONNS (50),
# MAX_CONNS (64), STREAMS (1000), MEM_ROUNDS (3), PIN (1: oha on core 0, sim + gateway on
# core 1; 0: no pinning), OUT (result folder), SKIP_BUILD (1: use built bins),
# CARGO_TARGET_DIR (where the built bins are, as for cargo), SPILLWAY_BIN (measure
# this gateway binary instead, e.g. one built with another allocator), PARTS
# (which runs: any of "unary stream max paced info memory redis"; default all
# but redis), REDIS_URL (for the redis part: the same unary and streaming runs
# with `quota.store = "redis"`, with leases (the default) and without, against
# this Redis, e.g. a private
# `redis-server --port 6391 --save ''`; the part is added when this is set).
# Needs `oha` on PATH (cargo install oha --locked).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

SECS=${SECS:-30}
MAX_SECS=${MAX_SECS:-20}
UNARY_QPS=${UNARY_QPS:-1000}
STREAM_QPS=${STREAM_QPS:-500}
CONNS=${CONNS:-50}
MAX_CONNS=${MAX_CONNS:-64}
STREAMS=${STREAMS:-1000}
PIN=${PIN:-1}
DEFAULT_PARTS="unary stream max paced info memory${REDIS_URL:+ redis}"
PARTS=" ${PARTS:-$DEFAULT_PARTS} "
part() { [[ $PARTS == *" $1 "* ]]; }
OUT=${OUT:-$ROOT/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

command -v oha >/dev/null || { echo "oha not found: cargo install oha --locked" >&2; exit 1; }
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  cargo build --release --workspace --bins -q
fi
# Copy the binaries so a concurrent rebuild cannot swap them mid-run.
BIN=$OUT/bin
mkdir -p "$BIN"
TARGET=${CARGO_TARGET_DIR:-target}
cp "$TARGET/release/spillway" "$TARGET/release/spillway-sim" "$TARGET/release/spillway-bench" "$BIN/"
if [[ -n ${SPILLWAY_BIN:-} ]]; then cp "$SPILLWAY_BIN" "$BIN/spillway"; fi

ulimit -n "$(ulimit -Hn)"  # 1,000 streams need ~1,000 fds in each process

if [[ $PIN == 1 && $(nproc) -ge 2 ]]; then
  LOAD_PIN=(taskset -c 0)   # the load generator
  SUT_PIN=(taskset -c 1)    # the simulator and the gateway
else
  LOAD_PIN=()
  SUT_PIN=()
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_http() { # URL: until it answers at all, at most 10 s
  for _ in $(seq 100); do
    curl -s -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "nothing answers at $1" >&2
  return 1
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if [[ -n ${COMMIT:-} ]]; then
    echo "commit: $COMMIT (given; tree exported with git archive)"
  else
    echo "commit: $(git rev-parse HEAD) ($(git status --porcelain | wc -l) uncommitted paths)"
  fi
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "kernel: $(uname -sr)"
  echo "memory: $(free -h | awk '/^Mem:/ {print $2 " total, " $7 " available"}')"
  echo "rustc: $(rustc --version)"
  echo "oha: $(oha --version)"
  echo "pinning: ${LOAD_PIN[*]:-none} for oha, ${SUT_PIN[*]:-none} for sim + gateway"
  echo "gateway binary: ${SPILLWAY_BIN:-built from this tree} (sha256 $(sha256sum "$BIN/spillway" | cut -c1-16))"
  echo "parts:${PARTS% }"
} | tee "$OUT/machine.txt"

SIM_PORT=$(free_port)
SIM=http://127.0.0.1:$SIM_PORT
# Quotas far above anything this run can send: the simulator must never 429.
cat > "$OUT/sim.toml" <<TOML
window_secs = 60
[[regions]]
name = "us-central1"
[[regions.models]]
id = "claude-3-haiku@20240307"
requests_per_min = 4000000000
tokens_per_min = 1000000000000000
[[regions]]
name = "europe-west4"
[[regions.models]]
id = "claude-3-haiku@20240307"
requests_per_min = 4000000000
tokens_per_min = 1000000000000000
TOML
RUST_LOG=warn "${SUT_PIN[@]}" "$BIN/spillway-sim" --listen "127.0.0.1:$SIM_PORT" \
  --config "$OUT/sim.toml" --bearer demo-upstream-token >"$OUT/sim.out" 2>"$OUT/sim.err" &
PIDS+=($!)
wait_http "$SIM/_sim/counters"

GW_PORT=$(free_port)
GW=http://127.0.0.1:$GW_PORT
# Layered over config/demo.toml: the simulator upstream, no gateway-side caps.
# The quota engine is enforced on the request path: every budget is huge so it
# never limits (a 429 would show in `errors`), and the scheduler's queue holds
# far more than the STREAMS held open by the memory run.
cat > "$OUT/bench.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"

[upstream]
regional_url = "$SIM"
global_url = "$SIM"
pool_max_idle_per_host = 4096

[quota]
requests_per_min = 4000000000
tokens_per_min = 1000000000000000

[scheduler]
max_queue = 1000000

[models."claude-3-haiku@20240307"]
regions = [
  { name = "us-central1", requests_per_min = 4000000000, tokens_per_min = 1000000000000000 },
  { name = "europe-west4", requests_per_min = 4000000000, tokens_per_min = 1000000000000000 },
]
TOML

GW_PID=
start_gateway() { # LOG_LEVEL [EXTRA_CONFIG]
  stop_gateway
  local extra=()
  if [[ -n ${2:-} ]]; then extra=(--config "$2"); fi
  RUST_LOG=$1 "${SUT_PIN[@]}" "$BIN/spillway" serve --config config/demo.toml \
    --config "$OUT/bench.toml" "${extra[@]}" >>"$OUT/gateway.$1.log" 2>&1 &
  GW_PID=$!
  PIDS+=($GW_PID)
  wait_http "$GW/healthz"
}
stop_gateway() {
  if [[ -n $GW_PID ]]; then
    kill "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
    GW_PID=
  fi
}

UNARY='{"model":"claude-3-haiku@20240307","max_tokens":64,"messages":[{"role":"user","content":"Hello, Claude"}]}'
UNARY_VERTEX='{"anthropic_version":"vertex-2023-10-16","max_tokens":64,"messages":[{"role":"user","content":"Hello, Claude"}]}'
STREAM='{"model":"claude-3-haiku@20240307","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hello, Claude"}]}'
STREAM_VERTEX='{"anthropic_version":"vertex-2023-10-16","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hello, Claude"}]}'
VPATH=/v1/projects/spillway-demo/locations/us-central1/publishers/anthropic/models/claude-3-haiku@20240307
AUTH='authorization: Bearer demo-upstream-token'

# Sanity: both paths answer 200 before measuring.
curl -sf "$SIM$VPATH:rawPredict" -H "$AUTH" -H 'content-type: application/json' -d "$UNARY_VERTEX" >/dev/null
start_gateway warn
curl -sf "$GW/v1/messages" -H 'content-type: application/json' -d "$UNARY" >/dev/null

: >"$OUT/commands.txt"
run_oha() { # NAME URL BODY [HEADER] -- extra oha args
  local name=$1 url=$2 body=$3; shift 3
  local hdr=()
  if [[ $1 != -- ]]; then hdr=(-H "$1"); shift; fi
  shift # --
  local cmd=(oha --no-tui --output-format json -m POST -T application/json
    "${hdr[@]}" -d "$body" "$@" "$url")
  { printf '%s: ' "$name"; printf '%q ' "${LOAD_PIN[@]}" "${cmd[@]}"; echo; } >>"$OUT/commands.txt"
  "${LOAD_PIN[@]}" "${cmd[@]}" >"$OUT/$name.json"
  python3 "$ROOT/scripts/bench/summarize.py" row "$name" "$OUT/$name.json"
}

# Short warm-up of both paths (connections, allocator), not recorded.
oha --no-tui --output-format quiet -m POST -T application/json -H "$AUTH" -d "$UNARY_VERTEX" \
  -c "$CONNS" -q "$UNARY_QPS" -z 3s "$SIM$VPATH:rawPredict"
oha --no-tui --output-format quiet -m POST -T application/json -d "$UNARY" \
  -c "$CONNS" -q "$UNARY_QPS" -z 3s "$GW/v1/messages"

# -w: requests in flight at the deadline are waited for, not counted as errors.
FIXED=(-z "${SECS}s" -w --latency-correction)
CLOSED=(-z "${MAX_SECS}s" -w)
if part unary; then
run_oha unary_direct   "$SIM$VPATH:rawPredict" "$UNARY_VERTEX" "$AUTH" -- -c "$CONNS" -q "$UNARY_QPS" "${FIXED[@]}"
run_oha unary_spillway "$GW/v1/messages"        "$UNARY"             -- -c "$CONNS" -q "$UNARY_QPS" "${FIXED[@]}"
fi
if part stream; then
run_oha stream_direct   "$SIM$VPATH:streamRawPredict" "$STREAM_VERTEX" "$AUTH" -- -c "$CONNS" -q "$STREAM_QPS" "${FIXED[@]}"
run_oha stream_spillway "$GW/v1/messages"             "$STREAM"             -- -c "$CONNS" -q "$STREAM_QPS" "${FIXED[@]}"
fi
if part max; then
run_oha unary_max_direct   "$SIM$VPATH:rawPredict" "$UNARY_VERTEX" "$AUTH" -- -c "$MAX_CONNS" "${CLOSED[@]}"
run_oha unary_max_spillway "$GW/v1/messages"        "$UNARY"             -- -c "$MAX_CONNS" "${CLOSED[@]}"
run_oha stream_max_direct   "$SIM$VPATH:streamRawPredict" "$STREAM_VERTEX" "$AUTH" -- -c "$MAX_CONNS" "${CLOSED[@]}"
run_oha stream_max_spillway "$GW/v1/messages"             "$STREAM"             -- -c "$MAX_CONNS" "${CLOSED[@]}"
fi

# Paced streams: the simulator waits PACE_MS between text deltas (12 tokens),
# so each SSE event is its own small write, as with a real model.
PACE_MS=${PACE_MS:-5}
PACE_QPS=${PACE_QPS:-200}
if part paced; then
curl -sf -X POST "$SIM/_sim/faults" -H 'content-type: application/json' \
  -d "{\"region\":\"us-central1\",\"kind\":{\"type\":\"delay\",\"first_token_ms\":0,\"per_token_ms\":$PACE_MS}}"
run_oha stream_paced_direct   "$SIM$VPATH:streamRawPredict" "$STREAM_VERTEX" "$AUTH" -- -c "$CONNS" -q "$PACE_QPS" "${FIXED[@]}"
run_oha stream_paced_spillway "$GW/v1/messages"             "$STREAM"             -- -c "$CONNS" -q "$PACE_QPS" "${FIXED[@]}"
curl -sf -X DELETE "$SIM/_sim/faults"
fi

# The default log level: one info line per request (to a file, as in production).
if part info; then
start_gateway info
oha --no-tui --output-format quiet -m POST -T application/json -d "$UNARY" \
  -c "$CONNS" -q "$UNARY_QPS" -z 3s "$GW/v1/messages"
run_oha unary_spillway_info     "$GW/v1/messages" "$UNARY" -- -c "$CONNS" -q "$UNARY_QPS" "${FIXED[@]}"
run_oha unary_max_spillway_info "$GW/v1/messages" "$UNARY" -- -c "$MAX_CONNS" "${CLOSED[@]}"
fi

# The shared store: admission (and settling) in Redis instead of memory.
if part redis; then
: "${REDIS_URL:?the redis part needs REDIS_URL}"
cat > "$OUT/redis.toml" <<TOML
[quota]
store = "redis"
redis_url = "$REDIS_URL"
redis_key_prefix = "bench$RANDOM$RANDOM:"
replicas = 1
TOML
start_gateway warn "$OUT/redis.toml"
oha --no-tui --output-format quiet -m POST -T application/json -d "$UNARY" \
  -c "$CONNS" -q "$UNARY_QPS" -z 3s "$GW/v1/messages"
run_oha unary_spillway_redis  "$GW/v1/messages" "$UNARY"  -- -c "$CONNS" -q "$UNARY_QPS" "${FIXED[@]}"
run_oha stream_spillway_redis "$GW/v1/messages" "$STREAM" -- -c "$CONNS" -q "$STREAM_QPS" "${FIXED[@]}"
# How many of those admissions leases answered without a round trip.
curl -sf "$GW/metrics" | grep -E '^spillway_(quota_store_lease|requests_total)' >"$OUT/redis_leases.txt" || true
# The same without leases: every admission one round trip to Redis.
sed 's/^replicas = 1$/replicas = 1\nredis_lease_ms = 0/' "$OUT/redis.toml" > "$OUT/redis_nolease.toml"
start_gateway warn "$OUT/redis_nolease.toml"
oha --no-tui --output-format quiet -m POST -T application/json -d "$UNARY" \
  -c "$CONNS" -q "$UNARY_QPS" -z 3s "$GW/v1/messages"
run_oha unary_spillway_redis_nolease  "$GW/v1/messages" "$UNARY"  -- -c "$CONNS" -q "$UNARY_QPS" "${FIXED[@]}"
run_oha stream_spillway_redis_nolease "$GW/v1/messages" "$STREAM" -- -c "$CONNS" -q "$STREAM_QPS" "${FIXED[@]}"
fi

# Memory: a fresh gateway, idle, then N streams held open by the simulator
# (1 s per token, 60 tokens), measured once all have their first event.
if part memory; then
start_gateway warn
sleep 1
curl -sf -X POST "$SIM/_sim/faults" -H 'content-type: application/json' \
  -d '{"region":"us-central1","kind":{"type":"delay","first_token_ms":0,"per_token_ms":1000}}'
MEM_CMD=("$BIN/spillway-bench" open-streams --url "$GW/v1/messages" --pid "$GW_PID" -n "$STREAMS" --hold-secs 3 --rounds "${MEM_ROUNDS:-3}")
{ printf 'memory: '; printf '%q ' "${LOAD_PIN[@]}" "${MEM_CMD[@]}"; echo; } >>"$OUT/commands.txt"
"${LOAD_PIN[@]}" "${MEM_CMD[@]}" | tee "$OUT/memory.txt"
curl -sf -X DELETE "$SIM/_sim/faults"
fi

stop_gateway
python3 "$ROOT/scripts/bench/summarize.py" table "$OUT" | tee "$OUT/summary.md"
echo "results in $OUT"
