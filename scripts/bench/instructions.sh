#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by callgrind:
#   bash scripts/bench/instructions.sh [N] [unary|stream]
# Runs the release gateway under `valgrind --tool=callgrind` in front of the
# canned upstream (`spillway-bench canned-upstream`), twice: once with a
# 50-request warm-up only, once with the warm-up and N (500) more requests on
# one keep-alive connection. The difference divided by N is the userland
# instruction count of one request, start-up excluded. Unlike CPU time it is
# the same from run to run whatever else the machine does, so it shows a
# cut of a few percent that CPU time on a shared 2-core box cannot. The
# kernel's share (two loopback hops) is not counted.
# SPILLWAY_BIN measures another gateway binary (e.g. a build of an older commit).
# PROXY=bare measures `spillway-bench bare-proxy` instead of the gateway: the
# floor, an HTTP/1.1 proxy that does nothing but the two hops.
# Writes both callgrind files and `per-function.txt` (the per-request
# difference by function, exclusive) to OUT. Needs valgrind and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-500}
MODE=${2:-unary}
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET/bench/instructions-$(date -u +%Y%m%dT%H%M%SZ)}
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  cargo build --release -p spillway -p spillway-bench -q
fi
mkdir -p "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cat > "$OUT/drive.py" <<'PY'
import http.client, json, sys
port, n, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "stream"
body = {"model": "claude-3-haiku@20240307", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello, Claude"}]}
if stream:
    body["stream"] = True
body = json.dumps(body)
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("POST", "/v1/messages", body, {"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    assert r.status == 200, (r.status, data)
PY
run() { # REQUESTS -> callgrind file
  local up gw upid vpid
  up=$(free_port); gw=$(free_port)
  "$TARGET/release/spillway-bench" canned-upstream --listen "127.0.0.1:$up" >/dev/null 2>&1 &
  upid=$!
  cat > "$OUT/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$gw"
auth = "none"
log_format = "json"
[upstream]
project = "spillway-bench"
regional_url = "http://127.0.0.1:$up"
global_url = "http://127.0.0.1:$up"
auth = "static"
token = "cost-upstream-token"
[quota]
requests_per_min = 4000000000
tokens_per_min = 1000000000000000
[batch]
sqlite_path = ":memory:"
[models."claude-3-haiku@20240307"]
regions = [{ name = "us-central1", requests_per_min = 4000000000, tokens_per_min = 1000000000000000 }]
TOML
  local proxy=("${SPILLWAY_BIN:-$TARGET/release/spillway}" serve --config "$OUT/gateway.toml")
  if [[ ${PROXY:-} == bare ]]; then
    proxy=("$TARGET/release/spillway-bench" bare-proxy --listen "127.0.0.1:$gw" --upstream "127.0.0.1:$up")
  fi
  RUST_LOG=info valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.$MODE.$1" \
    "${proxy[@]}" 2>"$OUT/gateway.$1.log" &
  vpid=$!
  for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$gw/healthz" && break; sleep 0.2; done
  python3 "$OUT/drive.py" "$gw" 50 "$MODE"
  if [[ $1 -gt 0 ]]; then python3 "$OUT/drive.py" "$gw" "$1" "$MODE"; fi
  kill "$vpid"; wait "$vpid" 2>/dev/null || true
  kill "$upid"; wait "$upid" 2>/dev/null || true
}
run 0
run "$N"
python3 - "$OUT/callgrind.$MODE.0" "$OUT/callgrind.$MODE.$N" "$N" > "$OUT/per-function.txt" <<'PY'
import re, subprocess, sys
def load(path):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout
    total, by_fn = 0, {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)", line)
        if not m:
            continue
        value, name = int(m.group(1).replace(",", "")), m.group(2)
        if "PROGRAM TOTALS" in name:
            total = value
        else:
            name = name.split(":", 1)[-1]
            by_fn[name] = by_fn.get(name, 0) + value
    return total, by_fn
(t0, f0), (t1, f1), n = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
print(f"instructions per request: {(t1 - t0) // n}")
rows = sorted((((f1.get(k, 0) - f0.get(k, 0)) / n, k) for k in set(f0) | set(f1)), reverse=True)
for v, k in rows[:60]:
    print(f"{v:10.0f}  {k[:160]}")
PY
head -1 "$OUT/per-function.txt"
echo "(per function: $OUT/per-function.txt)"
