#!/usr/bin/env bash
# Checks the Kubernetes manifests under deploy/kubernetes/ (DEPLOYMENT.md,
# "Kubernetes"). Exits non-zero on any failure; safe to run again (the venv
# is reused while its pins are unchanged). About a minute cold, most of it
# installing checkov.
#
#   bash scripts/ci/manifests.sh
#
# 1. the PrometheusRule is what deploy/kubernetes/generate-rules.py writes;
# 2. each kustomization (base, overlays/*) renders with `kubectl kustomize`
#    (kubectl ships kustomize; without kubectl the base is rendered by
#    scripts/ci/manifests.py and the overlays are reported as not checked);
# 3. scripts/ci/manifests.py: listings, strict schemas for Kubernetes
#    $K8S_VERSIONS (kubernetes-validate; hand-written CRD schemas for
#    ServiceMonitor and PrometheusRule), the rules against dashboards/, the
#    ConfigMap's spillway.toml through the real binary's `check-config` with
#    the Deployment's environment, and ports, probes and shutdown timings
#    against that effective config;
# 4. checkov on deploy/kubernetes (skips, each justified in DEPLOYMENT.md:
#    deploy/kubernetes/.checkov.yaml), and on each rendered overlay with only
#    CKV_K8S_35 skipped (an overlay pins the image by digest).
#
# Environment:
#   SPILLWAY_BIN   the binary for check-config (default: the newer of
#                  target/debug/spillway and target/release/spillway; built
#                  with `cargo build -p spillway` if neither exists)
#   K8S_VENV       the venv (default target/ci-venv-k8s)
#   K8S_VERSIONS   Kubernetes versions to validate against (default 1.30,1.37:
#                  the oldest with the preStop sleep action on by default, and
#                  the newest kubernetes-validate ships)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=${K8S_VENV:-target/ci-venv-k8s}
versions=${K8S_VERSIONS:-1.30,1.37}
requirements=scripts/ci/manifests-requirements.txt
out=target/k8s-rendered

echo "== python tools ($venv)"
stamp="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [[ ! -x $venv/bin/python || "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$requirements"
  echo "$stamp" >"$venv/.stamp"
fi
"$venv/bin/python" -c 'import importlib.metadata as m; print(" ".join(f"{p} {m.version(p)}" for p in ("kubernetes-validate", "checkov", "PyYAML", "jsonschema")))'

echo "== PrometheusRule in sync with dashboards/ (generate-rules.py --check)"
python3 deploy/kubernetes/generate-rules.py --check
echo "  ok   deploy/kubernetes/base/prometheusrule.yaml is what generate-rules.py writes"

echo "== render"
rm -rf "$out"
mkdir -p "$out"
kustomizations=(deploy/kubernetes/base)
for overlay in deploy/kubernetes/overlays/*/; do
  [[ -f $overlay/kustomization.yaml ]] && kustomizations+=("${overlay%/}")
done
if command -v kubectl >/dev/null; then
  echo "  kubectl $(kubectl version --client 2>/dev/null | grep -i kustomize || true)"
  for dir in "${kustomizations[@]}"; do
    name=${dir#deploy/kubernetes/}
    kubectl kustomize "$dir" >"$out/${name//\//-}.yaml"
    echo "  ok   kubectl kustomize $dir"
  done
else
  echo "  kubectl not found: the base is rendered by manifests.py (no hash suffix); overlays NOT rendered"
  "$venv/bin/python" scripts/ci/manifests.py --rendered "$out" --spillway /dev/null --render-base "$out/base.yaml"
  skipped=()
  for dir in "${kustomizations[@]:1}"; do
    echo "  SKIP $dir (needs kustomize: install kubectl to check it)"
    name=${dir#deploy/kubernetes/}
    skipped+=("${name//\//-}")
  done
  export K8S_SKIP="${skipped[*]}"
fi

echo "== the binary for check-config"
bin=${SPILLWAY_BIN:-}
if [[ -z $bin ]]; then
  for candidate in target/debug/spillway target/release/spillway; do
    if [[ -x $candidate && ( -z $bin || $candidate -nt $bin ) ]]; then bin=$candidate; fi
  done
fi
if [[ -z $bin ]]; then
  cargo build -p spillway
  bin=target/debug/spillway
fi
echo "  $bin ($("$bin" --version))"

echo "== manifest checks (Kubernetes $versions, strict)"
"$venv/bin/python" scripts/ci/manifests.py --rendered "$out" --spillway "$bin" --kubernetes "$versions"

echo "== checkov (kubernetes framework; skips in deploy/kubernetes/.checkov.yaml)"
"$venv/bin/checkov" -d deploy/kubernetes --framework kubernetes \
  --config-file deploy/kubernetes/.checkov.yaml --compact --quiet
echo "  ok   checkov: no failed check in deploy/kubernetes"
# The rendered overlays too, skipping only what no overlay can change
# (secrets as variables): an overlay must pin its image by digest, which is
# what lets the base skip CKV_K8S_43 and CKV_K8S_15.
for rendered in "$out"/overlays-*.yaml; do
  [[ -e $rendered ]] || continue
  "$venv/bin/checkov" -f "$rendered" --framework kubernetes --skip-download \
    --skip-check CKV_K8S_35 --compact --quiet
  echo "  ok   checkov: no failed check in $rendered (only CKV_K8S_35 skipped)"
done

echo "manifests: all checks passed"
