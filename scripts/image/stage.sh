#!/usr/bin/env bash
# Stages the build context of the container image (Containerfile at the repo
# root, FROM scratch): everything the image holds, laid out under
# target/image-context/ as it will be in the image, because a scratch image
# has no shell, no ldd and no host to copy from at build time.
#
#   scripts/image/stage.sh            # then:
#   podman build -f Containerfile $(sed 's/^/--build-arg /' target/image-context/build-args) \
#       -t spillway:dev target/image-context
#   (docker build takes the same arguments)
#
# Inputs (environment):
#   SPILLWAY_BIN      the gateway binary (default target/release/spillway; a
#                     release build: `cargo build --release -p spillway`)
#   IMAGE_CONTEXT     where to stage (default target/image-context; emptied first)
#   IMAGE_DEBUG_DIR   where the binary's debug info goes (default target/image)
#   CA_BUNDLE         the CA certificates (default /etc/ssl/certs/ca-certificates.crt,
#                     Debian's ca-certificates package)
#   IMAGE_SOURCE      the org.opencontainers.image.source label (default: the
#                     git remote "origin", if any)
#
# Layout of the context:
#   rootfs/                 copied to / (owned by root, read-only at run time)
#     usr/local/bin/spillway          the binary, debug info stripped (symbols
#                                     kept, so a backtrace still names functions)
#     lib/..., lib64/...              the shared libraries `ldd` resolves, at the
#                                     paths the dynamic loader looks them up
#     etc/ssl/certs/ca-certificates.crt   roots for HTTPS to Google (the binary
#                                     reads the system store: rustls-native-certs)
#     etc/passwd, etc/group           root, nobody and spillway (65532:65532)
#     etc/nsswitch.conf               hosts: files, then DNS
#     etc/spillway/                   the repo's config/, container.toml (the
#                                     image's layer) and an empty spillway.toml
#                                     for deployments to mount over
#     usr/share/doc/*/copyright       licences of the shipped Debian libraries
#     tmp/                            1777, a mount point for a tmpfs
#     var/lib/                        root's: the parent of the volume
#   data/                   copied to /var/lib/spillway, owned by 65532 (the VOLUME)
#   build-args              VERSION=, REVISION=, CREATED=, SOURCE= for the labels
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

bin=${SPILLWAY_BIN:-target/release/spillway}
ctx=${IMAGE_CONTEXT:-target/image-context}
debug_dir=${IMAGE_DEBUG_DIR:-target/image}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

die() { echo "stage.sh: $*" >&2; exit 1; }
[[ -x $bin ]] || die "$bin: no such binary; run \`cargo build --release -p spillway\` (or set SPILLWAY_BIN)"
[[ -s $ca_bundle ]] || die "$ca_bundle: no CA bundle; apt-get install ca-certificates (or set CA_BUNDLE)"
for tool in ldd objcopy readelf; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: libc-bin, binutils)"
done
case $ctx in
  "" | / | "$repo") die "refusing to empty IMAGE_CONTEXT=$ctx" ;;
esac

rm -rf "$ctx"
# rootfs/var/lib: root's, so that the COPY --chown of data/ creates only
# /var/lib/spillway as the user's (a parent it had to create would be the
# user's too).
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/etc/spillway" \
  "$ctx/rootfs/tmp" "$ctx/rootfs/var/lib" "$ctx/data" "$debug_dir"
root=$ctx/rootfs
chmod 0755 "$ctx/data"
chmod 1777 "$root/tmp"

# The binary: its debug info (line tables: 47 of the release binary's 67 MB)
# split off into $debug_dir/spillway.debug, which the stripped copy names in
# a .gnu_debuglink, so `gdb` (or `addr2line -e spillway.debug`) finds file and
# line for an address from a core dump or a backtrace of the image's binary.
objcopy --only-keep-debug "$bin" "$debug_dir/spillway.debug"
objcopy --strip-debug --add-gnu-debuglink="$debug_dir/spillway.debug" "$bin" "$root/usr/local/bin/spillway"
chmod 0755 "$root/usr/local/bin/spillway"

# The shared libraries, at the paths ldd resolved them to (the loader's
# default search path, so the image needs no ld.so.cache). Symlinks are
# followed: each lands as a regular file under the name the binary asks for.
libs=()
while read -r line; do
  case $line in
    *"not found"*) die "ldd $bin: $line" ;;
    *"=> "/*) path=${line#*=> }; path=${path%% (*} ;;
    /*) path=${line%% (*} ;;
    *) continue ;; # linux-vdso.so.1: the kernel's, not a file
  esac
  libs+=("$path")
done < <(ldd "$bin")
[[ ${#libs[@]} -gt 0 ]] || die "ldd $bin found no shared libraries (a static binary needs none: drop this step)"
# The program interpreter (the dynamic loader) must be among them.
interp=$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')
[[ -n $interp ]] || die "$bin names no program interpreter"
[[ " ${libs[*]} " == *" $interp "* ]] || die "ldd did not list the interpreter $interp"
for path in "${libs[@]}"; do
  mkdir -p "$root$(dirname "$path")"
  cp -L "$path" "$root$path"
  chmod 0755 "$root$path"
done

# The licences of the Debian packages those files (and the CA bundle) come from.
if command -v dpkg-query >/dev/null; then
  for path in "${libs[@]}" "$ca_bundle"; do
    real=$(readlink -f "$path")
    pkg=$(dpkg-query -S "$real" 2>/dev/null || dpkg-query -S "$path" 2>/dev/null || true)
    pkg=${pkg%%:*}
    pkg=${pkg%%,*}
    # The bundle is generated (update-ca-certificates), owned by no package.
    [[ -z $pkg && $path == "$ca_bundle" ]] && pkg=ca-certificates
    if [[ -n $pkg && -f /usr/share/doc/$pkg/copyright ]]; then
      mkdir -p "$root/usr/share/doc/$pkg"
      cp "/usr/share/doc/$pkg/copyright" "$root/usr/share/doc/$pkg/copyright"
    fi
  done
fi

cp -L "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
spillway:x:65532:65532:spillway:/var/lib/spillway:/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
spillway:x:65532:
EOF
# No NSS modules beyond glibc's built-in files and dns.
cat >"$root/etc/nsswitch.conf" <<'EOF'
passwd: files
group:  files
hosts:  files dns
EOF

cp -R config/. "$root/etc/spillway/"
cp scripts/image/container.toml "$root/etc/spillway/container.toml"
cat >"$root/etc/spillway/spillway.toml" <<'EOF'
# Empty on purpose: mount the deployment's settings over this file
# (e.g. -v ./spillway.toml:/etc/spillway/spillway.toml:ro). It is layered
# over container.toml, and SPILLWAY__SECTION__KEY variables over both.
EOF
find "$root" -type d -exec chmod 0755 {} +
chmod 1777 "$root/tmp"
find "$root/etc" -type f -exec chmod 0644 {} +

# Labels. The version is the binary's own (`spillway --version`), so the
# label says what the image runs even when the tree moved on.
version=$("$bin" --version | awk '{print $2}')
[[ -n $version ]] || die "$bin --version printed no version"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $revision != unknown ]] && ! git diff --quiet HEAD -- src crates Cargo.toml Cargo.lock config scripts/image Containerfile 2>/dev/null; then
  revision="$revision-dirty"
fi
source=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || true)}
# The commit's time, so two stagings of one commit label the image alike.
created=$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)
cat >"$ctx/build-args" <<EOF
VERSION=$version
REVISION=$revision
CREATED=$created
SOURCE=$source
EOF

echo "staged $ctx: spillway $version ($revision), interpreter $interp"
echo "  binary: $(du -h "$root/usr/local/bin/spillway" | cut -f1) stripped (from $(du -h "$bin" | cut -f1)); debug info: $debug_dir/spillway.debug"
echo "  libraries: ${libs[*]}"
echo "  context: $(du -sh "$ctx" | cut -f1)"
