"""The official `anthropic` Python SDK, unchanged, against the real `spillway` binary.

What this suite proves, with the real gateway in front of the real simulator
(see conftest.py):

* Both client surfaces work end to end: `AnthropicVertex(base_url=.../v1)`
  (Vertex-style paths, the key as its access token) and `Anthropic(base_url=...)`
  (`/v1/messages`, with model ids in Anthropic or Vertex form): unary
  messages, the `messages.stream()` helper, raw `stream=True` events, and
  `count_tokens`. Streams arrive in pieces, carry the requested usage, and
  contain only events the SDK knows.
* Errors reach the SDK as the right exception with an Anthropic-shaped body:
  an upstream 404 is `NotFoundError`, an upstream 429 is `RateLimitError`,
  a wrong key is `AuthenticationError`, a request Spillway rejects is
  `BadRequestError` (`invalid_request_error`), and an unknown model is
  `NotFoundError`. Requests Spillway rejects never reach upstream.
* Nothing the client sent as a credential, and no `anthropic-version` header,
  is ever forwarded upstream; upstream sees only the gateway's own token.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterator, Union

import anthropic
import pytest
from anthropic import Anthropic, AnthropicVertex

HAIKU = "claude-3-haiku@20240307"  # Vertex form; served in us-central1
HAIKU_ANTHROPIC = "claude-3-haiku-20240307"  # Anthropic form, as the simulator answers
SONNET = "claude-3-sonnet@20240229"  # configured in europe-west4, which the simulator lacks
STREAM_EVENT_TYPES = {
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
}
CLIENTS = ["vertex", "anthropic"]

Client = Union[Anthropic, AnthropicVertex]


# --- helpers -----------------------------------------------------------------


def make_client(kind: str, stack, key: str | None = None, **options: Any) -> Client:
    """An SDK client of `kind` pointed at the gateway, authenticating with `key`."""
    key = stack.key if key is None else key
    if kind == "vertex":
        return AnthropicVertex(
            region="us-east5",
            project_id="some-project",
            access_token=key,
            base_url=f"{stack.url}/v1",
            **options,
        )
    return Anthropic(base_url=stack.url, api_key=key, **options)


def ask(output_tokens: int, text: str = "Tell me something.") -> list[dict[str, Any]]:
    """A one-turn conversation asking the simulator for `output_tokens` tokens."""
    return [{"role": "user", "content": f"{text} SIM_OUTPUT_TOKENS={output_tokens}"}]


def create(client: Client, model: str = HAIKU, output_tokens: int = 5, **params: Any):
    return client.messages.create(model=model, max_tokens=64, messages=ask(output_tokens), **params)


def upstream_total(stack) -> int:
    """Predict calls the simulator has received so far."""
    return stack.sim("GET", "/_sim/counters")["total_requests"]


@contextmanager
def upstream_calls(stack, expected: int) -> Iterator[None]:
    """Asserts the block made exactly `expected` predict calls reach the simulator."""
    before = upstream_total(stack)
    yield
    assert upstream_total(stack) - before == expected


def assert_text_message(message, output_tokens: int) -> None:
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == HAIKU_ANTHROPIC
    assert message.id.startswith("msg_")
    assert message.stop_reason == "end_turn"
    assert [block.type for block in message.content] == ["text"]
    assert len(message.content[0].text.split()) == output_tokens
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens == output_tokens


def assert_api_error(error: anthropic.APIStatusError, status: int, error_type: str) -> None:
    """An Anthropic-shaped error body with the status the SDK mapped, and a request id."""
    assert error.status_code == status
    assert error.type == error_type
    assert isinstance(error.body, dict) and error.body.get("type") == "error", error.body
    assert error.body["error"]["type"] == error_type
    assert error.body["error"]["message"]
    assert error.request_id


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(params=CLIENTS)
def client(request, stack) -> Iterator[Client]:
    with make_client(request.param, stack) as c:
        yield c


# --- success paths -------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, model",
    [("vertex", HAIKU), ("anthropic", HAIKU_ANTHROPIC), ("anthropic", HAIKU)],
    ids=["vertex", "anthropic-dash-id", "anthropic-at-id"],
)
def test_unary_create(stack, kind: str, model: str) -> None:
    with make_client(kind, stack) as c, upstream_calls(stack, 1):
        message = create(c, model=model, output_tokens=5)
    assert_text_message(message, 5)
    assert message._request_id


def test_stream_helper(client: Client) -> None:
    with client.messages.stream(model=HAIKU, max_tokens=64, messages=ask(7)) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
        assert stream.request_id
    assert len(deltas) > 1, "the text should arrive in several deltas"
    assert "".join(deltas) == final.content[0].text
    assert_text_message(final, 7)


def test_raw_stream_events(client: Client) -> None:
    with create(client, output_tokens=7, stream=True) as stream:
        events = list(stream)
    types = [event.type for event in events]
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    assert set(types) == STREAM_EVENT_TYPES, "only Anthropic events, vertex_event dropped"
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert len(text.split()) == 7
    assert events[0].message.model == HAIKU_ANTHROPIC
    (message_delta,) = [e for e in events if e.type == "message_delta"]
    assert message_delta.usage.output_tokens == 7
    assert message_delta.delta.stop_reason == "end_turn"


def test_count_tokens(client: Client) -> None:
    """The count is upstream's (what a real call is billed), not a local estimate."""
    counted = client.messages.count_tokens(model=HAIKU, messages=ask(5)).input_tokens
    billed = create(client, output_tokens=5).usage.input_tokens
    assert counted == billed > 0
    longer = client.messages.count_tokens(model=HAIKU, messages=ask(5, "hi " * 200)).input_tokens
    assert longer > counted


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_model_not_enabled_upstream_is_the_gateways_error(stack, client: Client, stream: bool) -> None:
    # Vertex's 404 "Publisher Model ... not found or your project does not
    # have access" is about the gateway's setup: the SDK sees a 502
    # api_error (InternalServerError), never a NotFoundError about its request.
    with pytest.raises(anthropic.InternalServerError) as caught:
        create(client, model=SONNET, stream=stream)
    assert_api_error(caught.value, 502, "api_error")
    assert "not enabled" in caught.value.message
    last = stack.sim("GET", "/_sim/requests")[-1]
    assert (last["region"], last["model"], last["status"]) == ("europe-west4", SONNET, 404)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_upstream_429_is_rate_limit(fresh_stack, kind: str, stream: bool) -> None:
    stack = fresh_stack
    # Both Haiku regions refuse once: Spillway falls back from one to the
    # other, then (not allowed to wait) answers 429 with a retry time.
    for region in ("us-central1", "europe-west4"):
        stack.sim(
            "POST",
            "/_sim/faults",
            {"region": region, "model": HAIKU, "kind": {"type": "status", "status": 429}, "remaining": 1},
        )
    impatient = make_client(kind, stack, max_retries=0, default_headers={"x-spillway-max-wait-ms": "0"})
    with impatient, upstream_calls(stack, 2), pytest.raises(anthropic.RateLimitError) as caught:
        create(impatient, stream=stream)
    assert_api_error(caught.value, 429, "rate_limit_error")
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
    assert stack.sim("GET", "/_sim/faults") == [], "each fault was used up by exactly one call"
    # A client that may wait is served once a region's cooldown ends.
    with make_client(kind, stack) as patient:
        assert_text_message(create(patient), 5)


@pytest.mark.parametrize("kind", CLIENTS)
def test_wrong_key_is_authentication_error(stack, kind: str) -> None:
    with make_client(kind, stack, key="sk-spw-not-a-configured-key") as c:
        with upstream_calls(stack, 0), pytest.raises(anthropic.AuthenticationError) as caught:
            create(c)
    assert_api_error(caught.value, 401, "authentication_error")


def test_roles_not_alternating_is_bad_request(stack, client: Client) -> None:
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    with upstream_calls(stack, 0), pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=HAIKU, max_tokens=64, messages=messages)
    assert_api_error(caught.value, 400, "invalid_request_error")
    assert "alternate" in caught.value.body["error"]["message"]


def test_unknown_model_is_not_found(stack, client: Client) -> None:
    with upstream_calls(stack, 0), pytest.raises(anthropic.NotFoundError) as caught:
        create(client, model="claude-nonexistent@20990101")
    assert_api_error(caught.value, 404, "not_found_error")


# --- what reached upstream -----------------------------------------------------


def test_no_client_credential_or_version_header_upstream(stack) -> None:
    """Runs last: checks every request the simulator recorded during the session.

    It first sends one request of each kind through both clients, so it
    proves something even when run alone.
    """
    for kind in CLIENTS:
        with make_client(kind, stack) as c:
            create(c)
            with c.messages.stream(model=HAIKU, max_tokens=64, messages=ask(3)) as s:
                s.until_done()
            c.messages.count_tokens(model=HAIKU, messages=ask(3))

    recorded = stack.sim("GET", "/_sim/requests")
    actions = {(r["model"], r["action"]) for r in recorded}
    assert {(HAIKU, "rawPredict"), (HAIKU, "streamRawPredict"), ("count-tokens", "rawPredict")} <= actions
    for record in recorded:
        assert record["authorization"] == f"Bearer {stack.upstream_token}", record
        assert record["has_x_api_key"] is False, record
        assert record["anthropic_version_header"] is None, record
        assert stack.key not in json.dumps(record), record


def test_models_list_and_retrieve(stack) -> None:
    """`client.models` (the Anthropic client; Vertex has no Models API) reads the catalog."""
    with make_client("anthropic", stack) as client:
        ids = [m.id for m in client.models.list()]
        assert HAIKU_ANTHROPIC in ids
        model = client.models.retrieve(HAIKU_ANTHROPIC)
        assert model.id == HAIKU_ANTHROPIC
        assert model.display_name == "Claude 3 Haiku"
        assert model.created_at.year == 2024
        with pytest.raises(anthropic.NotFoundError):
            client.models.retrieve("claude-9")
