"""POST /v1/chat/completions with the official openai client (sync and async) and raw httpx."""

from __future__ import annotations

import json
import uuid

import anyio
import pytest

from tests.integration.conftest import TEXT_DEFAULT_MAX_TOKENS, Server
from tests.integration.helpers import assert_openai_error, chat_body, sse_chunks, user

FINISH_REASONS = {"stop", "length"}


def _assert_usage(usage, *, max_tokens: int) -> None:
    assert usage.prompt_tokens > 0
    assert 0 <= usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_non_streaming(text_server: Server) -> None:
    completion = text_server.openai().chat.completions.create(
        model=text_server.model_name, messages=user("Tell me a story"), max_tokens=12
    )
    assert completion.object == "chat.completion"
    assert completion.id
    assert completion.model == text_server.model_name
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in FINISH_REASONS
    _assert_usage(completion.usage, max_tokens=12)
    if choice.finish_reason == "length":
        assert completion.usage.completion_tokens == 12


def test_non_streaming_raw_body(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=chat_body(max_tokens=4))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert isinstance(body["latency_seconds"], float) and body["latency_seconds"] >= 0  # the seed's extension
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_with_openai_client(text_server: Server) -> None:
    client = text_server.openai()
    ask = {
        "model": text_server.model_name,
        "messages": user("Tell me a story"),
        "max_tokens": 10,
        "temperature": 0,
    }
    stream = client.chat.completions.create(**ask, stream=True)
    chunks = list(stream)
    assert chunks
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in FINISH_REASONS
    assert chunks[-1].choices[0].finish_reason == finishes[0]
    assert all(c.usage is None for c in chunks)  # no usage unless asked for
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    # The deltas add up to exactly the answer the same greedy request gets whole.
    assert text == client.chat.completions.create(**ask).choices[0].message.content


def test_stream_include_usage(text_server: Server) -> None:
    client = text_server.openai()
    stream = client.chat.completions.create(
        model=text_server.model_name,
        messages=user("Count to ten"),
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    _assert_usage(last.usage, max_tokens=9)
    assert all(c.usage is None for c in chunks[:-1])
    # Same prompt, same prompt-token count as a non-streamed request.
    plain = client.chat.completions.create(
        model=text_server.model_name, messages=user("Count to ten"), max_tokens=1
    )
    assert plain.usage.prompt_tokens == last.usage.prompt_tokens
    # null is the default, as for the other optional fields (it was a 400).
    nulls = client.chat.completions.create(
        model=text_server.model_name,
        messages=user("Count to ten"),
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": None, "continuous_usage_stats": None},
    )
    assert all(c.usage is None for c in nulls)


def test_stream_continuous_usage_stats(text_server: Server) -> None:
    """vLLM's option: with include_usage, every chunk carries the usage so far; the final usage
    chunk is still last. Without include_usage it changes nothing, as in vLLM."""
    client = text_server.openai()
    ask = dict(model=text_server.model_name, messages=user("Count to ten"), max_tokens=7, stream=True)
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.chat.completions.create(**ask, stream_options=options))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 7
    prompt_tokens = chunks[-1].usage.prompt_tokens
    assert all(c.usage.prompt_tokens == prompt_tokens for c in chunks)
    assert all(c.usage.total_tokens == prompt_tokens + c.usage.completion_tokens for c in chunks)
    alone = list(client.chat.completions.create(**ask, stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in alone)


def test_usage_counts_prompt_tokens_from_the_prefix_cache(text_server: Server) -> None:
    """OpenAI's `prompt_tokens_details.cached_tokens`: the first time a prompt is seen, at most the
    template's opening that other requests share; when it comes again, all of it in whole KV
    blocks (16 tokens) but the last token's."""
    client = text_server.openai()
    ask = dict(
        model=text_server.model_name,
        messages=user(f"{uuid.uuid4().hex} " + "a long shared prefix of words " * 12),
        max_tokens=2,
    )
    first = client.chat.completions.create(**ask).usage
    again = client.chat.completions.create(**ask).usage
    before = first.prompt_tokens_details.cached_tokens  # present even when 0, as OpenAI sends it
    cached = again.prompt_tokens_details.cached_tokens
    assert before < cached < again.prompt_tokens == first.prompt_tokens
    assert cached % 16 == 0 and cached > again.prompt_tokens - 2 * 16
    streamed = list(
        client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    )
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == cached
    response = client.responses.create(
        model=text_server.model_name, input=ask["messages"], max_output_tokens=2
    )
    assert response.usage.input_tokens_details.cached_tokens == cached


def test_raw_sse_ends_with_done(text_server: Server) -> None:
    body = chat_body("Hi there", max_tokens=6, stream=True, stream_options={"include_usage": True})
    with text_server.http() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.rstrip("\n").endswith("data: [DONE]")
    chunks = sse_chunks(raw)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    # With include_usage, every other chunk says `usage: null`, as OpenAI sends them (it was absent).
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) <= usage["completion_tokens"]


def test_greedy_is_deterministic(text_server: Server) -> None:
    client = text_server.openai()

    def run() -> str:
        completion = client.chat.completions.create(
            model=text_server.model_name, messages=user("Once upon a time"), max_tokens=16, temperature=0
        )
        return completion.choices[0].message.content

    first, second = run(), run()
    assert first == second
    assert first  # the tiny model does produce text


def test_greedy_stream_matches_non_stream(text_server: Server) -> None:
    client = text_server.openai()
    kwargs = dict(
        model=text_server.model_name, messages=user("The weather today"), max_tokens=16, temperature=0
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kwargs)
        if c.choices
    )
    assert streamed == whole


def test_seed_makes_sampling_reproducible(text_server: Server) -> None:
    client = text_server.openai()

    def run(seed: int) -> str:
        completion = client.chat.completions.create(
            model=text_server.model_name,
            messages=user("Pick some words"),
            max_tokens=16,
            temperature=1.0,
            seed=seed,
        )
        return completion.choices[0].message.content

    assert run(1234) == run(1234)
    # Different seeds draw differently (16 tokens from a flat random model: a collision is ~impossible).
    assert len({run(1), run(2), run(3)}) > 1


@pytest.mark.slow
def test_max_tokens_is_clamped_to_server_default(text_server: Server) -> None:
    """--default-max-tokens caps a request's max_tokens (and is the default when it is omitted)."""
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=chat_body(max_tokens=1000, ignore_eos=True))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == TEXT_DEFAULT_MAX_TOKENS
    assert body["choices"][0]["finish_reason"] == "length"


def test_max_tokens_past_the_context_is_clamped_not_refused(text_server: Server) -> None:
    """The seed clamps a larger request to the cap: 100,000 (past the 4,096-token context) is lowered to
    it and answered, with the lowering in the warnings, not refused for a context it no longer exceeds."""
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=chat_body(max_tokens=100_000, ignore_eos=True))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == TEXT_DEFAULT_MAX_TOKENS
    assert any("100000 was lowered" in warning for warning in body["warnings"])
    assert "lowered" in response.headers["X-Request-Warnings"]


def test_stop_string_truncates_output(text_server: Server) -> None:
    client = text_server.openai()
    kwargs = dict(
        model=text_server.model_name, messages=user("Say something long"), max_tokens=24, temperature=0
    )
    full = (
        client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].message.content
    )
    at, stop = first_new_substring(full)
    stopped = client.chat.completions.create(stop=[stop], **kwargs, extra_body={"ignore_eos": True}).choices[
        0
    ]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == full[:at]


def test_min_tokens_holds_stop_strings_off(text_server: Server) -> None:
    """As in vLLM: before min_tokens tokens, a stop string ends nothing (it used to end the answer
    after two tokens, min_tokens or not)."""
    client = text_server.openai()
    kwargs = dict(
        model=text_server.model_name, messages=user("Say something long"), max_tokens=24, temperature=0
    )
    whole = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    full = whole.choices[0].message.content
    at, stop = first_new_substring(full)
    held = client.chat.completions.create(
        stop=[stop], **kwargs, extra_body={"ignore_eos": True, "min_tokens": 24}
    )
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == 24
    assert held.choices[0].message.content == full  # the stop string stays in: it came too early


def first_new_substring(text: str, size: int = 3) -> tuple[int, str]:
    """The first `size` characters after the start that occur nowhere earlier: a stop string that
    cuts `text` exactly there (24 tokens of output always have one)."""
    for at in range(1, len(text) - size + 1):
        if text.find(text[at : at + size]) == at:
            return at, text[at : at + size]
    raise AssertionError(f"no usable stop string in {text!r}")


def test_logprobs(text_server: Server) -> None:
    completion = text_server.openai().chat.completions.create(
        model=text_server.model_name,
        messages=user(),
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        # Greedy picks the most likely token.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)


def test_n_choices(text_server: Server) -> None:
    client = text_server.openai()
    ask = {
        "model": text_server.model_name,
        "messages": user("pick words"),
        "max_tokens": 8,
        "temperature": 1.0,
    }
    extra = {"ignore_eos": True}
    completion = client.chat.completions.create(**ask, n=3, seed=7, extra_body=extra)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = [c.message.content for c in completion.choices]
    assert len(set(texts)) > 1  # independent draws, not one answer copied
    # One prefill: the prompt is counted once; choice 0 is the request with the same seed alone.
    single = client.chat.completions.create(**ask, seed=7, extra_body=extra)
    assert completion.usage.prompt_tokens == single.usage.prompt_tokens
    assert completion.usage.completion_tokens == 3 * 8
    assert texts[0] == single.choices[0].message.content
    # The next seed draws choices of its own, not this request's shifted by one.
    neighbour = client.chat.completions.create(**ask, n=3, seed=8, extra_body=extra)
    assert not set(texts) & {c.message.content for c in neighbour.choices}


def test_unknown_fields_are_accepted_and_named(text_server: Server) -> None:
    """Accepted, as clients with extensions expect, but said: other APIs' names (Ollama's
    `num_predict`, Anthropic's `stop_sequences`) would change the answer where they come from.
    Fields known to change nothing (`metadata`, `store`) are not named."""
    body = chat_body(max_tokens=2, foo=1, num_predict=3, metadata={"x": "y"}, store=False)
    body["messages"][0]["not_a_field"] = True
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in FINISH_REASONS
        assert response.json()["warnings"] == [
            "unknown field 'foo' ignored",
            "unknown field 'num_predict' ignored",
        ]
        assert "unknown field 'num_predict' ignored" in response.headers["x-request-warnings"]
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert "unknown field 'foo' ignored" in streamed.headers["x-request-warnings"]
        plain = client.post("/v1/chat/completions", json=chat_body(max_tokens=2, metadata={"x": "y"}))
        assert "x-request-warnings" not in plain.headers
        # A name a header cannot carry (headers are Latin-1) was a 500: escaped there, as is in the body.
        named = client.post("/v1/chat/completions", json={**chat_body(max_tokens=2), "名前": 1})
        assert named.status_code == 200, named.text
        assert named.json()["warnings"] == ["unknown field '名前' ignored"]
        assert named.headers["x-request-warnings"] == "unknown field '\\u540d\\u524d' ignored"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_output_tokens", 3),
        ("instructions", "Answer in French"),
        ("input", "hi"),
        ("text", {"format": {}}),
    ],
)
def test_responses_api_names_are_refused_on_chat(text_server: Server, field: str, value: object) -> None:
    """The Responses API's names would change the answer there and did nothing here, silently."""
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json={**chat_body(max_tokens=2), field: value})
    error = assert_openai_error(response, 400, param=field)
    assert "/v1/responses" in error["message"]


def test_openai_client_extra_body_is_accepted(text_server: Server) -> None:
    completion = text_server.openai().chat.completions.create(
        model=text_server.model_name, messages=user(), max_tokens=2, extra_body={"foo": 1, "top_k": 5}
    )
    assert completion.choices[0].finish_reason in FINISH_REASONS


def test_async_client_concurrent_requests(text_server: Server) -> None:
    async def main() -> list:
        client = text_server.async_openai()
        results: list = [None] * 4

        async def one(i: int) -> None:
            if i % 2:
                stream = await client.chat.completions.create(
                    model=text_server.model_name,
                    messages=user(f"request {i}"),
                    max_tokens=6,
                    temperature=0,
                    stream=True,
                )
                results[i] = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            else:
                completion = await client.chat.completions.create(
                    model=text_server.model_name, messages=user(f"request {i}"), max_tokens=6, temperature=0
                )
                results[i] = completion.choices[0].message.content

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, i)
        await client.close()
        return results

    results = anyio.run(main)
    assert len(results) == 4
    # Batched greedy equals greedy alone: rerun one request by itself.
    alone = text_server.openai().chat.completions.create(
        model=text_server.model_name, messages=user("request 0"), max_tokens=6, temperature=0
    )
    assert alone.choices[0].message.content == results[0]


def test_response_is_json_even_for_non_ascii(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=chat_body("héllo 世界 👋", max_tokens=4))
    assert response.status_code == 200
    json.loads(response.content.decode("utf-8"))
