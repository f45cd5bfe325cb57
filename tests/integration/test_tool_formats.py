"""Tool calls in Mistral's format on a real server (builtin:tiny-mistral), with the official openai
client and LangChain's ChatOpenAI.

The server is not told the format: its chat template shows `[TOOL_CALLS]`, so forced calls are
written as `[TOOL_CALLS][{"name": ..., "arguments": ...}]` (the marker is a special token) and read
back into `tool_calls`. The model writes noise, so every call below has its shape only because
constrained decoding forced it in that format and the mistral parser read it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import sse_chunks, user
from tests.integration.test_tools_and_formats import TOOLS, WEATHER

STRICT_WEATHER = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}


def check_call(call, names=("get_weather", "get_time")) -> dict[str, Any]:
    # Mistral's templates accept only 9-letter-and-digit ids when the calls come back.
    assert call.type == "function" and len(call.id) == 9 and call.id.isalnum()
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert arguments["zone"] in ("UTC", "CET")
    return arguments


def test_the_format_comes_from_the_chat_template(mistral_server: Server) -> None:
    with mistral_server.http() as http:
        health = http.get("/health").json()
        prompt = http.post("/v1/apply_template", json={"messages": user("hi"), "tools": TOOLS}).json()[
            "prompt"
        ]
    assert health["tool_call_parser"] == "mistral"
    assert "[AVAILABLE_TOOLS]" in prompt and "[INST]hi[/INST]" in prompt
    assert "tool calls: mistral format (from the chat template)" in mistral_server.log_path.read_text()


@pytest.mark.parametrize("parallel", [False, None])
def test_required_forces_mistral_calls(mistral_server: Server, parallel) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    completion = mistral_server.openai().chat.completions.create(
        model=mistral_server.model_name,
        messages=user("What's the weather in Paris?"),
        tools=[STRICT_WEATHER, TOOLS[1]],  # strict is accepted: forced calls always follow the schema
        tool_choice="required",
        max_tokens=64,
        temperature=1.0,
        seed=4,
        **extra,
    )
    choice = completion.choices[0]
    assert choice.message.content is None
    calls = choice.message.tool_calls
    if parallel is None and choice.finish_reason == "length":
        calls = calls[:-1]  # noise may fill the list until max_tokens: the cut call is partial
    else:
        assert choice.finish_reason == "tool_calls"
    assert calls and (len(calls) == 1 or parallel is None)
    for call in calls:
        check_call(call)


def test_named_choice_streams_as_openai_deltas(mistral_server: Server) -> None:
    body = {
        "model": mistral_server.model_name,
        "messages": user("What time is it?"),
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 64,
        "temperature": 1.0,
        "seed": 7,
    }
    client = mistral_server.openai()
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1
    check_call(whole.message.tool_calls[0], names=("get_time",))
    with mistral_server.http() as http:
        response = http.post("/v1/chat/completions", json={**body, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in sse_chunks(response.text) if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    header, *fragments = calls
    assert header["function"] == {"name": "get_time", "arguments": ""} and len(header["id"]) == 9
    assert fragments and all("id" not in f and "name" not in f["function"] for f in fragments)
    assert (
        "".join(f["function"]["arguments"] for f in fragments)
        == whole.message.tool_calls[0].function.arguments
    )
    assert not any("[TOOL_CALLS]" in (d.get("content") or "") for d in deltas)


# -- LangChain's ChatOpenAI ---------------------------------------------------------------------


@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_langchain_bound_tools_and_the_next_turn(mistral_server: Server, tool_choice: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Weather for a city."""
        return "sunny"

    llm = mistral_server.langchain(max_tokens=40)
    # strict: LangChain closes the schema (additionalProperties false), so noise cannot add keys.
    llm = llm.bind_tools([get_weather], tool_choice=tool_choice, strict=True)
    question = HumanMessage("What is the weather in Paris?")
    message = llm.invoke([question])
    assert message.tool_calls and {call["name"] for call in message.tool_calls} == {"get_weather"}
    call = message.tool_calls[0]
    assert call["args"]["city"] in {"Paris", "Rome"}
    # The call goes back in the history: Mistral's template refuses any id but 9 letters and digits.
    results = [ToolMessage("sunny", tool_call_id=c["id"]) for c in message.tool_calls]
    follow_up = llm.invoke([question, message, *results])
    assert follow_up.response_metadata["finish_reason"] in {"tool_calls", "length"}


def test_a_legacy_function_call_renders_on_mistrals_template(mistral_server: Server) -> None:
    """The functions API sends a call without an id; Mistral's template refuses any id but 9 letters
    and digits, so the call got a 400 ("Tool call IDs should be alphanumeric strings with length 9")."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    with mistral_server.http() as http:
        response = http.post("/v1/apply_template", json={"messages": messages})
    assert response.status_code == 200, response.text
    prompt = response.json()["prompt"]
    assert "[TOOL_CALLS]" in prompt and "get_weather" in prompt and "sunny" in prompt


def test_openai_call_ids_are_mapped_for_mistrals_template(mistral_server: Server) -> None:
    """An id the client got from OpenAI (`call_...`) sent back in the history: Mistral's template
    refused it with a 400. It is mapped to 9 letters and digits, alike for the call and its result."""
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "sunny"},
    ]
    with mistral_server.http() as http:
        response = http.post("/v1/apply_template", json={"messages": messages})
        assert response.status_code == 200, response.text
        assert "call_abc123" not in response.json()["prompt"]
        kept = [
            {**m, "tool_calls": [{**m["tool_calls"][0], "id": "abcDEF123"}]} if m.get("tool_calls") else m
            for m in messages[:2]
        ] + [{"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny"}]
        assert "abcDEF123" in http.post("/v1/apply_template", json={"messages": kept}).json()["prompt"]


@pytest.mark.parametrize("stream", [False, True])
def test_tools_offered_leave_other_special_tokens_out_of_the_text(mistral_server: Server, stream) -> None:
    """With tools offered and tool_choice auto, the output used to be decoded with every special
    token kept (so that the parser sees `[TOOL_CALLS]`): `[INST]` and the like reached `content`.
    Only the format's markers are kept now; the rest are skipped, as without tools."""
    with mistral_server.http() as http:
        inst = http.post("/tokenize", json={"prompt": "[INST]", "add_special_tokens": False}).json()["tokens"]
        assert len(inst) == 1
        body = {
            "model": mistral_server.model_name,
            "messages": user("hi"),
            "tools": TOOLS,
            "tool_choice": "auto",
            "max_tokens": 4,
            "logit_bias": {str(inst[0]): 100},
            "stream": stream,
        }
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        if stream:
            chunks = sse_chunks(response.text)
            content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        else:
            message = response.json()["choices"][0]["message"]
            content = message["content"] or ""
            assert response.json()["usage"]["completion_tokens"] == 4
    assert "[INST]" not in content and content == ""
