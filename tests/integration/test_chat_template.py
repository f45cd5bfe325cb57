"""Chat template control against real servers: `--chat-template` supplies a template to a model
that has none (`template_server`), and a model with neither a template nor a prompt format of its
own refuses chat with a 400 instead of guessing a format (`base_server`); raw prompts still work."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, user

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
RENDERED = "[SYSTEM] Be brief.\n[USER] hi\n[ASSISTANT]"


def render(server: Server, **body) -> httpx.Response:
    with server.http() as http:
        return http.post("/v1/apply_template", json={"messages": MESSAGES, **body})


def test_the_flag_supplies_the_template(template_server: Server) -> None:
    response = render(template_server)
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == RENDERED


def test_chat_template_kwargs_reach_the_supplied_template(template_server: Server) -> None:
    assert (
        render(template_server, chat_template_kwargs={"greeting": "Hello!"}).json()["prompt"]
        == RENDERED + "Hello!"
    )
    assert render(template_server, add_generation_prompt=False).json()["prompt"] == RENDERED.removesuffix(
        "[ASSISTANT]"
    )


def test_chat_template_kwargs_may_set_the_generation_prompt_but_not_the_servers_arguments(
    template_server: Server,
) -> None:
    """As in vLLM, chat_template_kwargs may set add_generation_prompt (it was a 400 quoting
    transformers' "got multiple values for keyword argument"); the arguments the server passes
    itself are a 400 naming the field."""
    unprompted = render(template_server, chat_template_kwargs={"add_generation_prompt": False})
    assert unprompted.status_code == 200, unprompted.text
    assert unprompted.json()["prompt"] == RENDERED.removesuffix("[ASSISTANT]")
    for reserved in ({"tools": []}, {"tokenize": True}, {"chat_template": "{{ 'x' }}"}, {"messages": []}):
        error = assert_openai_error(
            render(template_server, chat_template_kwargs=reserved), 400, param="chat_template_kwargs"
        )
        assert next(iter(reserved)) in error["message"] and "multiple values" not in error["message"]
    # "false" as a string is not false: refused rather than taken as true.
    error = assert_openai_error(
        render(template_server, chat_template_kwargs={"add_generation_prompt": "false"}),
        400,
        param="chat_template_kwargs",
    )
    assert "true or false" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_uses_the_supplied_template(template_server: Server, stream: bool) -> None:
    with template_server.http() as http:
        expected = http.post(
            "/tokenize", json={"prompt": RENDERED + "Hi!", "add_special_tokens": False}
        ).json()
    client = template_server.openai()
    ask = dict(
        model=template_server.model_name,
        messages=MESSAGES,
        max_tokens=3,
        extra_body={"chat_template_kwargs": {"greeting": "Hi!"}, "ignore_eos": True},
    )
    if stream:
        chunks = list(
            client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
        )
        usage = chunks[-1].usage
    else:
        usage = client.chat.completions.create(**ask).usage
    assert usage.prompt_tokens == expected["count"] and usage.completion_tokens == 3


def test_tools_a_template_never_shows_are_not_dropped_silently(
    template_server: Server, text_server: Server
) -> None:
    """This template never names `tools` (as Gemma's and Phi-3's): the model is not told of them,
    and the answer says so in its warnings header (nothing a client sent is dropped silently)."""
    tool = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object"}}}
    ask = {"messages": user("hi"), "tools": [tool], "max_tokens": 2}
    for server, shown in ((template_server, False), (text_server, True)):
        with server.http() as http:
            response = http.post("/v1/chat/completions", json=ask)
        assert response.status_code == 200, response.text
        warning = response.headers.get("X-Request-Warnings", "")
        assert ("does not show tools" in warning) is not shown, warning
        with server.http() as http:  # the preview says so too
            preview = http.post("/v1/apply_template", json={"messages": user("hi"), "tools": [tool]})
        assert preview.status_code == 200, preview.text
        assert ("does not show tools" in preview.headers.get("X-Request-Warnings", "")) is not shown


def test_reasoning_effort_reaches_the_template(template_server: Server) -> None:
    """As vLLM passes it: a template variable (gpt-oss's template reads it), so the prompt changes
    exactly as the template says; an explicit chat_template_kwargs entry wins."""
    with template_server.http() as http:

        def count(prompt: str) -> int:
            return http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()[
                "count"
            ]

        expected, low, plain = (count(RENDERED + s) for s in ("(effort=high)", "(effort=low)", ""))
        after = {effort: count(f"{RENDERED}(effort={effort})") for effort in ("none", "xhigh", "max")}

    assert len({expected, low, plain}) > 1
    client = template_server.openai()
    ask = dict(model=template_server.model_name, messages=MESSAGES, max_tokens=1)
    assert client.chat.completions.create(**ask, reasoning_effort="high").usage.prompt_tokens == expected
    overridden = client.chat.completions.create(
        **ask, reasoning_effort="high", extra_body={"chat_template_kwargs": {"reasoning_effort": "low"}}
    )
    assert overridden.usage.prompt_tokens == low
    assert client.chat.completions.create(**ask).usage.prompt_tokens == plain
    # The openai SDK's newer values reach the template too ("none" was a 400).
    for effort, tokens in after.items():
        assert client.chat.completions.create(**ask, reasoning_effort=effort).usage.prompt_tokens == tokens
    with template_server.http() as http:
        bad = http.post("/v1/chat/completions", json={**ask, "reasoning_effort": "extreme"})
    assert_openai_error(bad, 400, param="reasoning_effort")


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": user(), "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": user(), "max_tokens": 2, "stream": True}),
        ("/v1/apply_template", {"messages": user()}),
        ("/tokenize", {"messages": user()}),
    ],
    ids=["chat", "chat-stream", "apply_template", "tokenize"],
)
def test_chat_without_a_template_is_a_clear_400(base_server: Server, path: str, body: dict) -> None:
    with base_server.http() as http:
        error = assert_openai_error(http.post(path, json=body), 400, param="messages")
    assert "no chat template" in error["message"] and "--chat-template" in error["message"]


def test_raw_prompts_still_work_without_a_template(base_server: Server) -> None:
    reply = base_server.openai().completions.create(
        model=base_server.model_name, prompt="Once upon a time", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    with base_server.http() as http:
        assert http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["count"] > 0


def test_a_model_without_a_template_is_still_served_by_the_fast_path(base_server: Server) -> None:
    """The startup self-test probes chat and image prompts only where the model can chat."""
    with base_server.http() as http:
        replicas = http.get("/health").json()["replicas"]
    assert [r["path"] for r in replicas] == ["fast"], replicas
