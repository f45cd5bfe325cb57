"""STREAM_INTERVAL on a real server (mistral_server streams 3 tokens at a time): the openai client
reads the same text, logprobs, usage and stop as without streaming, in fewer events."""

from __future__ import annotations

import math

from tests.integration.conftest import MISTRAL_STREAM_INTERVAL, Server
from tests.integration.helpers import user

TOKENS = 20


def _streamed(server: Server, **ask) -> tuple[dict[int, str], dict[int, list], dict[int, int], dict, object]:
    """Each choice's text, logprob tokens, content events and finish reason, and the usage."""
    texts: dict[int, str] = {}
    logprobs: dict[int, list] = {}
    events: dict[int, int] = {}
    finish: dict = {}
    usage = None
    with server.openai() as client:
        stream = client.chat.completions.create(
            model=server.model_name, stream=True, stream_options={"include_usage": True}, **ask
        )
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta.content:
                    texts[choice.index] = texts.get(choice.index, "") + choice.delta.content
                    events[choice.index] = events.get(choice.index, 0) + 1
                if choice.logprobs and choice.logprobs.content:
                    logprobs.setdefault(choice.index, []).extend(choice.logprobs.content)
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
    return texts, logprobs, events, finish, usage


def test_grouped_tokens_carry_the_same_text_logprobs_and_usage(mistral_server: Server) -> None:
    ask = dict(
        messages=user("Say something long."),
        max_tokens=TOKENS,
        temperature=0,
        n=2,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    with mistral_server.openai() as client:
        whole = client.chat.completions.create(model=mistral_server.model_name, **ask)
    texts, logprobs, events, finish, usage = _streamed(mistral_server, **ask)
    for choice in whole.choices:
        assert texts[choice.index] == choice.message.content
        assert [(t.token, t.logprob) for t in logprobs[choice.index]] == [
            (t.token, t.logprob) for t in choice.logprobs.content
        ]
        assert len(logprobs[choice.index]) == TOKENS
        assert finish[choice.index] == choice.finish_reason == "length"
        # The first token alone, then groups of the interval: never one event per token.
        assert events[choice.index] <= 1 + math.ceil((TOKENS - 1) / MISTRAL_STREAM_INTERVAL)
    assert usage.completion_tokens == whole.usage.completion_tokens == 2 * TOKENS
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_stop_string_inside_a_group_ends_the_stream_where_it_ends_the_answer(
    mistral_server: Server,
) -> None:
    ask = dict(
        messages=user("Keep talking."), max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    with mistral_server.openai() as client:
        text = (
            client.chat.completions.create(model=mistral_server.model_name, **ask).choices[0].message.content
        )
        # A stop string from the middle of the greedy answer: the stream must cut where it starts.
        assert len(text) >= 8, text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = client.chat.completions.create(model=mistral_server.model_name, stop=[stop], **ask).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.message.content
    texts, _, _, finish, _ = _streamed(mistral_server, stop=[stop], **ask)
    assert texts.get(0, "") == cut.message.content
    assert finish[0] == "stop"
