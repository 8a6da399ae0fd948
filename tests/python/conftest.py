"""Fixtures for the official-SDK suite: the real binaries, run as subprocesses.

One session starts `spillway-sim` (the simulated Vertex AI) and `spillway
serve` in front of it, with client auth on, and stops both at the end. The
gateway config is `config/demo.toml` plus a temp overlay written here (see
`_overlay`). Tests get a `Stack` with the gateway URL, the client key and a
tiny client for the simulator's control API.

Binaries: `$SPILLWAY_BIN` and `$SPILLWAY_SIM_BIN`, defaulting to
`target/debug/spillway` and `target/debug/spillway-sim` in the repo root.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENT_KEY = "sk-spw-sdk-tests-0123456789abcdefghijklmnopqrstuv"
UPSTREAM_TOKEN = "sim-upstream-token-sdk-tests"
STARTUP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05

# Control-API calls go straight to loopback, whatever proxy the CI sets.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _binary(env_var: str, default: str) -> Path:
    path = Path(os.environ.get(env_var) or REPO / default)
    if not path.is_file():
        pytest.exit(f"{env_var}: {path} not found; run `cargo build -p spillway -p spillway-sim` first", returncode=2)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """One HTTP call with an optional JSON body; returns (status, parsed body or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with _opener.open(req, timeout=10) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


class Process:
    """A child process whose stdout/stderr go to files (pipes could fill up and block it)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        # The environment's SPILLWAY__* variables would override the test config.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPILLWAY__")}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, what: str, probe: Callable[[], Optional[str]]) -> str:
        """Polls `probe` until it returns a value; fails with the process's output otherwise."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                self._fail(f"exited with status {self.popen.returncode} before {what}")
            value = probe()
            if value is not None:
                return value
            time.sleep(POLL_INTERVAL_S)
        self._fail(f"no {what} within {STARTUP_TIMEOUT_S:.0f} s")

    def _fail(self, problem: str) -> NoReturn:
        pytest.fail(
            f"{self.name} {problem}\n--- stderr ---\n{self.stderr()[-4000:]}"
            f"\n--- stdout ---\n{self.stdout()[-4000:]}",
            pytrace=False,
        )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass(frozen=True)
class Stack:
    """The running gateway and simulator."""

    url: str  # the gateway, e.g. http://127.0.0.1:PORT
    sim_url: str  # the simulator (control API under /_sim)
    key: str  # the client key of tenant `sdk-tests`
    upstream_token: str  # the bearer the gateway sends to the simulator

    def sim(self, method: str, path: str, body: Any = None) -> Any:
        """Calls the simulator's control API; fails the test on a non-2xx answer."""
        status, parsed = http_json(method, f"{self.sim_url}{path}", body)
        assert 200 <= status < 300, f"{method} {path}: {status} {parsed}"
        return parsed


def _start_sim(sim_bin: Path, log_dir: Path) -> tuple[Process, str]:
    sim = Process(
        "spillway-sim",
        [str(sim_bin), "--listen", "127.0.0.1:0", "--bearer", UPSTREAM_TOKEN],
        log_dir,
    )
    prefix = "spillway-sim listening on "

    def announced_url() -> Optional[str]:
        line = next((l for l in sim.stdout().splitlines() if l.startswith(prefix)), None)
        return line[len(prefix) :].strip() if line else None

    return sim, sim.wait_for("listening line on stdout", announced_url)


def _key_digest(spillway_bin: Path, key: str) -> str:
    out = subprocess.run([str(spillway_bin), "hash-key", key], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _overlay(sim_url: str, port: int, key_sha256: str, batch_db: Path) -> str:
    """The test layer over config/demo.toml.

    Client auth on with one tenant; upstream pointed at the simulator with the
    simulator's bearer; Sonnet routed to europe-west4, where the simulator
    does not offer it, so any Sonnet call gets Vertex's 404. Batches live in
    a SQLite file in the stack's temp directory.
    """
    q = json.dumps  # a JSON string of plain ASCII is a valid TOML basic string
    return f"""
[server]
listen = {q(f"127.0.0.1:{port}")}
auth = "api_key"

[upstream]
regional_url = {q(sim_url)}
global_url = {q(sim_url)}
auth = "static"
token = {q(UPSTREAM_TOKEN)}

[models."claude-3-sonnet@20240229"]
regions = [{{ name = "europe-west4" }}]

[tenants.sdk-tests]
key_sha256 = {q(key_sha256)}

[batch]
sqlite_path = {q(str(batch_db))}
poll_ms = 200
"""


def _start_gateway(spillway_bin: Path, config: Path, port: int, log_dir: Path) -> tuple[Process, str]:
    gateway = Process(
        "spillway",
        [str(spillway_bin), "serve", "--config", str(REPO / "config/demo.toml"), "--config", str(config)],
        log_dir,
    )
    return gateway, wait_healthy(gateway, f"http://127.0.0.1:{port}")


def wait_healthy(process: Process, url: str) -> str:
    """Waits until `GET {url}/healthz` answers 200 (failing with the process's output if not); returns `url`."""

    def healthy() -> Optional[str]:
        try:
            status, _ = http_json("GET", f"{url}/healthz")
        except OSError:
            return None
        return url if status == 200 else None

    return process.wait_for("answer on GET /healthz", healthy)


@contextmanager
def _running_stack(work: Path) -> Iterator[Stack]:
    spillway_bin = _binary("SPILLWAY_BIN", "target/debug/spillway")
    sim_bin = _binary("SPILLWAY_SIM_BIN", "target/debug/spillway-sim")
    with ExitStack() as cleanup:
        sim, sim_url = _start_sim(sim_bin, work)
        cleanup.callback(sim.stop)
        port = _free_port()
        config = work / "sdk-tests.toml"
        digest = _key_digest(spillway_bin, CLIENT_KEY)
        config.write_text(_overlay(sim_url, port, digest, work / "batches.sqlite3"))
        gateway, url = _start_gateway(spillway_bin, config, port, work)
        cleanup.callback(gateway.stop)
        yield Stack(url=url, sim_url=sim_url, key=CLIENT_KEY, upstream_token=UPSTREAM_TOKEN)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One simulator and gateway shared by the session."""
    with _running_stack(tmp_path_factory.mktemp("spillway")) as s:
        yield s


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A simulator and gateway of the test's own, for tests whose upstream
    429s would teach the shared gateway a lower quota."""
    with _running_stack(tmp_path) as s:
        yield s


@pytest.fixture(scope="session", autouse=True)
def _hermetic_sdk_env() -> Iterator[None]:
    """The SDK reads ANTHROPIC_* variables (extra headers, base URLs, profiles); ignore the caller's."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("ANTHROPIC_") or n == "CLOUD_ML_REGION"]:
            mp.delenv(name)
        yield


@pytest.fixture(autouse=True)
def _no_faults(stack: Stack) -> Iterator[None]:
    """Every test starts and ends with no injected fault."""
    stack.sim("DELETE", "/_sim/faults")
    yield
    stack.sim("DELETE", "/_sim/faults")
