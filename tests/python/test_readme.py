"""The README's shell and Python blocks, run as pasted against `spillway demo`.

A newcomer copies blocks out of the README; each must work. This test reads
README.md, starts the real `spillway demo` on a free port, and runs every
```sh and ```python block against it, in a fresh temp directory, with
`spillway` on PATH (as `cargo install --path .` would put it) and
`SPILLWAY_KEY` set as the README tells the reader to set it. The only edit
is the port: `127.0.0.1:8080` becomes the demo's.

A block that cannot run here (the build commands themselves, servers that
never exit, real Google credentials) carries a marker on the line before
its fence, `<!-- readme-test: skip: REASON -->`; the reason is required.

A block fails when it exits non-zero, or prints an Anthropic-shaped error
(`"type":"error"` or `"type": "error"`), which curl and print() would
otherwise let through.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from conftest import REPO, Process, _binary, _free_port, wait_healthy

README = REPO / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(?P<reason>\S.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
RUN_LANGS = {"sh", "python"}
BLOCK_TIMEOUT_S = 180
ERROR_SHAPE = re.compile(r'"type":\s*"error"')


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: Optional[str]  # the reason, when marked

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def blocks(text: str) -> list[Block]:
    """Every fenced block with its language and skip marker."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        indent = len(m.group("indent"))
        prev = lines[i - 1] if i > 0 else ""
        skip = SKIP.search(prev)
        body = []
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        out.append(Block(i + 1, m.group("lang"), "\n".join(body) + "\n", skip.group("reason") if skip else None))
        i = j + 1
    return out


def test_blocks_are_found_and_every_skip_has_a_reason() -> None:
    found = blocks(README.read_text())
    runnable = [b for b in found if b.lang in RUN_LANGS]
    assert len([b for b in runnable if b.skip is None]) >= 8, [str(b) for b in runnable]
    for b in runnable:
        assert b.skip is None or len(b.skip) > 10, f"{b}: say why it is skipped"
    # A marker must sit right above a fence, or it skips nothing.
    text = README.read_text().splitlines()
    for n, line in enumerate(text):
        if SKIP.search(line):
            assert n + 1 < len(text) and FENCE.match(text[n + 1]), f"README.md:{n + 1}: marker not above a fence"


@dataclass(frozen=True)
class DemoRun:
    url: str
    port: int


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    spillway = _binary("SPILLWAY_BIN", "target/debug/spillway")
    work = tmp_path_factory.mktemp("readme-demo")
    port = _free_port()
    proc = Process("spillway-demo", [str(spillway), "demo", "--listen", f"127.0.0.1:{port}"], work)
    try:
        url = wait_healthy(proc, f"http://127.0.0.1:{port}")
        yield DemoRun(url=url, port=port)
    finally:
        proc.stop()


def _runnable() -> list[Block]:
    return [b for b in blocks(README.read_text()) if b.lang in RUN_LANGS and b.skip is None]


@pytest.mark.parametrize("block", _runnable(), ids=str)
def test_readme_block_runs_as_pasted(block: Block, demo: DemoRun, tmp_path: Path) -> None:
    spillway = _binary("SPILLWAY_BIN", "target/debug/spillway")
    text = block.text.replace("127.0.0.1:8080", f"127.0.0.1:{demo.port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPILLWAY", "ANTHROPIC_"))}
    env["PATH"] = f"{spillway.parent}{os.pathsep}{env.get('PATH', '')}"
    env["SPILLWAY_KEY"] = "sk-spw-any-key-works-on-the-demo"
    env["NO_PROXY"] = "127.0.0.1,localhost"
    if block.lang == "sh":
        argv = ["bash", "-euo", "pipefail", "-c", text]
    else:
        argv = [sys.executable, "-c", text]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{text}\n--- output ---\n{output[-4000:]}"
    assert not ERROR_SHAPE.search(done.stdout), f"{block} printed an error:\n{text}\n--- output ---\n{output[-4000:]}"
