"""POST /v1/completions, /tokenize and /detokenize against the real server (openai client + httpx)."""

from __future__ import annotations

import anyio
import openai
import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, sse_chunks, user

GREEDY = {"temperature": 0.0}
FINISH_REASONS = {"stop", "length"}


def _tokenize(server: Server, **body) -> dict:
    with server.http() as client:
        response = client.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _post(server: Server, path: str, body: dict, **kwargs):
    with server.http(**kwargs) as client:
        return client.post(path, json=body)


def _create(server: Server, **kwargs):
    return server.openai().completions.create(model=server.model_name, **kwargs)


def test_string_prompt(text_server: Server) -> None:
    completion = _create(text_server, prompt="Once upon a time", max_tokens=6)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == text_server.model_name
    assert completion.system_fingerprint
    [choice] = completion.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.logprobs is None
    assert choice.finish_reason in FINISH_REASONS
    usage = completion.usage
    assert usage.prompt_tokens == _tokenize(text_server, prompt="Once upon a time")["count"]
    assert 0 < usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_default_max_tokens_is_16(text_server: Server) -> None:
    body = {"prompt": "Count with me", "ignore_eos": True}
    response = _post(text_server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 16
    assert "x-request-warnings" not in response.headers  # a default is not the client's to be told about
    # null: the server's default (MAX_NEW_TOKENS_DEFAULT, 64 here)
    response = _post(text_server, "/v1/completions", {**body, "max_tokens": None})
    assert response.json()["usage"]["completion_tokens"] == 64


def test_prompt_list_with_n_indexes_prompt_major(text_server: Server) -> None:
    prompts = ["The cat", "A dog barked"]
    fixed = {"max_tokens": 5, "extra_body": {"ignore_eos": True}, **GREEDY}
    batch = _create(text_server, prompt=prompts, n=2, **fixed)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.completion_tokens == 4 * 5
    assert batch.usage.prompt_tokens == sum(_tokenize(text_server, prompt=p)["count"] for p in prompts)
    alone = _create(text_server, prompt=prompts[1], **fixed)
    texts = [c.text for c in batch.choices]
    assert texts[2] == texts[3] == alone.choices[0].text  # greedy: prompt 1's choices are indices 2 and 3


def test_several_prompts_with_n_under_load_all_answer(text_server: Server) -> None:
    """The engine-v1 bug: choices of multi-prompt n > 1 requests could not get cache slots on a busy
    replica and failed their neighbours. 4 prompts x n=4 next to 8 chat requests: all 200."""
    results: dict[str, object] = {}

    async def main() -> None:
        client = text_server.async_openai()
        common = {"model": text_server.model_name, "temperature": 0.7, "extra_body": {"ignore_eos": True}}

        async def wide(key: str) -> None:
            results[key] = await client.completions.create(
                prompt=[f"prompt {i} " * 5 for i in range(4)], n=4, max_tokens=6, **common
            )

        async def chat(key: str) -> None:
            results[key] = await client.chat.completions.create(
                messages=user(f"chat {key}"), max_tokens=12, **common
            )

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(2):
                    tg.start_soon(wide, f"wide{i}")
                for i in range(8):
                    tg.start_soon(chat, f"chat{i}")

    anyio.run(main)
    for key in ("wide0", "wide1"):
        assert [c.index for c in results[key].choices] == list(range(16))
        assert results[key].usage.completion_tokens == 16 * 6
    assert all(results[f"chat{i}"].usage.completion_tokens == 12 for i in range(8))


def test_token_id_prompts_match_text_prompts(text_server: Server) -> None:
    client = text_server.openai()
    text = "Hello world, how are"
    ids = _tokenize(text_server, prompt=text)["tokens"]
    kwargs = {"model": text_server.model_name, "max_tokens": 6, "extra_body": {"ignore_eos": True}, **GREEDY}
    by_text = client.completions.create(prompt=text, **kwargs).choices[0].text
    assert client.completions.create(prompt=ids, **kwargs).choices[0].text == by_text
    nested = client.completions.create(prompt=[ids, ids[:2]], **kwargs)
    assert [c.index for c in nested.choices] == [0, 1]
    assert nested.choices[0].text == by_text


def test_echo(text_server: Server) -> None:
    completion = _create(text_server, prompt="Echo me", echo=True, max_tokens=3)
    assert completion.choices[0].text.startswith("Echo me")
    ids = _tokenize(text_server, prompt="Echo ü 日本")["tokens"]
    by_ids = _create(text_server, prompt=ids, echo=True, max_tokens=3)
    assert by_ids.choices[0].text.startswith("Echo ü 日本")


@pytest.mark.parametrize("echo", [False, True])
def test_logprobs_shape(text_server: Server, echo: bool) -> None:
    prompt = "Logprobs please"
    completion = _create(
        text_server, prompt=prompt, max_tokens=5, logprobs=3, echo=echo, extra_body={"ignore_eos": True}
    )
    logprobs = completion.choices[0].logprobs
    # With echo the prompt's tokens come first (the first with a null logprob): tests/integration/test_scoring.py.
    skip = len(_tokenize(text_server, prompt=prompt)["tokens"]) if echo else 0
    lists = (logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset)
    assert [len(values) for values in lists] == [skip + 5] * 4
    assert (logprobs.token_logprobs[0] is None) == echo
    tokens, token_logprobs, top_logprobs, text_offset = (values[skip:] for values in lists)
    assert all(isinstance(lp, float) and lp <= 0.0 for lp in token_logprobs)
    for token, logprob, top in zip(tokens, token_logprobs, top_logprobs, strict=False):
        assert 1 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
    assert text_offset[0] == (len(prompt) if echo else 0)
    steps = [b - a for a, b in zip(text_offset, text_offset[1:], strict=False)]
    assert steps == [len(t) for t in tokens[:-1]]


def test_streamed_echo_carries_the_logprobs_of_a_prompt_prefilled_in_chunks(text_server: Server) -> None:
    """A prompt longer than one prefill chunk (128 tokens on CPU): the streamed echo was built
    from the first chunk's logprobs only (129 of 204 tokens); it now waits for the first token."""
    body = {"prompt": "word " * 200, "echo": True, "logprobs": 1, "max_tokens": 3, **GREEDY}
    whole = _post(text_server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    streamed = {"tokens": [], "text_offset": [], "token_logprobs": []}
    with text_server.http() as client:
        raw = client.post("/v1/completions", json={**body, "stream": True}).text
    for chunk in sse_chunks(raw):
        for choice in chunk["choices"]:
            for key in streamed:
                streamed[key] += (choice["logprobs"] or {}).get(key) or []
    assert len(whole["tokens"]) > 200
    assert streamed["tokens"] == whole["tokens"] and streamed["text_offset"] == whole["text_offset"]
    assert streamed["token_logprobs"][1:] == pytest.approx(whole["token_logprobs"][1:], abs=1e-4)


def test_logprobs_limit(text_server: Server) -> None:
    response = _post(text_server, "/v1/completions", {"prompt": "x", "logprobs": 21})
    assert_openai_error(response, 400, param="logprobs")


def test_stream_with_usage_matches_non_stream(text_server: Server) -> None:
    client = text_server.openai()
    kwargs = {"model": text_server.model_name, "prompt": "Stream this", "max_tokens": 8, **GREEDY}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert {c.object for c in chunks} == {"text_completion"}
    assert {c.id for c in chunks} == {chunks[0].id}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])  # null, as OpenAI
    plain = client.completions.create(stream=True, **kwargs)
    assert all("usage" not in c.model_fields_set for c in plain)  # not asked for: left out


def test_stream_continuous_usage_stats_counts_every_prompt(text_server: Server) -> None:
    client = text_server.openai()
    kwargs = {"model": text_server.model_name, "prompt": ["one", "two"], "max_tokens": 5, **GREEDY}
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(stream=True, stream_options=options, **kwargs))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 10  # both prompts' tokens
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.total_tokens == client.completions.create(**kwargs).usage.total_tokens
    )


def test_stream_raw_sse_with_prompts_and_logprobs(text_server: Server) -> None:
    body = {"prompt": ["one", "two"], "n": 2, "max_tokens": 3, "stream": True, "logprobs": 1, "echo": True}
    with text_server.http() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(response.text)
    texts: dict[int, str] = {}
    for chunk in chunks:
        [choice] = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert set(choice["logprobs"]) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts[0].startswith("one") and texts[3].startswith("two")


def test_async_client(text_server: Server) -> None:
    async def main() -> None:
        client = text_server.async_openai()
        kwargs = {"model": text_server.model_name, "prompt": "Async", "max_tokens": 4}
        completion = await client.completions.create(**kwargs)
        assert completion.choices[0].finish_reason in FINISH_REASONS
        stream = await client.completions.create(stream=True, **kwargs)
        finishes = [c.choices[0].finish_reason async for c in stream]
        assert finishes[-1] in FINISH_REASONS
        await client.close()

    anyio.run(main)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "suffix": "tail"}, "suffix"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": [1, 5, 10**6]}, "prompt"),
        ({"prompt": [[1, 2], [-1]]}, "prompt"),
        ({"prompt": [1, "mixed"]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_invalid_requests(text_server: Server, body: dict, param: str) -> None:
    error = assert_openai_error(_post(text_server, "/v1/completions", body), 400, param=param)
    if param == "suffix":
        assert error["message"] == "suffix is not supported"


def test_best_of_equal_to_n_is_accepted(text_server: Server) -> None:
    response = _post(text_server, "/v1/completions", {"prompt": "x", "n": 2, "best_of": 2, "max_tokens": 2})
    assert response.status_code == 200 and len(response.json()["choices"]) == 2


def test_openai_client_raises_on_suffix(text_server: Server) -> None:
    with pytest.raises(openai.BadRequestError):
        text_server.openai().completions.create(model=text_server.model_name, prompt="x", suffix="y")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x"}),
        ("/tokenize", {"prompt": "x"}),
        ("/detokenize", {"tokens": [1]}),
    ],
)
def test_wrong_model_and_auth(text_server: Server, path: str, body: dict) -> None:
    wrong = _post(text_server, path, {**body, "model": "not-served"})
    assert_openai_error(wrong, 404, code="model_not_found", param="model")
    assert_openai_error(_post(text_server, path, body, authenticated=False), 401)
    assert _post(text_server, path, {**body, "model": text_server.model_name}).status_code == 200


@pytest.mark.parametrize("text", ["plain ASCII, with punctuation!", "héllo wörld — 日本語 🙂 ok"])
def test_tokenize_detokenize_round_trip(text_server: Server, text: str) -> None:
    tokenized = _tokenize(text_server, prompt=text)
    assert tokenized["count"] == len(tokenized["tokens"]) > 0
    assert isinstance(tokenized["max_model_len"], int) and tokenized["max_model_len"] > 0
    response = _post(text_server, "/detokenize", {"tokens": tokenized["tokens"]})
    assert response.status_code == 200 and response.json() == {"prompt": text}


def test_tokenize_messages_matches_apply_template(text_server: Server) -> None:
    messages = user("What is in a name?")
    rendered = _post(text_server, "/v1/apply_template", {"messages": messages}).json()["prompt"]
    expected = _tokenize(text_server, prompt=rendered, add_special_tokens=False)
    tokenized = _tokenize(text_server, messages=messages, add_generation_prompt=True)
    assert tokenized["tokens"] == expected["tokens"] and tokenized["count"] == expected["count"]


def test_an_assistant_refusal_replayed_reaches_the_template(text_server: Server) -> None:
    """OpenAI answers a refusal as `refusal` (content null) or as a refusal part; a client that
    sends the conversation back must not lose that turn."""
    turns = [
        user("First?")[0],
        {"role": "assistant", "content": None, "refusal": "I cannot say."},
        user("Second?")[0],
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "Nor that."}]},
        user("Third?")[0],
    ]
    rendered = _post(text_server, "/v1/apply_template", {"messages": turns}).json()["prompt"]
    assert "I cannot say." in rendered and "Nor that." in rendered
    as_user = [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]
    assert_openai_error(
        _post(text_server, "/v1/apply_template", {"messages": as_user}), 400, param="messages[0].content[0]"
    )


def test_tokenize_and_detokenize_errors(text_server: Server) -> None:
    assert_openai_error(_post(text_server, "/detokenize", {"tokens": [1, 10**6]}), 400, param="tokens")
    assert_openai_error(_post(text_server, "/tokenize", {}), 400, param="prompt")
    both = _post(text_server, "/tokenize", {"prompt": "x", "messages": user()})
    assert_openai_error(both, 400, param="prompt")


def test_fields_the_tokenizer_routes_do_not_declare_follow_the_generation_routes_policy(
    text_server: Server,
) -> None:
    """`chat_template` and `continue_final_message` change a rendering: a 400, as on chat; an
    unknown field is named in X-Request-Warnings. Both were dropped without a word."""
    messages = user("hi")
    for path, body in (
        ("/tokenize", {"messages": messages}),
        ("/v1/apply_template", {"messages": messages}),
    ):
        for field, value in (("chat_template", "{{ 'X' }}"), ("continue_final_message", True)):
            assert_openai_error(_post(text_server, path, {**body, field: value}), 400, param=field)
        response = _post(text_server, path, {**body, "return_token_strs": True})
        assert response.status_code == 200
        assert "return_token_strs" in response.headers["X-Request-Warnings"], path
    response = _post(text_server, "/detokenize", {"tokens": [5, 6], "skip_special_tokens": False})
    assert response.status_code == 200 and "skip_special_tokens" in response.headers["X-Request-Warnings"]
    assert "X-Request-Warnings" not in _post(text_server, "/detokenize", {"tokens": [5, 6]}).headers


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bans_that_leave_no_token_are_a_400(text_server: Server, temperature: float) -> None:
    """min_tokens bans the end and stop tokens; stop_token_ids covering the tiny model's whole
    vocabulary left nothing: sampled, a 500 blaming the model; greedy, a banned token emitted."""
    body = {
        "prompt": "The quick brown fox",
        "max_tokens": 5,
        "min_tokens": 3,
        "temperature": temperature,
        "stop_token_ids": list(range(1024)),
    }
    assert_openai_error(_post(text_server, "/v1/completions", body), 400, param="stop_token_ids")


def test_each_cut_prompt_of_several_is_named_by_its_index(base_server: Server) -> None:
    """`the first N were dropped` said which prompt only by its place among the warnings."""
    with base_server.http() as http:
        response = http.post(
            "/v1/completions",
            json={"prompt": ["short", "zebra " * 100, "zebra " * 200], "max_tokens": 1, "bogus": 1},
        )
    assert response.status_code == 200, response.text
    warnings = response.json()["warnings"]
    assert warnings[0].startswith("unknown field"), warnings  # the request's own, once, unprefixed
    cuts = [w for w in warnings[1:] if "MAX_INPUT_TOKENS=64" in w]
    assert [w.split(":")[0] for w in cuts] == ["prompt[1]", "prompt[2]"], warnings
    assert response.headers["x-request-warnings"].count("prompt[") == 2
    # What every prompt is told alike is said once, without an index.
    with base_server.http() as http:
        capped = http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 500})
    lowered = [w for w in capped.json()["warnings"] if "was lowered" in w]
    assert len(lowered) == 1 and not lowered[0].startswith("prompt["), capped.json()["warnings"]
