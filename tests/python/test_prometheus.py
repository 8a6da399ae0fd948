"""The dashboard and the rules against a real Prometheus scraping the real binaries.

A stack of its own (simulator + gateway with two tenants and a small token
budget), a `prometheus` on a free loopback port scraping the gateway's
`/metrics` every second and evaluating dashboards/recording.yml and
dashboards/alerts.yml every second, and a short load that makes every panel
have something to show: spillover, a fallback after an injected upstream 429,
requests waiting for quota, streams, two tenants (one with spend caps), auth
failures, a batch long enough to watch, `spillway status` polling the admin
API, and every region drained at the end.

Then every PromQL expression of dashboards/spillway.json (template variables
substituted: `$job` and `$instance` by the gateway's own, so a selector that
cannot be scoped to one deployment shows up empty) and of the rules files
must parse and return data through `/api/v1/query`; the batch-progress
panels must have had data while the batch ran. An alert's expression is checked twice: as written (it must
parse; it is empty unless the alert's condition holds) and without its
threshold (the signal must have data, proving its names and labels are real).

Needs `prometheus` on PATH (or $PROMETHEUS_BIN); skipped without it unless
$SPILLWAY_REQUIRE_PROMETHEUS=1, as in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pytest
import yaml

from conftest import (
    REPO,
    UPSTREAM_TOKEN,
    Process,
    Stack,
    _binary,
    _free_port,
    _key_digest,
    _opener,
    _start_gateway,
    _start_sim,
    http_json,
)

DASHBOARDS = REPO / "dashboards"
HAIKU = "claude-3-haiku@20240307"
ADMIN_KEY = "sk-spw-prom-admin-0123456789abcdefghijklmnopqrs"
TENANT_KEYS = {
    "search": "sk-spw-prom-search-0123456789abcdefghijklmnop",
    "reports": "sk-spw-prom-reports-0123456789abcdefghijklmno",
}
# Grafana's variables, as a test of the expressions wants them.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$model": ".*",
    "$region": ".*",
    "$tenant": ".*",
    "$job": "spillway",
    # "$instance": the gateway's scrape target, set by the fixture.
}
TEST_DEADLINE_S = 120.0
SCRAPE_WAIT_S = 30.0


# ----------------------------------------------------------------- expressions


def dashboard_expressions(path: Path) -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel, nested rows included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(json.loads(path.read_text())["panels"])
    return out


def template_queries(path: Path) -> list[tuple[str, str, str]]:
    """(variable, series selector, label) of every `label_values(selector, label)` variable."""
    out = []
    for var in json.loads(path.read_text())["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
        assert m, f"variable {var['name']}: not a label_values(selector, label) query: {query!r}"
        out.append((var["name"], m.group(1), m.group(2)))
    return out


def substitute(expr: str, extra: Optional[dict[str, str]] = None) -> str:
    values = {**SUBSTITUTIONS, **(extra or {})}
    # Longest names first: $__rate_interval before $__interval.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name[1:] + "}", values[name]).replace(name, values[name])
    assert "$" not in expr, f"unsubstituted template variable in {expr!r}"
    return expr


def _top_level_tokens(expr: str) -> Iterator[tuple[int, str]]:
    """(offset, character) of the characters of `expr` outside brackets and strings."""
    depth, quote, i = 0, None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            yield i, c
        i += 1


def _split_set_operators(expr: str) -> list[str]:
    """The operands of top-level `and`, `or`, `unless`, their matching modifiers dropped."""
    tokens = list(_top_level_tokens(expr))
    top = "".join(c for _, c in tokens)
    positions = [i for i, _ in tokens]
    parts, start = [], 0
    for m in re.finditer(r"(?<![\w:])(and|or|unless)(?![\w:])", top):
        begin, end = positions[m.start()], positions[m.end() - 1] + 1
        parts.append(expr[start:begin])
        start = end
    parts.append(expr[start:])
    modifier = re.compile(r"^\s*(on|ignoring)\s*\([^)]*\)")
    return [modifier.sub("", p).strip() for p in parts]


def alert_signals(expr: str) -> list[str]:
    """Each operand of an alert's expression with its top-level comparison dropped.

    `a > 0.9` gives `a`; `x > 0 unless on (job) y > 0` gives `x` and `y`.
    """
    signals = []
    for part in _split_set_operators(expr):
        top = list(_top_level_tokens(part))
        chars = "".join(c for _, c in top)
        m = re.search(r"(>=|<=|==|!=|>|<)", chars)
        signals.append(part[: top[m.start()][0]].strip() if m else part)
    return signals


def rule_expressions() -> list[tuple[str, str, bool]]:
    """(where, expr, is_alert) for every rule, plus each recorded series by name."""
    out = []
    for name in ("recording.yml", "alerts.yml"):
        for group in yaml.safe_load((DASHBOARDS / name).read_text())["groups"]:
            for rule in group["rules"]:
                expr = " ".join(rule["expr"].split())
                if "record" in rule:
                    out.append((f"{name}: record {rule['record']}", expr, False))
                    out.append((f"{name}: recorded series {rule['record']}", rule["record"], False))
                else:
                    out.append((f"{name}: alert {rule['alert']}", expr, True))
    return out


def test_alert_signals_split_thresholds_off() -> None:
    assert alert_signals("spillway:x:ratio > 0.9") == ["spillway:x:ratio"]
    assert alert_signals('m{a=">"} >= 2') == ['m{a=">"}']
    assert alert_signals("max_over_time(x[1m]) > 0") == ["max_over_time(x[1m])"]
    assert alert_signals(
        'sum without (instance, status) (b{status="processing"}) > 0 unless on (job) c:d > 0'
    ) == ['sum without (instance, status) (b{status="processing"})', "c:d"]
    assert alert_signals("rate(x_total{job=~\"order|andor\"}[5m])") == ["rate(x_total{job=~\"order|andor\"}[5m])"]


# ----------------------------------------------------------------- the stack


def _prometheus_bin() -> Optional[str]:
    found = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if found:
        return found
    if os.environ.get("SPILLWAY_REQUIRE_PROMETHEUS") == "1":
        pytest.fail("prometheus not found (PATH or $PROMETHEUS_BIN), and $SPILLWAY_REQUIRE_PROMETHEUS=1")
    pytest.skip("prometheus not installed (apt-get install prometheus)")


def _overlay(sim_url: str, port: int, digests: dict[str, str], admin_digest: str) -> str:
    """The test layer over config/demo.toml: client auth with two tenants, the
    simulator upstream, and a token budget small enough (one request with
    max_tokens 1200 in flight per region) that concurrent requests wait. The
    scheduler only waits for room it can see coming within the deadline, from
    the window sliding: a 2-second window makes that soon."""
    q = json.dumps
    # `search` has spend caps far above what the load spends, so the cap
    # series and the spend panels have data and nothing is refused for spend.
    caps = {"search": "spend_cap_usd_per_day = 1000.0\nspend_cap_usd_per_month = 20000.0\n"}
    tenants = "".join(
        f"\n[tenants.{name}]\nkey_sha256 = {q(d)}\n{caps.get(name, '')}" for name, d in digests.items()
    )
    return f"""
[server]
listen = {q(f"127.0.0.1:{port}")}
auth = "api_key"

[upstream]
regional_url = {q(sim_url)}
global_url = {q(sim_url)}
auth = "static"
token = {q(UPSTREAM_TOKEN)}

[quota]
tokens_per_min = 2000
window_secs = 2
# Reserve max_tokens as output, so two requests in flight fill a region
# (the default reserves what answers are expected to generate).
output_reserve = "max_tokens"

[admin]
key_sha256 = {q(admin_digest)}
{tenants}"""


def _prometheus_config(target: str, port: int) -> str:
    return f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {json.dumps(str(DASHBOARDS / "recording.yml"))}
  - {json.dumps(str(DASHBOARDS / "alerts.yml"))}
scrape_configs:
  - job_name: spillway
    static_configs:
      - targets: [{json.dumps(target)}]
"""


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        status, body = http_json("GET", f"{self.url}{path}?{urllib.parse.urlencode(params)}")
        return status, body

    def query(self, expr: str) -> tuple[bool, Any]:
        """(ok, result or error message) of an instant query now."""
        status, body = self.api("/api/v1/query", query=expr)
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            return False, body.get("error", body) if isinstance(body, dict) else body
        return True, body["data"]["result"]

    def value(self, expr: str) -> float:
        ok, result = self.query(expr)
        assert ok, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else 0.0


@dataclass(frozen=True)
class Observed:
    stack: Stack
    prom: Prometheus
    prom_log: str
    # The gateway's scrape target: its `instance` label.
    instance: str
    spillway_bin: Path


@pytest.fixture
def observed(tmp_path: Path) -> Iterator[Observed]:
    """A simulator, a gateway and a Prometheus scraping it; stopped at the end."""
    prometheus_bin = _prometheus_bin()
    spillway_bin = _binary("SPILLWAY_BIN", "target/debug/spillway")
    sim_bin = _binary("SPILLWAY_SIM_BIN", "target/debug/spillway-sim")
    with ExitStack() as cleanup:
        sim, sim_url = _start_sim(sim_bin, tmp_path)
        cleanup.callback(sim.stop)
        port = _free_port()
        config = tmp_path / "prometheus-test.toml"
        digests = {name: _key_digest(spillway_bin, key) for name, key in TENANT_KEYS.items()}
        config.write_text(_overlay(sim_url, port, digests, _key_digest(spillway_bin, ADMIN_KEY)))
        gateway, url = _start_gateway(spillway_bin, config, port, tmp_path)
        cleanup.callback(gateway.stop)

        prom_port = _free_port()
        prom_config = tmp_path / "prometheus.yml"
        prom_config.write_text(_prometheus_config(f"127.0.0.1:{port}", prom_port))
        prom = Process(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            tmp_path,
        )
        cleanup.callback(prom.stop)
        prom_url = f"http://127.0.0.1:{prom_port}"

        def ready() -> Optional[str]:
            try:
                status, _ = http_json("GET", f"{prom_url}/-/ready")
            except OSError:
                return None
            return prom_url if status == 200 else None

        prom.wait_for("answer on GET /-/ready", ready)
        stack = Stack(url=url, sim_url=sim_url, key=TENANT_KEYS["search"], upstream_token=UPSTREAM_TOKEN)
        yield Observed(stack, Prometheus(prom_url), (tmp_path / "prometheus.stderr").as_posix(),
                       f"127.0.0.1:{port}", spillway_bin)


# ----------------------------------------------------------------- the load


def _post(
    stack: Stack, key: Optional[str], body: dict[str, Any], headers: Optional[dict[str, str]] = None,
    timeout: float = 30.0, path: str = "/v1/messages",
) -> tuple[int, bytes]:
    """POST /v1/messages (or `path`); the whole body is read (streams to their end)."""
    req = urllib.request.Request(
        f"{stack.url}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json", **({"x-api-key": key} if key else {}), **(headers or {})},
    )
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _message(stream: bool = False, text: str = "Hello, Claude") -> dict[str, Any]:
    return {"model": HAIKU, "max_tokens": 1200, "stream": stream,
            "messages": [{"role": "user", "content": text}]}


def _gateway_counter(stack: Stack, name: str) -> float:
    """Sum of one metric's samples on the gateway's /metrics now."""
    with _opener.open(f"{stack.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def _next_scrape() -> None:
    """Lets Prometheus scrape between phases, so rates see the changes."""
    time.sleep(1.2)


def _run_batch(
    stack: Stack, key: str, items: int = 3, timeout: float = 30.0,
    while_running: Optional[Callable[[], bool]] = None,
) -> None:
    """Submits a batch and waits for it to end; nothing if the gateway has no batch API.

    `while_running` is called while the batch is in progress until it returns
    True; the test fails if the batch ends first.
    """
    body = {"requests": [{"custom_id": f"item-{i}", "params": _message()} for i in range(items)]}
    status, raw = _post(stack, key, body, path="/v1/messages/batches")
    if status in (404, 405):
        return
    assert status == 200, f"creating a batch: {status} {raw[:500]!r}"
    batch_id = json.loads(raw)["id"]
    watched = while_running is None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"{stack.url}/v1/messages/batches/{batch_id}", headers={"x-api-key": key})
        with _opener.open(req, timeout=10) as resp:
            batch = json.loads(resp.read())
        if batch["processing_status"] == "ended":
            assert watched, f"batch {batch_id} ended before what was to be seen while it ran: {batch}"
            return
        if not watched:
            watched = while_running()
        time.sleep(0.2)
    pytest.fail(f"batch {batch_id} did not end within {timeout:.0f} s: {batch}")


def drive_load(stack: Stack, while_batch_runs: Optional[Callable[[], bool]] = None) -> None:
    keys = list(TENANT_KEYS.values())
    # Unary calls and streams from both tenants. With one request's worth
    # of tokens per region, "most headroom" sends every other request to
    # europe-west4: spillover.
    for i in range(6):
        status, body = _post(stack, keys[i % 2], _message(stream=i % 3 == 2))
        assert status == 200, f"warm-up call {i}: {status} {body[:500]!r}"
        if i == 2:
            _next_scrape()
    _next_scrape()
    # A burst held in flight by a slow upstream: only one request per region
    # fits the token budget at a time, the rest wait for quota.
    for region in ("us-central1", "europe-west4"):
        stack.sim("POST", "/_sim/faults", {"region": region, "kind": {"type": "delay", "first_token_ms": 300,
                                                                       "per_token_ms": 20}, "remaining": 8})
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: _post(stack, keys[i % 2], _message(stream=i % 2 == 0)), range(8)))
    stack.sim("DELETE", "/_sim/faults")
    assert all(s == 200 for s, _ in results), [(s, b[:200]) for s, b in results]
    _next_scrape()
    # An upstream 429 in the primary region: the request that gets it falls
    # back to europe-west4.
    stack.sim("POST", "/_sim/faults", {"region": "us-central1", "model": HAIKU,
                                       "kind": {"type": "status", "status": 429}, "remaining": 1})
    for i in range(10):
        status, body = _post(stack, keys[0], _message())
        assert status == 200, f"call after the 429 fault: {status} {body[:500]!r}"
        if _gateway_counter(stack, "spillway_fallbacks_total") > 0:
            break
    else:
        pytest.fail("no fallback after an injected upstream 429 in 10 calls")
    stack.sim("DELETE", "/_sim/faults")
    _next_scrape()
    # Both regions busy with a slow request each: a request that may not
    # wait is rejected (429 from Spillway itself).
    for region in ("us-central1", "europe-west4"):
        stack.sim("POST", "/_sim/faults", {"region": region, "kind": {"type": "delay", "first_token_ms": 1500},
                                           "remaining": 1})
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = [pool.submit(_post, stack, keys[i], _message()) for i in range(2)]
        time.sleep(0.5)
        status, body = _post(stack, keys[1], _message(), headers={"x-spillway-max-wait-ms": "0"})
        assert status == 429, f"an impatient call while both regions are full: {status} {body[:500]!r}"
        assert all(f.result()[0] == 200 for f in slow), [f.result() for f in slow]
    stack.sim("DELETE", "/_sim/faults")
    # A request that can never fit the token budget: invalid (400), never sent.
    # (40,000 dense bytes are at least 2,500 tokens, over the 2,000 budget;
    # max_tokens alone never refuses.)
    status, body = _post(stack, keys[0], _message(text="x" * 40_000))
    assert status == 400, f"a prompt over the budget: {status} {body[:500]!r}"
    # A batch, where the gateway runs batches: batch-priority waits, and,
    # slowed down to last a few scrapes, the oldest batch's progress and ETA.
    for region in ("us-central1", "europe-west4"):
        stack.sim("POST", "/_sim/faults", {"region": region, "kind": {"type": "delay", "first_token_ms": 500},
                                           "remaining": 16})
    _run_batch(stack, keys[1], items=16, while_running=while_batch_runs)
    stack.sim("DELETE", "/_sim/faults")
    # An auth-failure spike: wrong and missing keys, over 60 in a few seconds
    # (the alert's threshold is 0.2/s over 5 minutes).
    bad = ["sk-spw-not-a-key", None, "sk-spw-also-wrong"] * 27
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda k: _post(stack, k, _message())[0], bad))
    assert set(statuses) == {401}, statuses
    # Last, as it breaks the upstream for good: Vertex revokes the gateway's
    # static token. The client gets a 5xx, never a 401 of its own, and the
    # setup-error alert fires.
    stack.sim("POST", "/_sim/rotate-token", {})
    status, body = _post(stack, keys[0], _message())
    assert status == 500, f"a rejected upstream credential: {status} {body[:500]!r}"
    assert b"api_error" in body, body[:500]


def operate(stack: Stack, spillway_bin: Path) -> None:
    """What an operator does: `spillway status` (the real command, polling the
    admin API), then every region drained."""
    for _ in range(3):
        out = subprocess.run(
            [str(spillway_bin), "status", "--once", "--url", stack.url, "--admin-key", ADMIN_KEY],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0 and HAIKU in out.stdout, (out.returncode, out.stdout, out.stderr)
        # The spend table: each tenant today against its cap.
        assert "SPEND TODAY" in out.stdout and "/ $1000.00" in out.stdout, out.stdout
    for region in ("us-central1", "europe-west4"):
        req = urllib.request.Request(f"{stack.url}/admin/regions/{region}/drain", data=b"", method="POST",
                                     headers={"x-api-key": ADMIN_KEY})
        with _opener.open(req, timeout=10) as resp:
            assert resp.status == 200, resp.status


# ----------------------------------------------------------------- the test


def _wait_until(prom: Prometheus, expr: str, what: str, timeout: float = SCRAPE_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok, result = prom.query(expr)
        if ok and result:
            return
        time.sleep(0.25)
    pytest.fail(f"Prometheus never saw {what} ({expr}) within {timeout:.0f} s")


BATCH_PROGRESS = "spillway_batch_oldest_"


def test_every_dashboard_and_rule_expression_has_data(observed: Observed) -> None:
    stack, prom, prom_log = observed.stack, observed.prom, observed.prom_log
    # (A regex in PromQL; the dots of the address match themselves too.)
    scope = {"$instance": observed.instance}
    started = time.monotonic()
    # A scrape before the load, so counters start from their zero.
    _wait_until(prom, 'up{job="spillway"} == 1', "the gateway up")

    # The batch-progress panels have data only while a batch runs: each of
    # their expressions must return some while the load's batch does.
    progress = [(where, substitute(expr, scope)) for where, expr in dashboard_expressions(DASHBOARDS / "spillway.json")
                if BATCH_PROGRESS in expr]
    assert progress, "no batch-progress panel in the dashboard"
    seen_running: set[str] = set()

    def batch_panels_have_data() -> bool:
        for where, expr in progress:
            ok, result = prom.query(expr)
            if ok and result:
                seen_running.add(where)
        return len(seen_running) == len(progress)

    drive_load(stack, while_batch_runs=batch_panels_have_data)
    # The batch's progress, as Prometheus saw it: the oldest batch had 16
    # requests, and none once it ended.
    _wait_until(prom, f'max_over_time(sum without (status) ({BATCH_PROGRESS}requests)[1m:1s]) == 16',
                "the oldest batch's 16 requests")
    _wait_until(prom, f'{BATCH_PROGRESS}age_seconds == 0', "no batch in progress after the batch")
    operate(stack, observed.spillway_bin)

    # What the load was for, as Prometheus saw it.
    for expr, what in [
        ("sum(spillway_spillovers_total) > 0", "a spillover"),
        ("sum(spillway_fallbacks_total) > 0", "a fallback"),
        ("sum(spillway_upstream_429_total) > 0", "an upstream 429"),
        ("sum(spillway_time_to_first_token_seconds_count) > 0", "a stream"),
        ("sum(spillway_auth_failures_total) >= 81", "the auth failures"),
        ('sum(spillway_requests_total{outcome="rejected"}) > 0', "a rejected request"),
        ('sum(spillway_requests_total{outcome="invalid"}) > 0', "an invalid request"),
        ('sum(spillway_requests_total{tenant="reports"}) > 0', "the second tenant"),
        # Some request waited over 100 ms for quota.
        ('sum(spillway_queue_wait_seconds_count) - sum(spillway_queue_wait_seconds_bucket{le="0.1"}) > 0',
         "a queue wait"),
        # `spillway status` read the quotas three times, and its calls are
        # counted apart from model requests.
        ('spillway_http_requests_total{surface="admin",route="/admin/quotas",status="200"} >= 3',
         "spillway status's admin calls"),
        ('sum(spillway_region_drained) >= 2', "the drained regions"),
        # What the load cost at Haiku's list prices, interactive and batch.
        ('sum(spillway_spend_usd_total{traffic="interactive"}) > 0', "interactive spend"),
        ('sum(spillway_spend_usd_total{traffic="batch"}) > 0', "batch spend"),
        ('spillway_tenant_spend_usd{tenant="search",period="day"} > 0', "a tenant's spend today"),
    ]:
        _wait_until(prom, expr, what)
    # Two more scrapes and rule evaluations after the last event, so rates
    # and recorded series cover it.
    time.sleep(3)

    checks: list[tuple[str, str]] = []  # (where, expr) that must return data
    parse_only: list[tuple[str, str]] = []  # (where, expr) that must only parse
    for where, expr in dashboard_expressions(DASHBOARDS / "spillway.json"):
        if BATCH_PROGRESS not in expr:
            checks.append((where, substitute(expr, scope)))
    for where, expr, is_alert in rule_expressions():
        if is_alert:
            parse_only.append((where, expr))
            checks.extend((f"{where}, signal", s) for s in alert_signals(expr))
        else:
            checks.append((where, expr))

    failures = [f"{where}: no data while the batch ran" for where, _ in progress if where not in seen_running]
    for where, expr in parse_only:
        ok, result = prom.query(expr)
        if not ok:
            failures.append(f"{where}: does not evaluate: {result}\n    {expr}")
    for where, expr in checks:
        ok, result = prom.query(expr)
        if not ok:
            failures.append(f"{where}: does not evaluate: {result}\n    {expr}")
        elif not result:
            failures.append(f"{where}: returned nothing\n    {expr}")

    # No admin, health or scrape call was counted as a model request: the
    # only model-less samples are model requests refused before forwarding.
    ok, phantom = prom.query('spillway_requests_total{model="-",outcome!~"unauthenticated|invalid|too_large"}')
    if not ok or phantom:
        failures.append(f"model-less requests counted that are no model requests: {phantom}")

    # The dashboard's variables list values.
    for name, selector, label in template_queries(DASHBOARDS / "spillway.json"):
        status, body = prom.api(f"/api/v1/label/{label}/values", **{"match[]": substitute(selector, scope)})
        if status != 200 or not body.get("data"):
            failures.append(f"variable ${name}: label_values({selector}, {label}) lists nothing: {status} {body}")

    # Every rule loaded and evaluates without error.
    status, rules = prom.api("/api/v1/rules")
    assert status == 200, rules
    loaded = {r.get("name") for g in rules["data"]["groups"] for r in g["rules"]}
    for where, _, _ in rule_expressions():
        name = where.split(" ", 2)[-1]
        if "recorded series" not in where and name not in loaded:
            failures.append(f"{where}: not loaded by Prometheus")
    for g in rules["data"]["groups"]:
        for r in g["rules"]:
            if r.get("health") != "ok":
                failures.append(f"rule {r.get('name')}: health {r.get('health')}: {r.get('lastError')}")

    # The rotated upstream token made the setup-error alert fire.
    _wait_until(prom, 'ALERTS{alertname="SpillwayUpstreamSetupError",problem="credentials_rejected"}',
                "the setup-error alert")

    # The auth-failure spike made its alert pending (it fires after its `for:`).
    _wait_until(prom, 'ALERTS{alertname="SpillwayModelUnavailable",model="claude-3-haiku@20240307"}',
                "the model-unavailable alert pending after every region was drained")
    status, alerts = prom.api("/api/v1/alerts")
    active = {(a["labels"]["alertname"], a["state"]) for a in alerts["data"]["alerts"]}
    if not any(name == "SpillwayAuthFailureSpike" for name, _ in active):
        failures.append(
            f"alert SpillwayAuthFailureSpike is not pending after 81 auth failures: active {active}; "
            f"spillway:auth_failures:rate5m = {prom.query('spillway:auth_failures:rate5m')}, "
            f"raw {prom.query('spillway_auth_failures_total[1m]')}"
        )

    assert not failures, (
        f"{len(failures)} of {len(checks) + len(parse_only)} expressions failed "
        f"(Prometheus log: {prom_log}):\n" + "\n".join(failures)
    )
    assert time.monotonic() - started < TEST_DEADLINE_S, "the test took too long"
