"""Scoring against the real server: `echo` with `logprobs` returns the prompt tokens' logprobs,
`max_tokens: 0` scores without generating, and vLLM's `prompt_logprobs` (completions and chat)."""

from __future__ import annotations

import math

import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, image_message, png_data_url, sse_chunks, user

PROMPT = "Scoring asks how likely each token of this prompt is, given the ones before it."


def _post(server: Server, path: str, body: dict) -> dict:
    with server.http() as client:
        response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _prompt_ids(server: Server, text: str) -> list[int]:
    return _post(server, "/tokenize", {"prompt": text})["tokens"]


def test_echo_with_max_tokens_zero_scores_the_prompt(text_server: Server) -> None:
    ids = _prompt_ids(text_server, PROMPT)
    completion = text_server.openai().completions.create(
        model=text_server.model_name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    [choice] = completion.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 0 and completion.usage.prompt_tokens == len(ids)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(isinstance(lp, float) and lp <= 0.0 for lp in logprobs.token_logprobs[1:])
    for token, logprob, top in zip(
        logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True
    ):
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(
            logprob
        )  # the prompt's token and the 2 best
    assert logprobs.text_offset[0] == 0
    steps = [b - a for a, b in zip(logprobs.text_offset, logprobs.text_offset[1:], strict=False)]
    assert steps == [len(t) for t in logprobs.tokens[:-1]]


def test_max_tokens_zero_needs_echo(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert_openai_error(response, 400, param="max_tokens")


def test_echo_logprobs_cover_prompt_then_completion_and_match_prompt_logprobs(text_server: Server) -> None:
    ids = _prompt_ids(text_server, PROMPT)
    body = {"prompt": ids, "max_tokens": 4, "echo": True, "logprobs": 1, "prompt_logprobs": 1}
    body |= {"temperature": 0, "ignore_eos": True}
    [choice] = _post(text_server, "/v1/completions", body)["choices"]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 4
    assert all(lp is not None for lp in logprobs["token_logprobs"][1:])
    prompt_logprobs = choice["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for position, (token, entry) in enumerate(zip(ids[1:], prompt_logprobs[1:], strict=True), 1):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(logprobs["token_logprobs"][position])
        assert own["decoded_token"] == logprobs["tokens"][position]
        assert isinstance(own["rank"], int) and own["rank"] >= 1
        best = [v for v in entry.values() if v["rank"] == 1]
        assert len(best) == 1 and best[0]["logprob"] >= own["logprob"]
        assert len(entry) <= 2


def test_a_cached_prefix_still_gets_every_prompt_logprob(text_server: Server) -> None:
    ids = _prompt_ids(text_server, PROMPT * 3)  # several KV blocks
    plain = {"prompt": ids, "max_tokens": 1, "temperature": 0}
    _post(text_server, "/v1/completions", plain)
    _post(text_server, "/v1/completions", plain)  # now cached
    scored = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    first = _post(text_server, "/v1/completions", scored)["choices"][0]["logprobs"]["token_logprobs"]
    assert len(first) == len(ids) and first[0] is None and None not in first[1:]
    # A different suffix after the same cached prefix: the shared positions score the same.
    longer = _post(text_server, "/v1/completions", {**scored, "prompt": [*ids, *ids[:5]]})
    again = longer["choices"][0]["logprobs"]["token_logprobs"]
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(first[1:], again[1 : len(ids)], strict=True))


def test_streamed_echo_carries_the_prompt_logprobs_first(text_server: Server) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0, "n": 2}
    whole = _post(text_server, "/v1/completions", body)["choices"]
    with text_server.http() as client:
        response = client.post("/v1/completions", json={**body, "stream": True})
    assert response.status_code == 200
    chunks = [c for c in sse_chunks(response.text) if c["choices"]]
    for index in (0, 1):
        events = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert events[0]["text"] == PROMPT
        streamed = [lp for e in events for lp in e["logprobs"]["token_logprobs"]]
        assert streamed[0] is None
        assert streamed == pytest.approx(whole[index]["logprobs"]["token_logprobs"], abs=1e-4, nan_ok=False)
        assert "".join(e["text"] for e in events) == whole[index]["text"]


def test_chat_prompt_logprobs(text_server: Server) -> None:
    body = {"messages": user("Score my prompt"), "max_tokens": 2, "prompt_logprobs": 3}
    response = _post(text_server, "/v1/chat/completions", body)
    entries = response["prompt_logprobs"]
    assert len(entries) == response["usage"]["prompt_tokens"] and entries[0] is None
    for entry in entries[1:]:
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:3] == [1, 2, 3] and 3 <= len(entry) <= 4
        assert all(v["logprob"] <= 0.0 and isinstance(v["decoded_token"], str) for v in entry.values())
    plain = _post(text_server, "/v1/chat/completions", {**body, "prompt_logprobs": None})
    assert plain["prompt_logprobs"] is None


def test_chat_prompt_logprobs_with_an_image(vlm_server: Server) -> None:
    """The image's tokens are part of the prompt: every position is scored, and a different image
    changes the scores of the text after it (the image's keys were computed, not skipped)."""

    def scores(color: tuple[int, int, int]) -> list:
        body = {"messages": image_message("what is this?", png_data_url(color=color)), "max_tokens": 1}
        response = _post(vlm_server, "/v1/chat/completions", {**body, "prompt_logprobs": 0})
        entries = response["prompt_logprobs"]
        assert len(entries) == response["usage"]["prompt_tokens"] and entries[0] is None
        assert all(len(entry) == 1 for entry in entries[1:])  # K = 0: the prompt's token alone
        return [next(iter(entry.values()))["logprob"] for entry in entries[1:]]

    red, blue = scores((200, 40, 40)), scores((10, 10, 250))
    assert len(red) == len(blue) and red != blue
    assert scores((200, 40, 40)) == pytest.approx(red, abs=1e-4)  # the same image scores the same


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("/v1/chat/completions", {"messages": user(), "prompt_logprobs": 21}, "prompt_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": user(), "prompt_logprobs": 0, "stream": True},
            "prompt_logprobs",
        ),
    ],
)
def test_prompt_logprobs_limits(text_server: Server, path: str, body: dict, param: str) -> None:
    with text_server.http() as client:
        assert_openai_error(client.post(path, json=body), 400, param=param)
