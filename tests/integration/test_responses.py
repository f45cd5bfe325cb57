"""POST /v1/responses through the real server: the openai client's `responses.create`,
`responses.stream` and `responses.parse`, raw HTTP for the exact wire shapes and event sequence.

The tiny model writes noise and rarely stops by itself: free text ends at `max_output_tokens`
(status "incomplete"), while forced tool calls and JSON schemas end when the grammar does
(status "completed"). LangChain's use of the endpoint is in test_responses_langchain.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, comparable_response, png_data_url

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
FORCED = {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=150)


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a Responses stream: every event has both lines; no `[DONE]`."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = []
    for block in raw.strip("\n").split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])))
    return events


# -- create -----------------------------------------------------------------------------------------
def test_create_text_response_shape(text_server: Server) -> None:
    client = text_server.openai()
    response = client.responses.create(
        model=text_server.model_name,
        input="hello",
        instructions="Answer in French.",
        max_output_tokens=4,
        temperature=0,
        metadata={"run": "t1"},
    )
    as_message = client.responses.create(
        model=text_server.model_name,
        input=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}],
        max_output_tokens=4,
        temperature=0,
    )
    assert re.fullmatch(r"resp_[0-9a-f]{32}", response.id)
    assert response.object == "response" and response.model == text_server.model_name
    assert response.instructions == "Answer in French." and response.metadata == {"run": "t1"}
    assert response.temperature == 0.0 and response.max_output_tokens == 4
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.annotations == []
    assert response.output_text == part.text
    usage = response.usage
    assert usage.output_tokens <= 4 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    # The instructions are a system message in the prompt.
    assert usage.input_tokens == as_message.usage.input_tokens
    assert response.output_text == as_message.output_text
    if usage.output_tokens == 4:  # noise rarely stops by itself
        assert response.status == "incomplete" and message.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_create_wire_shape_over_http(text_server: Server) -> None:
    with text_server.http() as http:
        response = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "response" and body["error"] is None and body["previous_response_id"] is None
    assert body["tools"] == [] and body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    assert body["text"] == {"format": {"type": "text"}, "verbosity": "medium"}
    assert body["store"] is False and isinstance(body["created_at"], int)
    assert set(body["usage"]) == {
        "input_tokens",
        "input_tokens_details",
        "output_tokens",
        "output_tokens_details",
        "total_tokens",
    }
    assert set(body["output"][0]) == {"type", "id", "status", "role", "content"}
    assert set(body["output"][0]["content"][0]) == {"type", "text", "annotations", "logprobs"}


def test_forced_function_call(text_server: Server) -> None:
    response = text_server.openai().responses.create(
        model=text_server.model_name,
        input="Weather in Paris?",
        parallel_tool_calls=False,
        max_output_tokens=60,
        temperature=0,
        **FORCED,
    )
    assert response.status == "completed" and response.completed_at is not None
    [call] = response.output
    assert call.type == "function_call" and call.status == "completed" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}
    assert response.tools[0].name == "get_weather" and response.tool_choice.name == "get_weather"


def test_tool_choice_none_answers_with_text(text_server: Server) -> None:
    response = text_server.openai().responses.create(
        model=text_server.model_name, input="hi", tools=[WEATHER], tool_choice="none", max_output_tokens=3
    )
    assert [item.type for item in response.output] == ["message"]


def test_json_schema_format_and_parse(text_server: Server) -> None:
    client = text_server.openai()
    text_format = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    response = client.responses.create(
        model=text_server.model_name,
        input="A person as JSON",
        text=text_format,
        max_output_tokens=80,
        temperature=0,
    )
    assert response.status == "completed"
    person = json.loads(response.output_text)
    assert set(person) == {"name", "age"} and len(person["name"]) <= 8
    assert response.text.format.type == "json_schema" and response.text.format.name == "person"
    parsed = client.responses.parse(
        model=text_server.model_name,
        input="A person",
        text_format=Person,
        max_output_tokens=80,
        temperature=0,
    )
    assert isinstance(parsed.output_parsed, Person)


def test_function_results_come_back_statelessly(text_server: Server) -> None:
    """A client sends the call it got and the tool's output as input items."""
    client = text_server.openai()
    first = client.responses.create(
        model=text_server.model_name,
        input="Weather in Paris?",
        parallel_tool_calls=False,
        max_output_tokens=60,
        **FORCED,
    )
    call = first.output[0]

    def follow_up(result: str):
        return client.responses.create(
            model=text_server.model_name,
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                call.model_dump(exclude_none=True),
                {"type": "function_call_output", "call_id": call.call_id, "output": result},
            ],
            tools=[WEATHER],
            max_output_tokens=2,
        )

    short, long = follow_up("sunny"), follow_up("sunny and warm, 24 degrees, light wind from the west")
    assert short.output[-1].type in ("message", "function_call")
    assert long.usage.input_tokens > short.usage.input_tokens  # the result is in the prompt
    # A function that returned nothing, as an empty list of parts: an empty result, not a 400.
    assert follow_up([]).usage.input_tokens == follow_up("").usage.input_tokens


def test_assistant_turns_and_roles_as_items(text_server: Server) -> None:
    response = text_server.openai().responses.create(
        model=text_server.model_name,
        input=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "again"}]},
        ],
        max_output_tokens=2,
    )
    assert response.usage.input_tokens > 10 and response.output[0].type == "message"


def test_input_image_on_the_vlm(vlm_server: Server) -> None:
    client = vlm_server.openai()

    def create(content: list[dict[str, Any]]):
        return client.responses.create(
            model=vlm_server.model_name, input=[{"role": "user", "content": content}], max_output_tokens=3
        )

    text = {"type": "input_text", "text": "What is in this image?"}
    with_image = create([text, {"type": "input_image", "image_url": png_data_url(), "detail": "auto"}])
    without = create([text])
    assert with_image.usage.input_tokens >= without.usage.input_tokens + 16  # 32x32 px in 8x8 patches
    with vlm_server.http() as http:
        bad = http.post(
            "/v1/responses",
            json={
                "input": [
                    {
                        "role": "user",
                        "content": [text, {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}],
                    }
                ]
            },
        )
    assert_openai_error(bad, 400, param="input[0].content[1].image_url")


# -- streams ----------------------------------------------------------------------------------------
def test_stream_event_sequence_over_http(text_server: Server) -> None:
    body = {"input": "hello", "max_output_tokens": 5, "temperature": 0}
    with text_server.http() as http:
        created = http.post("/v1/responses", json=body).json()
        streamed = http.post("/v1/responses", json={**body, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    names = [name for name, _ in events]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{created['status']}",
    ]
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    assert events[2][1]["item"]["status"] == "in_progress" and events[2][1]["item"]["content"] == []
    done_text = events[-4][1]["text"]
    assert "".join(deltas) == done_text == created["output"][0]["content"][0]["text"]
    final = events[-1][1]["response"]
    assert final["output"][0]["id"] == events[2][1]["item"]["id"] == events[-2][1]["item"]["id"]
    assert comparable_response(final) == comparable_response(created)


def test_stream_function_call_accumulates_to_create(text_server: Server) -> None:
    client = text_server.openai()
    kwargs = {
        "model": text_server.model_name,
        "input": "Weather in Paris?",
        "parallel_tool_calls": False,
        "max_output_tokens": 60,
        "temperature": 0,
        **FORCED,
    }
    created = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [event.type for event in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    argument_deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert argument_deltas and "".join(argument_deltas) == final.output[0].arguments
    assert comparable_response(final) == comparable_response(created)


def test_stream_incomplete_carries_the_create_response(text_server: Server) -> None:
    client = text_server.openai()
    kwargs = {"model": text_server.model_name, "input": "hello", "max_output_tokens": 3, "temperature": 0}
    created = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        last = list(stream)[-1]
    if created.status == "incomplete":
        assert last.type == "response.incomplete"
        assert last.response.incomplete_details.reason == "max_output_tokens"
    assert comparable_response(last.response) == comparable_response(created)


# -- what is refused, what is accepted --------------------------------------------------------------
REFUSED = [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_0"}, "previous_response_id"),
    ({"conversation": "conv_0"}, "conversation"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_0"}}, "prompt"),
    ({"max_tool_calls": 1}, "max_tool_calls"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"include": ["message.output_text.logprobs", "message.output_text.nope"]}, "include[1]"),
    ({"logprobs": True}, "logprobs"),
    (
        {"moderation": {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}}}},
        "moderation",
    ),
    ({"context_management": [{"type": "compaction", "compact_threshold": 1000}]}, "context_management"),
    ({"prompt_cache_options": {"prewarm": True}}, "prompt_cache_options.prewarm"),
    ({"input": [{"type": "item_reference", "id": "msg_0"}]}, "input[0].type"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
        "input[0].content[0]",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
        "input[0].content[0].image_url",
    ),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": [{"content": "no role"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "allowed_tools"}, "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    # OpenAI's metadata limits (a value is echoed in every streamed response object).
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    # Lowered to the server's cap (64) first, as the seed clamps; that still does not fit after this prompt.
    ({"max_output_tokens": 10**6, "input": "word " * 4000}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    # Chat Completions fields the Responses API has elsewhere or not at all: ignored, they would
    # change nothing a client expects them to.
    ({"stop": ["if"]}, "stop"),
    ({"n": 2}, "n"),
    ({"max_tokens": 2}, "max_tokens"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"guided_choice": ["yes", "no"]}, "guided_choice"),
    ({"seed": 1}, "seed"),
    ({"logit_bias": {"0": 100}}, "logit_bias"),
    ({"top_k": 1}, "top_k"),
]


@pytest.mark.parametrize(("fields", "param"), REFUSED, ids=[p for _, p in REFUSED])
def test_refused_fields_name_the_param(text_server: Server, fields: dict[str, Any], param: str) -> None:
    with text_server.http() as http:
        response = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, **fields})
    assert_openai_error(response, 400, param=param)


def test_a_failure_during_generation_names_the_responses_field(text_server: Server) -> None:
    """A grammar that costs too much CPU per token fails its request after it started; answered
    whole, its 400 named `response_format`, a field /v1/responses does not have."""
    costly = {"type": "json_schema", "name": "b", "schema": {"type": "string", "pattern": "^b{100000}$"}}
    with text_server.http() as http:
        response = http.post(
            "/v1/responses", json={"input": "hi", "max_output_tokens": 40, "text": {"format": costly}}
        )
    assert_openai_error(response, 400, param="text.format")
    assert "CPU per token" in response.json()["error"]["message"]


def test_missing_input_wrong_model_and_no_key(text_server: Server) -> None:
    with text_server.http() as http:
        assert_openai_error(http.post("/v1/responses", json={}), 400, param="input")
        wrong = http.post("/v1/responses", json={"input": "hi", "model": "other"})
        assert_openai_error(wrong, 404, code="model_not_found", param="model")
    with text_server.http(authenticated=False) as http:
        assert_openai_error(http.post("/v1/responses", json={"input": "hi"}), 401)


def test_neutral_fields_are_accepted(text_server: Server) -> None:
    body = {
        "input": "hi",
        "max_output_tokens": 2,
        "n": 1,
        "logprobs": False,
        "stop": None,
        "store": False,
        "user": "u1",
        "safety_identifier": "s1",
        "prompt_cache_key": "k",
        "service_tier": "auto",
        "truncation": "auto",
        "stream_options": {"include_obfuscation": False},
        "include": [
            "reasoning.encrypted_content",
            "message.input_image.image_url",
            "file_search_call.results",
        ],
        "reasoning": {"effort": None},
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "top_logprobs": 0,
        "prompt_cache_retention": "24h",
        "prompt_cache_options": {"mode": "explicit", "ttl": "30m", "prewarm": False},
        "moderation": None,
        "context_management": [],
    }
    with text_server.http() as http:
        response = http.post("/v1/responses", json=body)
        breakpoint_part = {"type": "input_text", "text": "hi", "prompt_cache_breakpoint": {"ttl": "30m"}}
        marked = http.post(
            "/v1/responses",
            json={"input": [{"role": "user", "content": [breakpoint_part]}], "max_output_tokens": 2},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user"] == "u1" and body["truncation"] == "auto" and body["warnings"] is None
    assert body["output"][0]["content"][0]["logprobs"] == []
    assert marked.status_code == 200, marked.text


def test_chat_refuses_moderation_and_ignores_cache_hints(text_server: Server) -> None:
    """The same fields on /v1/chat/completions (the SDK sends them there too)."""
    part = {"type": "text", "text": "hi", "prompt_cache_breakpoint": {"ttl": "30m"}}
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    hints = {"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}, "prompt_cache_retention": "24h"}
    with text_server.http() as http:
        refused = http.post(
            "/v1/chat/completions", json={**body, "moderation": {"model": "omni-moderation-latest"}}
        )
        accepted = http.post("/v1/chat/completions", json={**body, **hints, "moderation": None})
    assert_openai_error(refused, 400, param="moderation")
    assert accepted.status_code == 200, accepted.text


# -- the model's tool-call format ------------------------------------------------------------------
def test_calls_follow_the_model_tool_call_format(mistral_server: Server) -> None:
    """Mistral's template: 9-character call ids, which its template requires when they come back."""
    client = mistral_server.openai()
    first = client.responses.create(
        model=mistral_server.model_name,
        input="Weather in Paris?",
        parallel_tool_calls=False,
        max_output_tokens=60,
        **FORCED,
    )
    [call] = first.output
    assert call.type == "function_call" and re.fullmatch(r"[A-Za-z0-9]{9}", call.call_id), call.call_id
    answer = client.responses.create(
        model=mistral_server.model_name,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        tools=[WEATHER],
        max_output_tokens=2,
    )
    assert answer.usage.input_tokens > first.usage.input_tokens


def test_counted_in_metrics_and_documented(text_server: Server) -> None:
    with text_server.http() as http:
        assert http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1}).status_code == 200
        metrics = http.get("/metrics").text
        schema = http.get("/openapi.json").json()
    assert re.search(r'^docoserve_requests_total\{endpoint="responses",status="200"\} [1-9]', metrics, re.M)
    assert re.search(
        r'^docoserve_http_requests_total\{method="POST",route="/v1/responses",status="200"\}', metrics, re.M
    )
    content = schema["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(content)
