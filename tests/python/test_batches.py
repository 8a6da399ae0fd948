"""The Message Batches API through the official SDK, unchanged, against the real binary.

`client.messages.batches.create / retrieve / list / cancel / delete / results`
work against Spillway as against Anthropic: batch objects and pages parse into
the SDK's types, `results()` follows the absolute `results_url` Spillway
returns, and errors arrive as the SDK's exceptions. The batch runs through
the gateway's own quota at batch priority, against the simulator. Also: the
`spillway batch` CLI submits a JSONL file and follows it to the end.

These tests use a gateway and simulator of their own (module scope), so the
quota their batches use does not change what the other suites see.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import anthropic
import pytest
from anthropic import Anthropic

from conftest import REPO, Stack, _running_stack

HAIKU = "claude-3-haiku@20240307"
SONNET = "claude-3-sonnet@20240229"  # configured in europe-west4, which the simulator lacks: upstream 404


@pytest.fixture(scope="module")
def batch_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with _running_stack(tmp_path_factory.mktemp("batches")) as s:
        yield s


@pytest.fixture
def client(batch_stack: Stack) -> Anthropic:
    return Anthropic(base_url=batch_stack.url, api_key=batch_stack.key)


def request(custom_id: str, model: str = HAIKU, output_tokens: int = 3, **params: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "params": {
            "model": model,
            "max_tokens": 32,
            "messages": [{"role": "user", "content": f"Say something. SIM_OUTPUT_TOKENS={output_tokens}"}],
            **params,
        },
    }


def wait_ended(client: Anthropic, batch_id: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        assert time.monotonic() < deadline, f"batch not ended: {batch}"
        time.sleep(0.2)


def test_create_poll_and_results(client: Anthropic, batch_stack: Stack) -> None:
    batch = client.messages.batches.create(
        requests=[request(f"r{i}", output_tokens=i + 1) for i in range(4)] + [request("bad-model", model=SONNET)]
    )
    assert batch.id.startswith("msgbatch_")
    assert batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 5
    assert batch.results_url is None
    assert (batch.expires_at - batch.created_at).total_seconds() == 24 * 3600

    ended = wait_ended(client, batch.id)
    assert ended.request_counts.succeeded == 4
    assert ended.request_counts.errored == 1
    assert ended.request_counts.processing == 0
    assert ended.ended_at is not None
    assert ended.results_url == f"{batch_stack.url}/v1/messages/batches/{batch.id}/results"

    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert set(results) == {"r0", "r1", "r2", "r3", "bad-model"}
    for i in range(4):
        result = results[f"r{i}"]
        assert result.type == "succeeded"
        assert result.message.role == "assistant"
        assert result.message.usage.output_tokens == i + 1
    errored = results["bad-model"]
    assert errored.type == "errored"
    # Sonnet is not enabled in its one configured region: the gateway's
    # setup error (api_error), retried, then recorded.
    assert errored.error.error.type == "api_error"


def test_results_before_the_end_are_refused_by_the_sdk(client: Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request(f"slow{i}") for i in range(30)])
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        client.messages.batches.results(batch.id)
    client.messages.batches.cancel(batch.id)
    wait_ended(client, batch.id)


def test_cancel_midway(client: Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request(f"c{i}") for i in range(60)])
    time.sleep(1.0)
    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.processing_status in ("canceling", "ended")
    assert canceling.cancel_initiated_at is not None
    ended = wait_ended(client, batch.id)
    counts = ended.request_counts
    assert counts.canceled > 0
    assert counts.succeeded + counts.canceled + counts.errored == 60
    kinds = [r.result.type for r in client.messages.batches.results(batch.id)]
    assert len(kinds) == 60
    assert kinds.count("canceled") == counts.canceled
    assert kinds.count("succeeded") == counts.succeeded


def test_list_pagination_newest_first(client: Anthropic) -> None:
    created = [client.messages.batches.create(requests=[request("one")]).id for _ in range(3)]
    page = client.messages.batches.list(limit=2)
    assert len(page.data) == 2
    assert page.has_more is True
    assert page.first_id == created[2] and page.last_id == created[1]
    # Auto-pagination follows after_id through every page.
    seen = [b.id for b in client.messages.batches.list(limit=2)]
    assert seen.index(created[2]) < seen.index(created[1]) < seen.index(created[0])
    assert len(seen) == len(set(seen))
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.list(limit=0)


def test_delete_only_when_ended(client: Anthropic) -> None:
    running = client.messages.batches.create(requests=[request(f"d{i}") for i in range(30)])
    with pytest.raises(anthropic.BadRequestError, match="still processing"):
        client.messages.batches.delete(running.id)
    client.messages.batches.cancel(running.id)
    wait_ended(client, running.id)
    deleted = client.messages.batches.delete(running.id)
    assert deleted.id == running.id
    assert deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(running.id)


def test_an_invalid_batch_is_rejected_whole(client: Anthropic, batch_stack: Stack) -> None:
    before = client.messages.batches.list(limit=1000).data
    bad = [request("ok"), request("no-max-tokens"), request("ok2")]
    del bad[1]["params"]["max_tokens"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=bad)
    assert "requests[1].params" in caught.value.message and "max_tokens" in caught.value.message
    with pytest.raises(anthropic.BadRequestError, match="unique"):
        client.messages.batches.create(requests=[request("same"), request("same")])
    assert client.messages.batches.list(limit=1000).data == before


def test_unknown_batches_are_not_found(client: Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_01DoesNotExist000000000")
    wrong_key = Anthropic(base_url=client.base_url, api_key="sk-wrong")
    with pytest.raises(anthropic.AuthenticationError):
        wrong_key.messages.batches.list()


def test_cli_submits_a_jsonl_file_and_waits(batch_stack: Stack, tmp_path: Path) -> None:
    spillway = os.environ.get("SPILLWAY_BIN") or str(REPO / "target/debug/spillway")
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text("".join(json.dumps(request(f"line{i}")) + "\n" for i in range(6)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPILLWAY__")}
    env.update(SPILLWAY_URL=batch_stack.url, SPILLWAY_KEY=batch_stack.key)
    run = lambda *args: subprocess.run(  # noqa: E731
        [spillway, "batch", *args], capture_output=True, text=True, env=env, timeout=120
    )
    submitted = run("submit", str(jsonl), "--wait", "--every", "1")
    assert submitted.returncode == 0, submitted.stderr
    ended = json.loads(submitted.stdout)
    assert ended["processing_status"] == "ended"
    assert ended["request_counts"]["succeeded"] == 6
    results = run("results", ended["id"])
    assert results.returncode == 0, results.stderr
    lines = [json.loads(l) for l in results.stdout.splitlines()]
    assert sorted(l["custom_id"] for l in lines) == [f"line{i}" for i in range(6)]
    status = run("status", ended["id"])
    assert json.loads(status.stdout)["id"] == ended["id"]
    missing = run("status", "msgbatch_01DoesNotExist000000000")
    assert missing.returncode != 0 and "404" in missing.stderr
