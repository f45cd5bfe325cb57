"""Request fields of /v1/chat/completions, one behaviour each, with the official openai client.

Each test pins a behaviour a random-weight model still shows deterministically (greedy outputs,
biases strong enough to decide the argmax, filters that reduce sampling to greedy)."""

from __future__ import annotations

from typing import Any, Literal

import openai
import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import user
from tests.integration.test_chat import first_new_substring


def create(server: Server, **kwargs: Any):
    kwargs.setdefault("messages", user("Tell me about the weather"))
    kwargs.setdefault("model", server.model_name)
    return server.openai().chat.completions.create(**kwargs)


def token_id(server: Server, text: str) -> int:
    with server.http() as client:
        return client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"][
            0
        ]


def greedy_text(server: Server, **kwargs: Any) -> str:
    kwargs.setdefault("max_tokens", 10)
    extra = {"ignore_eos": True, **kwargs.pop("extra_body", {})}
    return create(server, temperature=0, extra_body=extra, **kwargs).choices[0].message.content


def test_max_completion_tokens_wins_over_max_tokens(text_server: Server) -> None:
    reply = create(text_server, max_completion_tokens=5, max_tokens=20, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    # ... and says so (the ignored max_tokens was a silent choice).
    assert reply.model_extra["warnings"] == ["max_tokens ignored: max_completion_tokens (5) is given"]


def test_a_lowered_or_refused_max_completion_tokens_is_named_as_sent(text_server: Server) -> None:
    """The engine's words are max_tokens': a client that sent only max_completion_tokens read
    "max_tokens 1000 was lowered" and, past the context, an error with param max_tokens."""
    lowered = create(text_server, max_completion_tokens=1000)
    assert lowered.model_extra["warnings"][0].startswith("max_completion_tokens 1000 was lowered to")
    with pytest.raises(openai.BadRequestError) as refused:
        create(text_server, max_completion_tokens=100, messages=user("word " * 4000))
    assert refused.value.body["param"] == "max_completion_tokens"
    assert (
        "max_completion_tokens" in refused.value.message
        and "max_tokens" not in refused.value.message.replace("max_completion_tokens", "")
    )
    plain = create(text_server, max_tokens=1000)
    assert plain.model_extra["warnings"][0].startswith("max_tokens 1000 was lowered to")


def test_logit_bias_decides_the_token(text_server: Server) -> None:
    target = token_id(text_server, " weather")
    reply = create(
        text_server,
        temperature=0,
        max_tokens=4,
        logit_bias={str(target): 100},
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert [entry.token for entry in reply.choices[0].logprobs.content] == [" weather"] * 4


def test_presence_and_frequency_penalties_push_repeats_away(text_server: Server) -> None:
    target = str(token_id(text_server, " weather"))
    biased = create(
        text_server,
        temperature=0,
        max_tokens=8,
        logit_bias={target: 8},
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert all(e.token == " weather" for e in biased.choices[0].logprobs.content)
    penalised = create(
        text_server,
        temperature=0,
        max_tokens=8,
        logit_bias={target: 8},
        presence_penalty=2.0,
        frequency_penalty=2.0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert sum(e.token == " weather" for e in penalised.choices[0].logprobs.content) < 8


def test_repetition_penalty_changes_a_repetitive_greedy_answer(text_server: Server) -> None:
    # A bias towards one word makes the greedy answer repeat it: something to penalise, always.
    bias = {token_id(text_server, " weather"): 8}
    plain = create(
        text_server,
        temperature=0,
        max_tokens=12,
        logit_bias=bias,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    tokens = [e.token for e in plain.choices[0].logprobs.content]
    assert tokens.count(" weather") >= 2
    penalised = create(
        text_server,
        temperature=0,
        max_tokens=12,
        logit_bias=bias,
        logprobs=True,
        extra_body={"ignore_eos": True, "repetition_penalty": 5.0},
    )
    assert [e.token for e in penalised.choices[0].logprobs.content].count(" weather") < tokens.count(
        " weather"
    )


@pytest.mark.parametrize("extension", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_1_and_min_p_1_reduce_sampling_to_greedy(text_server: Server, extension: dict) -> None:
    sampled = create(
        text_server, temperature=1.5, seed=3, max_tokens=10, extra_body={"ignore_eos": True, **extension}
    )
    assert sampled.choices[0].message.content == greedy_text(text_server, max_tokens=10)


def test_top_p_tiny_is_greedy_too(text_server: Server) -> None:
    sampled = create(
        text_server, temperature=1.5, top_p=1e-6, seed=5, max_tokens=10, extra_body={"ignore_eos": True}
    )
    assert sampled.choices[0].message.content == greedy_text(text_server, max_tokens=10)


def test_min_tokens_and_ignore_eos_keep_generating(text_server: Server) -> None:
    eos = token_id(text_server, "<|im_end|>")
    # A huge bias makes end-of-sequence the argmax; min_tokens must still hold it back.
    reply = create(
        text_server, temperature=0, max_tokens=12, logit_bias={str(eos): 100}, extra_body={"min_tokens": 6}
    )
    # Six tokens, then the end-of-sequence token (counted in usage, never in the text).
    assert reply.usage.completion_tokens == 7 and reply.choices[0].finish_reason == "stop"
    reply = create(
        text_server, temperature=0, max_tokens=12, logit_bias={str(eos): 100}, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"


def test_stop_list_and_stop_token_ids(text_server: Server) -> None:
    full = (
        create(text_server, temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
        .choices[0]
        .message.content
    )
    at, stop = first_new_substring(full)
    cut = create(
        text_server,
        temperature=0,
        max_tokens=20,
        stop=["never-appears", stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:at]
    target = token_id(text_server, " weather")
    reply = create(
        text_server,
        temperature=0,
        max_tokens=8,
        logit_bias={str(target): 100},
        extra_body={"stop_token_ids": [target]},
    )
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == ""


def test_top_logprobs_are_sorted_log_probabilities(text_server: Server) -> None:
    reply = create(text_server, temperature=0, max_tokens=3, logprobs=True, top_logprobs=5)
    for entry in reply.choices[0].logprobs.content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 5 and values == sorted(values, reverse=True) and values[0] <= 0
        assert entry.logprob == pytest.approx(values[0])  # greedy took the most likely token
        # The token's own bytes: `token` is U+FFFD where they hold only part of a character.
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        if "\ufffd" not in entry.token:
            assert entry.bytes == list(entry.token.encode())


def test_user_and_every_role_with_content_parts(text_server: Server) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather?"}, {"type": "text", "text": "In Paris."}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    reply = create(text_server, messages=messages, user="user-123", max_tokens=4)
    assert reply.choices[0].finish_reason in {"stop", "length"}
    with text_server.http() as client:
        prompt = client.post("/v1/apply_template", json={"messages": messages}).json()["prompt"]
    # The parts reach the template as sent; the built-in template, like Qwen's, writes them one
    # after the other, as transformers and vLLM render it.
    assert "Answer in French." in prompt and "Weather?In Paris." in prompt
    assert '"city": "Paris"' in prompt and "sunny" in prompt


# -- LangChain's ChatOpenAI against the same server -------------------------------------------------
def chat_model(server: Server, **kwargs: Any):
    return server.langchain(**kwargs)


def test_langchain_invoke_and_stream(text_server: Server) -> None:
    llm = chat_model(text_server, max_tokens=8)
    invoked = llm.invoke("hello")
    assert isinstance(invoked.content, str) and invoked.response_metadata["finish_reason"] in {
        "stop",
        "length",
    }
    streamed = "".join(chunk.content for chunk in llm.stream("hello"))
    assert streamed == invoked.content


def test_langchain_tool_binding(text_server: Server) -> None:
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Weather for a city."""
        return "sunny"

    llm = chat_model(text_server, max_tokens=40).bind_tools([get_weather], tool_choice="get_weather")
    message = llm.invoke("What is the weather in Paris?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert message.tool_calls[0]["args"]["city"] in {"Paris", "Rome"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": user("hi"), "n": None, "stream": None, "logprobs": None}),
        ("/v1/completions", {"prompt": "hi", "n": None, "stream": None, "echo": None}),
        ("/v1/responses", {"input": "hi", "stream": None}),
    ],
    ids=["chat", "completions", "responses"],
)
def test_null_is_the_default_where_openai_allows_it(text_server: Server, path: str, body: dict) -> None:
    """OpenAI's reference marks n, stream, logprobs and echo nullable; null was a 400 here."""
    limit = {"max_output_tokens": 2} if path == "/v1/responses" else {"max_tokens": 2}
    with text_server.http() as client:
        response = client.post(path, json={**body, **limit})
    assert response.status_code == 200, response.text
    answer = response.json()
    if path != "/v1/responses":
        assert len(answer["choices"]) == 1 and answer["choices"][0]["logprobs"] is None
    else:
        assert answer["status"] in ("completed", "incomplete")


def test_top_logprobs_zero_without_logprobs_changes_nothing(text_server: Server) -> None:
    """Clients that always send top_logprobs (0 by default) with logprobs off got a 400; a value
    that asks for something without logprobs still does."""
    reply = create(text_server, temperature=0, max_tokens=2, logprobs=False, top_logprobs=0)
    assert reply.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as refused:
        create(text_server, temperature=0, max_tokens=2, logprobs=False, top_logprobs=2)
    assert refused.value.body["param"] == "top_logprobs"
