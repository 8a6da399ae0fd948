"""The checks of scripts/ci/manifests.sh on deploy/kubernetes/ (run by it, in
its venv: PyYAML, jsonschema and kubernetes-validate).

    python manifests.py --rendered DIR --spillway BIN [--kubernetes 1.30,1.37]

DIR holds one `<name>.yaml` per kustomization, rendered by `kubectl kustomize`
(or by `render` below where kubectl is missing). What is checked:

1. Every kustomization's `resources` (and generator files) are exactly the
   manifests in its directory, each once (secret.example.yaml aside).
2. Every rendered object, and secret.example.yaml, against the Kubernetes
   OpenAPI schemas of each version asked for, strictly (unknown fields fail).
   ServiceMonitor and PrometheusRule are custom resources that
   kubernetes-validate has no schema for: they are checked against the
   schemas below, written from the Prometheus Operator's CRDs
   (monitoring.coreos.com/v1) for the fields these manifests can use.
3. The PrometheusRule holds exactly the groups of dashboards/recording.yml
   then dashboards/alerts.yml (parsed, so the check is about content).
4. The config the pod loads (the ConfigMap's spillway.toml, plus the
   environment the Deployment gives it, with secret.example.yaml's values and
   its REPLACE_ME placeholders filled in) is accepted by the real binary's
   `spillway check-config`, and its effective values agree with the
   manifests: ports and probes, the shutdown arithmetic, the stores several
   replicas need, the memory limit against max_connections.
5. Selectors and references between the objects resolve.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
NOT_RESOURCES = {"kustomization.yaml", "secret.example.yaml"}

# Measured (BENCHMARKS.md, "Soak: the allocator after a peak"): idle RSS and
# RSS per open stream.
IDLE_MIB = 20
STREAM_KIB = 34

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"  FAIL {message}")


def ok(message: str) -> None:
    print(f"  ok   {message}")


def load_all(path: pathlib.Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomizations() -> list[pathlib.Path]:
    found = [K8S / "base"]
    overlays = K8S / "overlays"
    if overlays.is_dir():
        found += sorted(p for p in overlays.iterdir() if (p / "kustomization.yaml").is_file())
    return found


# ---------------------------------------------------------------- 1. listing


def check_listing(directory: pathlib.Path) -> None:
    rel = directory.relative_to(ROOT)
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    listed: list[str] = list(kust.get("resources") or [])
    for key in ("patches",):
        for patch in kust.get(key) or []:
            if isinstance(patch, dict) and "path" in patch:
                listed.append(patch["path"])
    for generator in (kust.get("configMapGenerator") or []) + (kust.get("secretGenerator") or []):
        for entry in (generator.get("files") or []) + (generator.get("envs") or []):
            listed.append(entry.split("=", 1)[-1])
    local = [p for p in listed if not p.startswith("..") and "/" not in p.rstrip("/")]
    dupes = sorted({p for p in listed if listed.count(p) > 1})
    if dupes:
        fail(f"{rel}/kustomization.yaml lists {dupes} more than once")
    for entry in listed:
        if not (directory / entry).exists():
            fail(f"{rel}/kustomization.yaml lists {entry}, which does not exist")
    on_disk = {
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.suffix in {".yaml", ".yml", ".toml", ".env", ".json"}
    } - NOT_RESOURCES
    unlisted = sorted(on_disk - set(local))
    if unlisted:
        fail(f"{rel}: {unlisted} not in kustomization.yaml (list it, or delete it)")
    if not dupes and not unlisted:
        ok(f"{rel}/kustomization.yaml lists every manifest in its directory, once")


def render(directory: pathlib.Path) -> list[dict]:
    """The base as kustomize builds it, for a machine without kubectl: the
    resources in order, the namespace set, the generated ConfigMap (without
    kustomize's hash suffix, so the Deployment's reference stays as
    written). Overlays need real kustomize."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = set(kust) - {"apiVersion", "kind", "namespace", "resources", "configMapGenerator"}
    if unsupported:
        raise SystemExit(f"{directory}: cannot render {sorted(unsupported)} without kustomize")
    objects = []
    for resource in kust.get("resources") or []:
        objects += load_all(directory / resource)
    for generator in kust.get("configMapGenerator") or []:
        data = {}
        for entry in generator.get("files") or []:
            key, _, name = entry.rpartition("=")
            data[key or name] = (directory / name).read_text(encoding="utf-8")
        labels = (generator.get("options") or {}).get("labels") or {}
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"], "labels": labels},
                "data": data,
            }
        )
    namespace = kust.get("namespace")
    if namespace:
        for obj in objects:
            obj.setdefault("metadata", {})["namespace"] = namespace
    return objects


# ------------------------------------------------------------- 2. schemas

NAME = {"type": "string", "minLength": 1}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
# The CRDs' pattern for Prometheus durations.
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": NAME,
        "namespace": NAME,
        "labels": LABELS,
        "annotations": LABELS,
    },
}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": NAME,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                "dropequal", "DropEqual",
            ]
        },
    },
}
ANY_OBJECT = {"type": "object"}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "sampleLimit": {"type": "integer", "minimum": 0},
                "targetLimit": {"type": "integer", "minimum": 0},
                "labelLimit": {"type": "integer", "minimum": 0},
                "scrapeClass": {"type": "string"},
                "attachMetadata": ANY_OBJECT,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "params": ANY_OBJECT,
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "trackTimestampsStaleness": {"type": "boolean"},
                            "tlsConfig": ANY_OBJECT,
                            "authorization": ANY_OBJECT,
                            "basicAuth": ANY_OBJECT,
                            "oauth2": ANY_OBJECT,
                            "bearerTokenSecret": ANY_OBJECT,
                            "followRedirects": {"type": "boolean"},
                            "enableHttp2": {"type": "boolean"},
                            "filterRunning": {"type": "boolean"},
                            "proxyUrl": {"type": "string"},
                            "relabelings": {"type": "array", "items": RELABEL},
                            "metricRelabelings": {"type": "array", "items": RELABEL},
                        },
                    },
                },
            },
        },
    },
}
RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "properties": {
        "record": NAME,
        "alert": NAME,
        "expr": {"type": ["string", "integer"]},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": LABELS,
        "annotations": LABELS,
    },
    # Exactly one of record and alert; annotations and `for` only on alerts.
    "oneOf": [
        {"required": ["record"], "not": {"anyOf": [{"required": ["alert"]}, {"required": ["for"]},
                                                   {"required": ["annotations"]}]}},
        {"required": ["alert"], "not": {"required": ["record"]}},
    ],
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": NAME,
                            "interval": DURATION,
                            "query_offset": DURATION,
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "labels": LABELS,
                            "rules": {"type": "array", "items": RULE},
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}


def describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def check_schemas(where: str, objects: list[dict], versions: list[str]) -> None:
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in CRD_SCHEMAS:
            validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[key])
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            for error in errors:
                path = "/".join(str(p) for p in error.absolute_path)
                fail(f"{where}: {describe(obj)} ({key[0]} schema): {path}: {error.message}")
            if not errors:
                ok(f"{where}: {describe(obj)} against the {key[1]} CRD schema (hand-written)")
            for group in (obj.get("spec") or {}).get("groups") or []:
                names = [r.get("record") or r.get("alert") for r in group.get("rules") or []]
                if not names:
                    fail(f"{where}: {describe(obj)}: group {group.get('name')} has no rules")
            continue
        done = []
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                done.append(version)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                fail(f"{where}: {describe(obj)} is invalid in Kubernetes {version} (strict): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"{where}: {describe(obj)}: {e.message}")
        if done == versions:
            ok(f"{where}: {describe(obj)} valid in Kubernetes {', '.join(versions)} (strict)")


# ------------------------------------------------------------- 3. rules


def rule_groups() -> list[dict]:
    groups = []
    for name in ("recording.yml", "alerts.yml"):
        groups += yaml.safe_load((ROOT / "dashboards" / name).read_text(encoding="utf-8"))["groups"]
    return groups


def squeeze_exprs(groups: list[dict]) -> list[dict]:
    """The groups with every `expr` reduced to single spaces: PromQL does not
    care, and kustomize re-folds a `>-` scalar whose lines are indented
    further (SpillwayModelUnavailable's) with an extra blank line."""
    return [
        {**g, "rules": [{**r, "expr": " ".join(str(r["expr"]).split())} for r in g.get("rules") or []]}
        for g in groups
    ]


def check_rules(where: str, objects: list[dict]) -> None:
    expected = rule_groups()
    committed = load_all(K8S / "base" / "prometheusrule.yaml")[0]["spec"]["groups"]
    if committed != expected:
        fail("base/prometheusrule.yaml does not parse to the groups of dashboards/recording.yml + "
             "alerts.yml (run python3 deploy/kubernetes/generate-rules.py)")
    rules = [o for o in objects if o.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        fail(f"{where}: expected one PrometheusRule, found {len(rules)}")
        return
    rendered = rules[0]["spec"].get("groups")
    count = sum(len(g["rules"]) for g in expected)
    if rendered == expected:
        ok(f"{where}: PrometheusRule holds dashboards/recording.yml + alerts.yml exactly ({count} rules)")
    elif squeeze_exprs(rendered) == squeeze_exprs(expected):
        ok(f"{where}: PrometheusRule holds dashboards/recording.yml + alerts.yml ({count} rules; "
           "kustomize changed only whitespace inside an expr)")
    else:
        fail(f"{where}: PrometheusRule groups differ from dashboards/recording.yml + alerts.yml "
             "(run python3 deploy/kubernetes/generate-rules.py)")


# ------------------------------------------------------------- 4. config


def example_secrets() -> dict[str, dict[str, str]]:
    """secret.example.yaml's Secrets, REPLACE_ME placeholders filled with
    well-formed stand-ins (a hash of a throwaway string, loopback stores)."""
    secrets = {}
    for obj in load_all(K8S / "base" / "secret.example.yaml"):
        values = dict(obj.get("stringData") or {})
        for key, value in values.items():
            if "REPLACE_ME" not in value:
                continue
            if key.endswith("KEY_SHA256"):
                values[key] = hashlib.sha256(f"ci-placeholder-{key}".encode()).hexdigest()
            elif key.endswith("REDIS_URL"):
                values[key] = "redis://127.0.0.1:6379/0"
            elif key.endswith("POSTGRES_URL"):
                values[key] = "postgres://spillway:ci@127.0.0.1:5432/spillway"
            elif key.endswith(".json"):
                values[key] = "{}"
            else:
                fail(f"secret.example.yaml: no stand-in for the placeholder of {key}")
        secrets[obj["metadata"]["name"]] = values
    return secrets


def one(where: str, objects: list[dict], kind: str) -> dict | None:
    found = [o for o in objects if o.get("kind") == kind]
    if len(found) != 1:
        fail(f"{where}: expected one {kind}, found {len(found)}")
        return None
    return found[0]


def container_env(where: str, container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = (source.get("secretRef") or {}).get("name")
        if ref is None:
            fail(f"{where}: envFrom other than secretRef: {source}")
        elif ref not in secrets:
            fail(f"{where}: envFrom names Secret {ref}, which secret.example.yaml does not define")
        else:
            env.update(secrets[ref])
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            fail(f"{where}: env {var['name']} comes from something other than a value or a Secret")
        elif ref["key"] not in secrets.get(ref["name"], {}):
            fail(f"{where}: env {var['name']} reads {ref['name']}/{ref['key']}, "
                 "which secret.example.yaml does not define")
        else:
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def memory_mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", str(quantity))
    if not match:
        raise ValueError(quantity)
    return float(match[1]) * (units[match[2]] if match[2] else 1 / 2**20)


def check_config(where: str, objects: list[dict], spillway: pathlib.Path) -> None:
    deployment = one(where, objects, "Deployment")
    if deployment is None:
        return
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"]
    if len(containers) != 1:
        fail(f"{where}: expected one container in the Deployment, found {len(containers)}")
        return
    container = containers[0]
    args = container.get("args") or []
    if args[:1] != ["serve"] or args.count("--config") != 1:
        fail(f"{where}: container args {args}: expected serve --config FILE")
        return
    config_path = args[args.index("--config") + 1]
    # The file must be the ConfigMap's key, where the Deployment mounts it.
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    source = None
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"], {})
        config_map = volume.get("configMap")
        if not config_map or not config_path.startswith(mount["mountPath"].rstrip("/") + "/"):
            continue
        inside = config_path[len(mount["mountPath"].rstrip("/")) + 1 :]
        items = {i["path"]: i["key"] for i in config_map.get("items") or []}
        key = items.get(inside, inside if not items else None)
        for obj in objects:
            if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"] == config_map["name"]:
                source = (obj["metadata"]["name"], key, (obj.get("data") or {}).get(key))
    if source is None or source[2] is None:
        fail(f"{where}: --config {config_path} is not a key of a ConfigMap the Deployment mounts")
        return
    secrets = example_secrets()
    env = container_env(where, container, secrets)
    for volume in pod.get("volumes") or []:
        secret = volume.get("secret")
        if secret is None:
            continue
        keys = secrets.get(secret["secretName"])
        if keys is None:
            fail(f"{where}: volume {volume['name']} mounts Secret {secret['secretName']}, "
                 "which secret.example.yaml does not define")
        for item in secret.get("items") or []:
            if keys is not None and item["key"] not in keys:
                fail(f"{where}: volume {volume['name']} mounts {secret['secretName']}/{item['key']}, "
                     "which secret.example.yaml does not define")
    with tempfile.TemporaryDirectory() as tmp:
        toml_path = pathlib.Path(tmp) / "spillway.toml"
        toml_path.write_text(source[2], encoding="utf-8")
        # Only the pod's variables: none of this machine's SPILLWAY__* leak in.
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        result = subprocess.run(
            [str(spillway), "check-config", str(toml_path)],
            env=run_env, capture_output=True, text=True, timeout=60,
        )
    if result.returncode != 0:
        fail(f"{where}: `spillway check-config` refuses ConfigMap {source[0]} key {source[1]} with the "
             f"Deployment's environment:\n{result.stderr.strip() or result.stdout.strip()}")
        return
    ok(f"{where}: `spillway check-config` accepts ConfigMap {source[0]}/{source[1]} "
       f"with the Deployment's {len(env)} variables")
    effective = tomllib.loads(result.stdout)
    server = effective["server"]

    # Ports and probes.
    host, _, port_text = server["listen"].rpartition(":")
    listen_port = int(port_text)
    if host.strip("[]") not in {"0.0.0.0", "::"}:
        fail(f"{where}: server.listen is {server['listen']}: the kubelet and the Service need 0.0.0.0 or [::]")
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    if listen_port not in ports.values():
        fail(f"{where}: server.listen port {listen_port} is not a containerPort ({ports})")

    def resolve(port) -> int | None:
        return ports.get(port) if isinstance(port, str) else port

    probes = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe)
        if not spec or "httpGet" not in spec:
            fail(f"{where}: {probe} missing or not httpGet")
            continue
        probes[probe] = spec["httpGet"]
        if resolve(spec["httpGet"]["port"]) != listen_port:
            fail(f"{where}: {probe} port {spec['httpGet']['port']} is not the listen port {listen_port}")
    wanted = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in wanted.items():
        if probe in probes and probes[probe].get("path") != path:
            fail(f"{where}: {probe} path {probes[probe].get('path')}, expected {path}")
    if not [f for f in failures if f.startswith(where) and ("probe" in f or "port" in f or "listen" in f)]:
        ok(f"{where}: listen {server['listen']} = containerPort; probes /healthz, /readyz, /healthz on it")

    service = one(where, objects, "Service")
    if service:
        for port in service["spec"]["ports"]:
            if resolve(port["targetPort"]) != listen_port:
                fail(f"{where}: Service port {port.get('name')} targets {port['targetPort']}, not {listen_port}")
    policy = one(where, objects, "NetworkPolicy")
    if policy:
        for rule in policy["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                if resolve(port["port"]) != listen_port:
                    fail(f"{where}: NetworkPolicy ingress allows port {port['port']}, not the listen port")

    # Shutdown: the kubelet's countdown covers preStop, then the grace, then exit.
    sleep = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
    grace_s = server["shutdown_grace_ms"] / 1000
    termination = pod.get("terminationGracePeriodSeconds", 30)
    need = sleep + grace_s + 1
    if not termination > need:
        fail(f"{where}: terminationGracePeriodSeconds {termination} must exceed preStop {sleep} s + "
             f"shutdown_grace_ms {grace_s:g} s + 1 s = {need:g} s")
    elif server["shutdown_delay_ms"] <= 0:
        fail(f"{where}: server.shutdown_delay_ms is 0: nothing covers a balancer that reads /readyz")
    else:
        ok(f"{where}: terminationGracePeriodSeconds {termination} > preStop {sleep} + grace {grace_s:g} + 1 s; "
           f"shutdown_delay_ms {server['shutdown_delay_ms']}")

    # Several replicas need the shared stores; an autoscaled count needs N from heartbeats.
    replicas = deployment["spec"].get("replicas", 1)
    hpa = one(where, objects, "HorizontalPodAutoscaler")
    if replicas > 1 or hpa:
        quota, batch = effective["quota"], effective["batch"]
        if quota["store"] != "redis":
            fail(f"{where}: {replicas} replicas need quota.store = \"redis\", not {quota['store']!r}")
        if batch.get("enabled", True) and batch["store"] != "postgres":
            fail(f"{where}: {replicas} replicas need batch.store = \"postgres\", not {batch['store']!r}")
        if hpa and quota.get("replicas", 0) != 0:
            fail(f"{where}: quota.replicas = {quota['replicas']} is fixed, but the HPA changes the count")
        if hpa and batch.get("enabled", True):
            connections = hpa["spec"]["maxReplicas"] * batch["postgres_max_connections"]
            print(f"  note {where}: PostgreSQL needs {connections} connections at maxReplicas "
                  f"({hpa['spec']['maxReplicas']} × {batch['postgres_max_connections']})")
        ok(f"{where}: redis quota store, postgres batch store, quota.replicas from heartbeats")

    # Memory: the limit must hold the measured cost of max_connections streams.
    limit = (container.get("resources") or {}).get("limits", {}).get("memory")
    if limit:
        floor = IDLE_MIB + server["max_connections"] * STREAM_KIB / 1024
        have = memory_mib(limit)
        if have < floor:
            fail(f"{where}: memory limit {limit} is below the measured {floor:.0f} MiB of "
                 f"{server['max_connections']} open streams")
        else:
            ok(f"{where}: memory limit {limit} = {have / floor:.1f}× the measured RSS of "
               f"max_connections = {server['max_connections']} streams ({floor:.0f} MiB)")

    # Every tenant of the ConfigMap has its key: check-config already refuses
    # a tenant without one. This catches the reverse, a Secret key naming no
    # tenant there (the variable alone would make a tenant of default policy).
    tenants = set(tomllib.loads(source[2]).get("tenants") or {})
    for key in env:
        match = re.fullmatch(r"SPILLWAY__TENANTS__(.+)__KEY_SHA256", key)
        if match and match[1].lower() not in tenants:
            fail(f"{where}: {key} names no [tenants.{match[1].lower()}] (names are read lower-cased)")


# ------------------------------------------------------------- 5. references


def matches(selector: dict, labels: dict) -> bool:
    if set(selector) - {"matchLabels"}:
        return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def check_references(where: str, objects: list[dict]) -> None:
    deployment = one(where, objects, "Deployment")
    if deployment is None:
        return
    before = len(failures)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    if not matches(deployment["spec"]["selector"], pod_labels):
        fail(f"{where}: the Deployment's selector does not match its pod template")
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    namespaces = {(o.get("metadata") or {}).get("namespace") for o in objects}
    if len(namespaces) != 1 or None in namespaces:
        fail(f"{where}: objects span namespaces {namespaces}")
    for kind, path in (("Service", ("spec", "selector")), ("PodDisruptionBudget", ("spec", "selector")),
                       ("NetworkPolicy", ("spec", "podSelector"))):
        for obj in by_kind.get(kind, []):
            selector = obj
            for step in path:
                selector = selector[step]
            selector = selector if kind != "Service" else {"matchLabels": selector}
            if not matches(selector, pod_labels):
                fail(f"{where}: {describe(obj)} does not select the Deployment's pods")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", deployment["metadata"]["name"]):
            fail(f"{where}: {describe(hpa)} scales {ref}, not the Deployment")
        if hpa["spec"].get("minReplicas", 1) < 2:
            fail(f"{where}: {describe(hpa)} minReplicas below 2")
    pod = deployment["spec"]["template"]["spec"]
    accounts = {o["metadata"]["name"] for o in by_kind.get("ServiceAccount", [])}
    if pod.get("serviceAccountName") not in accounts:
        fail(f"{where}: the pods run as {pod.get('serviceAccountName')}, which is not defined here")
    config_maps = {o["metadata"]["name"] for o in by_kind.get("ConfigMap", [])}
    for volume in pod.get("volumes") or []:
        if "configMap" in volume and volume["configMap"]["name"] not in config_maps:
            fail(f"{where}: volume {volume['name']} mounts ConfigMap {volume['configMap']['name']}, not defined here")
    services = by_kind.get("Service", [])
    for monitor in by_kind.get("ServiceMonitor", []):
        chosen = [s for s in services if matches(monitor["spec"]["selector"], s["metadata"].get("labels") or {})]
        if not chosen:
            fail(f"{where}: {describe(monitor)} selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            for service in chosen:
                names = {p.get("name") for p in service["spec"]["ports"]}
                if endpoint.get("port") not in names:
                    fail(f"{where}: {describe(monitor)} scrapes port {endpoint.get('port')}, "
                         f"not a port name of {describe(service)} ({names})")
    if len(failures) == before:
        ok(f"{where}: selectors, the ServiceAccount, the ConfigMap and the scrape port resolve")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rendered", type=pathlib.Path, required=True)
    parser.add_argument("--spillway", type=pathlib.Path, required=True)
    parser.add_argument("--kubernetes", default="1.30,1.37",
                        help="comma-separated Kubernetes versions to validate against")
    parser.add_argument("--render-base", type=pathlib.Path,
                        help="write the base, rendered without kustomize, to this file and exit")
    args = parser.parse_args()
    if args.render_base:
        args.render_base.write_text(yaml.safe_dump_all(render(K8S / "base"), sort_keys=False), encoding="utf-8")
        return 0
    versions = args.kubernetes.split(",")

    print("== kustomization listings")
    for directory in kustomizations():
        check_listing(directory)

    skip = os.environ.get("K8S_SKIP", "").split()
    for directory in kustomizations():
        name = directory.relative_to(K8S)
        if str(name).replace("/", "-") in skip:
            print(f"== {name}: NOT CHECKED (no kustomize to render it)")
            continue
        rendered = args.rendered / f"{str(name).replace('/', '-')}.yaml"
        if not rendered.exists():
            fail(f"{name}: not rendered ({rendered} missing)")
            continue
        objects = load_all(rendered)
        print(f"== {name} ({len(objects)} objects)")
        check_schemas(str(name), objects, versions)
        check_rules(str(name), objects)
        check_references(str(name), objects)
        check_config(str(name), objects, args.spillway)

    print("== secret.example.yaml")
    check_schemas("secret.example.yaml", load_all(K8S / "base" / "secret.example.yaml"), versions)

    if failures:
        print(f"\n{len(failures)} manifest check(s) failed:", file=sys.stderr)
        for message in failures:
            print(f"  - {message}", file=sys.stderr)
        return 1
    print("\nmanifest checks: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
