"""Failures after a response started: chat streams end with an error event then [DONE]; the
plain response is a generic 500. Driven with a real RequestStream fed by hand."""

from __future__ import annotations

import json
from functools import partial

import pytest

from app.schemas.chat import ChatCompletionChunk
from app.streaming import DONE, chat_event_stream
from models.prompt import PreparedPrompt
from scheduler.errors import GenerationError
from scheduler.request import EngineRequest, PromptInput, RequestStream, SamplingParams
from tests.unit.sse import sse_events

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


CHUNK = partial(ChatCompletionChunk, "x", 0, "m")


def make_stream(n: int = 1) -> RequestStream:
    request = EngineRequest("r1", PromptInput(text="hi"), SamplingParams(max_tokens=4), n=n)
    return RequestStream(request, PreparedPrompt([1, 2, 3]))


async def drain(stream: RequestStream, **kwargs) -> tuple[list[bytes], list]:
    finished = []
    events = [
        e
        async for e in chat_event_stream(
            stream, chunk=CHUNK, on_done=lambda s, err: finished.append(err), **kwargs
        )
    ]
    return sse_events(events), finished


async def test_a_failure_mid_stream_ends_with_an_error_event_then_done():
    stream = make_stream()
    stream.push(0, "Hel", [5], [], None, None)
    stream.push(0, "", [], [], "error", GenerationError("generation failed"))
    events, finished = await drain(stream, include_usage=True)
    assert events[-1] == DONE
    error = json.loads(events[-2].removeprefix(b"data: "))
    assert set(error) == {"error"} and error["error"]["type"] == "server_error"
    assert error["error"]["message"] == "generation failed"
    assert b'"content":"Hel"' in events[1]
    assert not any(b'"usage"' in e for e in events)  # no usage chunk after a failure
    assert [e.message for e in finished] == ["generation failed"]


async def test_a_normal_stream_has_role_content_finish_usage_done():
    stream = make_stream(n=2)
    stream.push(0, "a", [5], [], "stop", None)
    stream.push(1, "b", [6], [], "length", None)
    events, finished = await drain(stream, include_usage=True)
    payloads = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert [p["choices"][0]["delta"] for p in payloads[:2]] == [{"role": "assistant", "content": ""}] * 2
    reasons = {
        p["choices"][0]["index"]: p["choices"][0]["finish_reason"]
        for p in payloads
        if p["choices"] and p["choices"][0]["finish_reason"]
    }
    assert reasons == {0: "stop", 1: "length"}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 2
    assert events[-1] == DONE and finished == [None]


async def test_a_reader_that_leaves_cancels_the_request():
    stream = make_stream()
    stream.push(0, "a", [5], [], None, None)
    gen = chat_event_stream(stream, chunk=CHUNK, include_usage=False, on_done=lambda s, err: None)
    await gen.__anext__()
    await gen.aclose()
    assert stream.cancelled
