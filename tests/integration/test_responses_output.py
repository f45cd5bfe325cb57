"""What a /v1/responses answer reports about its tokens: logprobs when `include` asks for them
(create, stream and raw HTTP alike), and the length limit it was generated under when the
server's cap lowered `max_output_tokens`."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, comparable_response


# -- logprobs ---------------------------------------------------------------------------------------
def test_logprobs_with_the_include_streamed_or_not(text_server: Server) -> None:
    client = text_server.openai()
    kwargs = {
        "model": text_server.model_name,
        "input": "hello",
        "max_output_tokens": 6,
        "temperature": 0,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 3,
    }
    created = client.responses.create(**kwargs)
    [part] = created.output[0].content
    assert created.top_logprobs == 3 and len(part.logprobs) == created.usage.output_tokens
    for entry in part.logprobs:
        assert len(entry.top_logprobs) == 3 and all(0 <= b < 256 for b in entry.bytes)
        # Greedy: each token is its position's most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob

    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    final = events[-1].response
    assert comparable_response(final)["output"][0]["content"][0]["text"] == part.text
    streamed = final.output[0].content[0].logprobs
    assert [e.token for e in streamed] == [e.token for e in part.logprobs]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in part.logprobs], abs=1e-3)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [lp.token for e in deltas for lp in e.logprobs] == [e.token for e in streamed]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert [lp.token for lp in done.logprobs] == [e.token for e in streamed]

    parsed = client.responses.parse(**kwargs)
    assert len(parsed.output[0].content[0].logprobs) == parsed.usage.output_tokens


def test_logprobs_over_http_have_openai_shape(text_server: Server) -> None:
    body = {"input": "hi", "max_output_tokens": 2, "include": ["message.output_text.logprobs"]}
    with text_server.http() as http:
        response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    [entry, *_] = response.json()["output"][0]["content"][0]["logprobs"]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["top_logprobs"] == []


def test_top_logprobs_without_the_include_returns_none_and_says_so(text_server: Server) -> None:
    with text_server.http() as http:
        response = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, "top_logprobs": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output"][0]["content"][0]["logprobs"] == [] and body["top_logprobs"] == 5
    [warning] = body["warnings"]
    assert (
        "message.output_text.logprobs" in warning and "top_logprobs" in response.headers["x-request-warnings"]
    )


def test_logprobs_true_is_refused_with_the_way_that_works(text_server: Server) -> None:
    client = text_server.openai()
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(
            model=text_server.model_name, input="hi", max_output_tokens=2, extra_body={"logprobs": True}
        )
    assert raised.value.body["param"] == "logprobs"
    assert 'include: ["message.output_text.logprobs"]' in raised.value.body["message"]


# -- the server's cap on max_output_tokens ---------------------------------------------------------
def test_a_lowered_max_output_tokens_is_echoed_and_reported(text_server: Server) -> None:
    client = text_server.openai()
    raw = client.responses.with_raw_response.create(
        model=text_server.model_name, input="hello", max_output_tokens=1000, temperature=0
    )
    response = raw.parse()
    lowered = "max_output_tokens 1000 was lowered to this server's limit of 64 (MAX_NEW_TOKENS_DEFAULT)"
    assert raw.headers["x-request-warnings"] == lowered
    assert response.max_output_tokens == 64 and response.model_extra["warnings"] == [lowered]
    assert response.usage.output_tokens <= 64
    if response.status == "incomplete":
        assert (
            response.incomplete_details.reason == "max_output_tokens" and response.usage.output_tokens == 64
        )
    with client.responses.stream(
        model=text_server.model_name, input="hello", max_output_tokens=1000, temperature=0
    ) as stream:
        events = list(stream)
    assert events[0].response.max_output_tokens == 64
    assert events[0].response.model_extra["warnings"] == [lowered]
    assert comparable_response(events[-1].response) == comparable_response(response)
    # Absent, the limit used is the server's, echoed too.
    default = client.responses.create(model=text_server.model_name, input="hello")
    assert default.max_output_tokens == 64 and default.model_extra["warnings"] is None


def test_errors_name_max_output_tokens(text_server: Server) -> None:
    with text_server.http() as http:
        response = http.post("/v1/responses", json={"max_output_tokens": 10**6, "input": "word " * 4000})
    error = assert_openai_error(response, 400, code="context_length_exceeded", param="max_output_tokens")
    assert "max_output_tokens" in error["message"] and "max_tokens" not in error["message"]
