"""The Responses API output: items built from parsed text and calls, the events of a stream, a
failure after the start (response.failed), and errors named with the Responses fields. Driven
with a real RequestStream fed by hand and the real Hermes parser."""

from __future__ import annotations

import json

import msgspec
import pytest

from app.responses_convert import chat_form
from app.responses_stream import OutputBuilder, feed_choice, final_response, response_event_stream
from app.schemas.responses import ResponseObject, ResponsesRequest
from app.tool_calls import HERMES
from models.prompt import PreparedPrompt
from scheduler.errors import GenerationError, InvalidRequestError
from scheduler.request import EngineRequest, PromptInput, RequestStream, SamplingParams
from tests.unit.sse import sse_events

pytestmark = pytest.mark.anyio
CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make_stream() -> RequestStream:
    request = EngineRequest("r1", PromptInput(text="hi"), SamplingParams(max_tokens=4))
    return RequestStream(request, PreparedPrompt([1, 2, 3]))


def initial() -> ResponseObject:
    return ResponseObject(
        id="resp_1",
        created_at=0,
        status="in_progress",
        model="m",
        output=[],
        parallel_tool_calls=True,
        tool_choice="auto",
        tools=[],
        text={"format": {"type": "text"}},
        temperature=0.0,
        top_p=1.0,
    )


async def events_of(stream: RequestStream, parser=None) -> tuple[list[tuple[str, dict]], list]:
    finished = []
    writes = [
        w
        async for w in response_event_stream(
            stream, initial=initial(), tool_parser=parser, on_done=lambda s, err: finished.append(err)
        )
    ]
    events = []
    for raw in sse_events(writes):
        event_line, data_line = raw.decode().strip().split("\n")
        events.append((event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return events, finished


async def test_text_then_a_call_are_two_items_with_their_events():
    stream = make_stream()
    stream.push(0, "Let me check.", [5], [], None, None)
    stream.push(0, CALL, [6], [], "stop", None)
    events, finished = await events_of(stream, HERMES.parser)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me check."
    assert final["output"][1]["arguments"] == '{"x": 1}' and final["output"][1]["name"] == "f"
    assert events[10][1]["arguments"] == '{"x": 1}' and events[9][1]["output_index"] == 1
    assert final["usage"]["output_tokens"] == 2 and finished == [None]


async def test_the_non_streamed_output_equals_the_streamed_one():
    stream = make_stream()
    stream.push(0, "Let me check." + CALL, [5, 6], [], "stop", None)
    streamed, _ = await events_of(stream, HERMES.parser)
    builder = OutputBuilder()
    feed_choice(builder, HERMES.parser(), "Let me check." + CALL, finished=True)
    whole = msgspec.to_builtins(final_response(initial(), builder, stream, "stop", None))
    final = streamed[-1][1]["response"]
    for body in (whole, final):
        body.pop("completed_at")
        for item in body["output"]:
            item.pop("id")
            item.pop("call_id", None)
    assert whole == final


async def test_a_failure_mid_stream_ends_with_response_failed():
    stream = make_stream()
    stream.push(0, "Hel", [5], [], None, None)
    stream.push(0, "", [], [], "error", GenerationError("generation failed"))
    events, finished = await events_of(stream)
    name, data = events[-1]
    assert name == "response.failed" and data["response"]["status"] == "failed"
    assert data["response"]["error"] == {"code": "server_error", "message": "generation failed"}
    assert data["response"]["output"][0]["content"][0]["text"] == "Hel"
    assert data["response"]["output"][0]["status"] == "incomplete"
    assert [e.message for e in finished] == ["generation failed"]


async def test_a_failure_of_the_requests_own_mid_stream_keeps_to_openais_codes():
    """A grammar that failed mid-way said `invalid_request`, which the SDK's ResponseError refuses."""
    from openai.types.responses import ResponseFailedEvent

    stream = make_stream()
    stream.push(0, "{", [5], [], None, None)
    failure = InvalidRequestError("constrained decoding stopped", param="response_format")
    stream.push(0, "", [], [], "error", failure)
    events, _ = await events_of(stream)
    name, data = events[-1]
    assert name == "response.failed" and data["response"]["error"]["code"] == "invalid_prompt"
    ResponseFailedEvent.model_validate(data, strict=True)


async def test_an_empty_answer_is_one_empty_message():
    stream = make_stream()
    stream.push(0, "", [], [], "stop", None)
    events, _ = await events_of(stream)
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == ""


def test_chat_errors_name_the_responses_field():
    body = {
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_text", "text": "x"}],
            },
        ],
    }
    form = chat_form(msgspec.convert(body, ResponsesRequest))
    roles = [m.role for m in form.request.messages]
    assert roles == ["system", "user", "assistant", "tool"]
    assert form.request.messages[3].name == "f"  # the call's name, found by call_id
    assert form.param("messages[3].content[0].image_url") == "input[2].output[0].image_url"
    assert form.param("messages[1].content[2].image_url") == "input[0].content[2].image_url"
    assert form.param("response_format") == "text.format"
    assert form.param("max_tokens") == "max_output_tokens"
    with pytest.raises(InvalidRequestError) as raised, form.responses_params():
        raise InvalidRequestError("no", param="messages")
    assert raised.value.param == "input"
