"""Failures after a response started: chat streams end with an error event then [DONE]; the
plain response is a generic 500. Driven with a real RequestStream fed by hand."""

from __future__ import annotations

import asyncio
import json
from functools import partial

import pytest

from app.schemas.chat import ChatCompletionChunk
from app.streaming import DONE, chat_event_stream
from app.tool_calls import HERMES
from models.prompt import PreparedPrompt
from scheduler.errors import GenerationError, InvalidRequestError
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


async def test_one_choice_failing_ends_the_stream_with_its_own_error():
    """With n > 1, the failing choice's error (a grammar the request made impossible: a 400)
    was reported as a generic "generation failed" while the other choices were still open."""
    stream = make_stream(n=3)
    stream.push(1, "{", [5], [], None, None)
    stream.push(
        0, "", [], [], "error", InvalidRequestError("the grammar could not be followed", param="guided_json")
    )
    events, finished = await drain(stream, include_usage=False)
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "guided_json"
    assert [e.message for e in finished] == ["the grammar could not be followed"]


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


def payloads(write: bytes) -> list:
    return [e.removeprefix(b"data: ").strip() for e in sse_events([write])]


async def test_each_update_is_one_write_and_the_last_carries_the_end_of_the_stream():
    stream = make_stream()
    gen = chat_event_stream(stream, chunk=CHUNK, include_usage=True, on_done=lambda s, err: None)
    role = await anext(gen)
    stream.push(0, "a", [5], [], None, None)
    middle = await anext(gen)
    stream.push(0, "b", [6], [], "stop", None)
    last = await anext(gen)
    assert await anext(gen, None) is None
    assert len(payloads(role)) == 1 and len(payloads(middle)) == 1
    # The last token, its finish, the usage chunk and [DONE] leave in one write, in that order.
    events = payloads(last)
    assert [json.loads(e)["choices"][0]["delta"] for e in events[:2]] == [{"content": "b"}, {}]
    assert json.loads(events[1])["choices"][0]["finish_reason"] == "stop"
    assert json.loads(events[2])["usage"]["completion_tokens"] == 2
    assert events[3] == b"[DONE]"


async def test_the_choices_of_one_update_share_a_write():
    stream = make_stream(n=3)
    gen = chat_event_stream(stream, chunk=CHUNK, include_usage=False, on_done=lambda s, err: None)
    assert [json.loads(e)["choices"][0]["index"] for e in payloads(await anext(gen))] == [0, 1, 2]
    for index in range(3):
        stream.push(index, f"t{index}", [5], [], None, None)
    write = await anext(gen)
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in payloads(write)] == ["t0", "t1", "t2"]
    await gen.aclose()


async def test_an_update_a_tool_call_parser_holds_back_writes_nothing():
    # An empty write would read as the end of a chunked body to some servers: none is sent.
    stream = make_stream()
    gen = chat_event_stream(
        stream, chunk=CHUNK, include_usage=False, on_done=lambda s, err: None, tool_parser=HERMES.parser
    )
    await anext(gen)
    stream.push(0, "<tool_", [5], [], None, None)  # may start a call: held back
    stream.push(0, "", [], [], None, None)
    pending = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0.01)
    assert not pending.done()  # the held-back update produced no write
    stream.push(0, "call>oops", [6], [], "stop", None)
    text = b"".join(payloads(await pending))
    assert b"<tool_call>oops" in text and b"[DONE]" in text


async def test_inter_token_intervals_are_per_choice():
    """n choices stepping together: each choice's tokens are timed against its own last one, so
    a request of n choices of T tokens records n * (T - 1) intervals (vLLM's histogram count),
    not n * T - 1 with most of them ~0."""
    stream = make_stream(n=3)
    for _ in range(4):  # four steps, one token per choice each
        for index in range(3):
            stream.push(index, "x", [5], [], None, None)
    assert sum(stream.token_intervals.values()) == 3 * (4 - 1)


async def test_a_choice_arriving_whole_still_counts_its_intervals():
    """A non-streamed n > 1 answer hands over the first choice's first token, then each choice
    whole: the others' intervals went uncounted (19 of 57 for n=3, 20 tokens)."""
    import time as clock

    stream = make_stream(n=3)
    stream.push(0, "x", [5], [], None, None)  # the request's first token (every choice has one)
    clock.sleep(0.01)
    stream.push(0, "x" * 19, [5] * 19, [], "length", None)
    stream.push(1, "x" * 20, [5] * 20, [], "length", None)
    stream.push(2, "x" * 20, [5] * 20, [], "length", None)
    assert sum(stream.token_intervals.values()) == 3 * 19
