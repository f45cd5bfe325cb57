"""response_format and tools through the real server with the official openai client.

The tiny model writes noise, so every shape assertion below holds only because constrained
decoding forces it: JSON that parses and validates, tool calls that name a declared function with
arguments matching its schema, and streamed deltas that reassemble to the non-streamed answer.
"""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, chat_body, sse_chunks, user

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=150)


def check_call(call, names=("get_weather", "get_time")) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert arguments == {"zone": arguments["zone"]} and arguments["zone"] in ("UTC", "CET")


def test_json_object(text_server: Server) -> None:
    # Noise could fill max_tokens inside one string; a bias towards `"` and `}` ends it sooner.
    with text_server.http() as http:
        ids = [
            http.post("/tokenize", json={"prompt": t, "add_special_tokens": False}).json()["tokens"]
            for t in ('"', "}")
        ]
    bias = {str(token[0]): 20 for token in ids}
    completion = text_server.openai().chat.completions.create(
        model=text_server.model_name,
        messages=user("Describe yourself as JSON"),
        response_format={"type": "json_object"},
        logit_bias=bias,
        temperature=1.0,
        seed=3,
        max_tokens=64,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)
    assert choice.message.tool_calls is None


# A sampled answer the schema constrains, for the SDK's parsing helpers.
PERSON_REQUEST = {
    "messages": user("Who are you?"),
    "response_format": Person,
    "max_tokens": 64,
    "temperature": 0.7,
}


def test_json_schema_with_the_parse_helper(text_server: Server) -> None:
    completion = text_server.openai().chat.completions.parse(
        model=text_server.model_name, **PERSON_REQUEST, seed=1, n=2
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
        assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_the_sdk_stream_helper_parses_what_it_reassembles(text_server: Server) -> None:
    """`chat.completions.stream` rebuilds the completion from the deltas and parses it with the
    SDK's own checks (a length stop or a bad JSON raises there)."""
    client = text_server.openai()
    with client.chat.completions.stream(model=text_server.model_name, **PERSON_REQUEST, seed=5) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert {"content.delta", "content.done"} <= kinds
    choice = final.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


class Lookup(BaseModel):
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)


def test_pydantic_function_tools_come_back_parsed(text_server: Server) -> None:
    completion = text_server.openai().chat.completions.parse(
        model=text_server.model_name,
        messages=user("Weather for the week?"),
        tools=[openai.pydantic_function_tool(Lookup)],
        tool_choice="required",
        max_tokens=64,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "Lookup"
    assert isinstance(call.function.parsed_arguments, Lookup)


@pytest.mark.parametrize("parallel", [False, None])
def test_tool_choice_required(text_server: Server, parallel) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    completion = text_server.openai().chat.completions.create(
        model=text_server.model_name,
        messages=user("What's the weather in Paris?"),
        tools=TOOLS,
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
        # Noise may go on calling until max_tokens: every call but the cut last one is whole.
        calls = calls[:-1]
    else:
        assert choice.finish_reason == "tool_calls"
    assert calls and (len(calls) == 1 or parallel is None)
    for call in calls:
        check_call(call)


@pytest.mark.parametrize("cut", [{"max_tokens": 3}, {"max_tokens": 2}])
def test_a_forced_call_cut_before_its_name_leaks_no_markup(text_server: Server, cut) -> None:
    """Cut by max_tokens inside `<tool_call>\n{"`, the answer holds neither a call nor the markup
    as content, streamed or not. (Stop strings no longer cut a forced call: see
    test_a_stop_string_does_not_cut_a_forced_call.)"""
    kwargs = dict(
        model=text_server.model_name, messages=user("hi"), tools=[WEATHER], tool_choice="required", **cut
    )
    client = text_server.openai()
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert not choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason == ("length" if "stop" not in cut else "stop")
    deltas = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    assert not "".join(d.content or "" for d in deltas) and not any(d.tool_calls for d in deltas)


def test_tools_reach_the_template_as_sent(text_server: Server) -> None:
    """Templates print tools with `tojson` (Qwen, Llama 3) or loop over their keys (Mistral): they
    get what the client sent, as transformers renders it, with no nulls for fields left out."""
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {}}}},
    }
    with text_server.http() as client:
        response = client.post("/v1/apply_template", json={"messages": user("hi"), "tools": [tool]})
    assert response.status_code == 200, response.text
    assert json.dumps(tool) in response.json()["prompt"]


def test_a_function_without_parameters_takes_none(text_server: Server) -> None:
    """OpenAI lets a function leave `parameters` out (it takes no arguments). Templates that read
    the field (Hermes' `tool.parameters`) failed on it with a 400: it reaches them spelled out, and
    a forced call to it has empty arguments."""
    tool = {"type": "function", "function": {"name": "ping"}}
    with text_server.http() as client:
        prompt = client.post("/v1/apply_template", json={"messages": user("hi"), "tools": [tool]}).json()[
            "prompt"
        ]
    spelled = {
        "type": "function",
        "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}},
    }
    assert json.dumps(spelled) in prompt
    completion = text_server.openai().chat.completions.create(
        model=text_server.model_name,
        messages=user("ping"),
        tools=[tool],
        tool_choice="required",
        max_tokens=32,
    )
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {}


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_does_not_cut_a_forced_call(text_server: Server, stream: bool) -> None:
    """`stop: ["}"]` ended a forced call inside its arguments, and the answer still said
    "tool_calls" with arguments that were not JSON. The grammar ends a forced call; the stop
    strings are set aside, and the answer says so."""
    body = chat_body(
        messages=user("Weather in Paris?"),
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        stop=["}", '"city"'],
        max_tokens=60,
        temperature=0,
        stream=stream,
    )
    with text_server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert "stop ignored" in response.headers["x-request-warnings"]
    if stream:
        chunks = sse_chunks(response.text)
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        arguments = "".join(
            call["function"].get("arguments", "")
            for c in chunks
            if c["choices"]
            for call in c["choices"][0]["delta"].get("tool_calls") or []
        )
    else:
        choice = response.json()["choices"][0]
        finish, arguments = (
            choice["finish_reason"],
            choice["message"]["tool_calls"][0]["function"]["arguments"],
        )
    assert finish == "tool_calls"
    assert set(json.loads(arguments)) == {"city", "unit"}


@pytest.mark.parametrize("name", ["a</tool_call>b", "", "x" * 65, "a b", "a\nb"])
def test_tool_names_that_are_not_names_are_refused(text_server: Server, name: str) -> None:
    """A name holding a format's markup (`a</tool_call>b`) made a forced call come back as plain
    content; OpenAI allows letters, digits, `_` and `-` (here also `.` and `:`), up to 64."""
    tool = {
        "type": "function",
        "function": {"name": name, "parameters": {"type": "object", "properties": {}}},
    }
    body = chat_body(messages=user("hi"), tools=[WEATHER, tool], tool_choice="required", max_tokens=8)
    with text_server.http() as http:
        assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param="tools[1].function.name")
        responses_tool = {
            "type": "function",
            "name": name,
            "parameters": {"type": "object", "properties": {}},
        }
        response = http.post(
            "/v1/responses", json={"input": "hi", "tools": [responses_tool], "max_output_tokens": 4}
        )
        assert_openai_error(response, 400, param="tools[0].name")
    ok = {**tool, "function": {**tool["function"], "name": "mcp.server:get_x-1"}}
    accepted = text_server.openai().chat.completions.create(
        model=text_server.model_name, messages=user("hi"), tools=[ok], tool_choice="required", max_tokens=64
    )
    assert accepted.choices[0].message.tool_calls[0].function.name == "mcp.server:get_x-1"


@pytest.mark.parametrize(
    "parameters", [{"type": "objekt"}, {"type": "object", "properties": {"a": {"minLength": "x"}}}]
)
def test_a_forced_call_to_tools_with_an_invalid_schema_names_the_tool(
    text_server: Server, parameters
) -> None:
    """The 400 named `tools` and quoted the generated Lark grammar of every tool."""
    bad = {"type": "function", "function": {"name": "bad", "parameters": parameters}}
    body = chat_body(messages=user("hi"), tools=[WEATHER, bad], tool_choice="required", max_tokens=8)
    with text_server.http() as http:
        error = assert_openai_error(
            http.post("/v1/chat/completions", json=body), 400, param="tools[1].function.parameters"
        )
    assert "%json" not in error["message"] and "start:" not in error["message"]


def test_named_tool_choice(text_server: Server) -> None:
    completion = text_server.openai().chat.completions.create(
        model=text_server.model_name,
        messages=user("What time is it?"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=64,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], names=("get_time",))


def test_tool_choice_auto_and_none(text_server: Server) -> None:
    client = text_server.openai()
    auto = client.chat.completions.create(
        model=text_server.model_name, messages=user("Hi"), tools=TOOLS, max_tokens=16, temperature=0
    )
    none = client.chat.completions.create(
        model=text_server.model_name,
        messages=user("Hi"),
        tools=TOOLS,
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    # "none" shows the model its tools as "auto" does (OpenAI's and vLLM's prompt); it only
    # leaves the output unparsed.
    assert none.usage.prompt_tokens == auto.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")
    choice = auto.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content is not None or choice.message.tool_calls
    for call in choice.message.tool_calls or []:
        assert call.function.name and isinstance(call.function.arguments, str)


def test_streamed_tool_calls_reassemble_to_the_non_streamed_answer(text_server: Server) -> None:
    request = dict(
        model=text_server.model_name,
        messages=user("Weather and time please"),
        tools=TOOLS,
        tool_choice="required",
        max_tokens=64,
        temperature=0,
    )
    client = text_server.openai()
    whole = client.chat.completions.create(**request).choices[0]

    calls: dict[int, dict] = {}
    content, finish_reason = "", None
    for chunk in client.chat.completions.create(**request, stream=True):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish_reason = choice.finish_reason or finish_reason
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                assert (
                    delta.index not in calls and delta.function.arguments == "" and delta.type == "function"
                )
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.function.name is None
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    # Greedy noise may repeat calls until max_tokens ("length", the last call cut): either way the
    # stream carries the same calls, fragment by fragment; only the ids are minted per response.
    assert (
        content == "" and finish_reason == whole.finish_reason and finish_reason in ("tool_calls", "length")
    )
    assert calls
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


def test_stream_chunks_for_tool_calls_are_openai_shaped(text_server: Server) -> None:
    body = chat_body("Weather?", tools=[WEATHER], tool_choice="required", stream=True, max_tokens=64)
    with text_server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    chunks = sse_chunks(response.text)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"}  # a forced call: no content, not even ""
    header = deltas[1]["tool_calls"][0]
    assert header["index"] == 0 and header["type"] == "function" and header["id"].startswith("call_")
    assert header["function"] == {"name": "get_weather", "arguments": ""}
    assert not any("<tool_call>" in (d.get("content") or "") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"$ref": "#/x"}}},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_invalid_formats_and_tool_choices_are_400s(text_server: Server, extra, param) -> None:
    with text_server.http() as http:
        response = http.post("/v1/chat/completions", json=chat_body("hi", **extra))
    assert_openai_error(response, 400, param=param)


def test_chatml_models_get_the_hermes_format(text_server: Server) -> None:
    with text_server.http() as http:
        assert http.get("/health").json()["tool_call_parser"] == "hermes"
    assert "tool calls: hermes format (from the chat template)" in text_server.log_path.read_text()
