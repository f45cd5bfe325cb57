"""The Hermes tool-call parser (pure text, no model) and the request rules around tools.

Streaming and non-streaming must agree: the same output cut at any character boundaries, fed
piece by piece, reassembles to exactly what the whole text parses to."""

from __future__ import annotations

import json
from functools import partial

import anyio
import msgspec
import pytest

from app.schemas.chat import ChatCompletionChunk, ChatCompletionRequest
from app.streaming import DONE, chat_event_stream
from app.tool_calls import HERMES, ToolCallDelta, parse_message, parser_factory
from app.translate import _chat_grammar
from models.prompt import PreparedPrompt
from scheduler.errors import InvalidRequestError
from scheduler.request import EngineRequest, PromptInput, RequestStream, SamplingParams
from tests.unit.sse import sse_events

CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "}\\" <tool_call>"}}\n</tool_call>'
TEXTS = {
    "plain": "Just words, <b>bold</b> and a trailing newline.\n",
    "one": CALL_A,
    "two": CALL_A + "\n" + CALL_B + "\n",
    "text_before": "Let me check that.\n\n" + CALL_A,
    "text_after": CALL_A + "\nDone <tool",
    "malformed": 'Hmm <tool_call>\n{"name": "broken", "arguments": {"a": }\n</tool_call> then text',
    "no_name": '<tool_call>{"arguments": {}}</tool_call>',
    "unterminated": "Checking " + CALL_A[:40],
    "string_arguments": '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
    "parameters_key": '<tool_call>\n{"parameters": {"q": [1, 2]}, "name": "search"}\n</tool_call>',
}


def calls_of(parsed) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls]


def reassemble(deltas) -> tuple[str | None, list[tuple[str, str]]]:
    """Stream deltas -> (content, calls) as a client accumulates them."""
    content, calls = "", []
    for delta in deltas:
        if isinstance(delta, str):
            content += delta
        elif delta.id is not None:
            assert delta.index == len(calls) and delta.arguments == ""
            calls.append([delta.name, ""])
        else:
            calls[delta.index][1] += delta.arguments
    return content or None, [tuple(c) for c in calls]


@pytest.mark.parametrize(
    "key, content, calls",
    [
        ("plain", TEXTS["plain"], []),
        ("one", None, [("get_weather", '{"city": "Paris", "unit": "c"}')]),
        (
            "two",
            None,
            [("get_weather", '{"city": "Paris", "unit": "c"}'), ("get_time", '{"zone": "}\\" <tool_call>"}')],
        ),
        ("text_before", "Let me check that.", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
        ("text_after", "Done <tool", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
        ("malformed", TEXTS["malformed"], []),
        ("no_name", TEXTS["no_name"], []),
        ("unterminated", TEXTS["unterminated"], []),
        ("string_arguments", None, [("f", '{"x": 1}')]),
        ("parameters_key", None, [("search", '{"q": [1, 2]}')]),
    ],
)
def test_whole_text(key, content, calls):
    parsed = parse_message(TEXTS[key], HERMES.parser())
    assert parsed.content == content
    assert calls_of(parsed) == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed.tool_calls)
    assert len({c["id"] for c in parsed.tool_calls}) == len(parsed.tool_calls)


@pytest.mark.parametrize("stream_arguments", [False, True])
@pytest.mark.parametrize("key", sorted(TEXTS))
def test_stream_split_anywhere_matches_the_whole_text(key, stream_arguments):
    text = TEXTS[key]
    whole = parse_message(text, HERMES.parser(stream_arguments=stream_arguments))
    expected = (whole.content, calls_of(whole))
    splits = [
        [text[:i], text[i:j], text[j:]] for i in range(len(text) + 1) for j in range(i, len(text) + 1, 7)
    ]
    splits.append(list(text))  # one character at a time
    for pieces in splits:
        parser = HERMES.parser(stream_arguments=stream_arguments)
        deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
        assert reassemble(deltas) == expected, pieces
        assert all(d for d in deltas if isinstance(d, str)), "empty content deltas"
        assert not any(isinstance(d, str) and "</tool_call>" in d for d in deltas) or key in (
            "malformed",
            "no_name",
        )


def test_forced_calls_stream_their_arguments_as_they_come():
    parser = HERMES.parser(stream_arguments=True)
    deltas = [d for ch in CALL_A for d in parser.feed(ch)] + parser.finish()
    header, *fragments = deltas
    assert header.payload() == {
        "index": 0,
        "id": header.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert len(fragments) > 5 and all(isinstance(f, ToolCallDelta) and f.id is None for f in fragments)
    assert fragments[0].payload() == {"index": 0, "function": {"arguments": fragments[0].arguments}}
    assert json.loads("".join(f.arguments for f in fragments)) == {"city": "Paris", "unit": "c"}


def test_unforced_calls_are_checked_whole():
    parser = HERMES.parser(stream_arguments=False)
    deltas = [d for ch in CALL_A for d in parser.feed(ch)]
    assert (
        len(deltas) == 2
        and deltas[0].name == "get_weather"
        and deltas[1].arguments == '{"city": "Paris", "unit": "c"}'
    )


def test_a_forced_call_cut_by_max_tokens_stays_a_call():
    parsed = parse_message(CALL_A[: CALL_A.index("Paris") + 2], HERMES.parser(stream_arguments=True))
    assert parsed.content is None and calls_of(parsed) == [("get_weather", '{"city": "Pa')]


@pytest.mark.parametrize("cut", ["<tool", "<tool_call>", "<tool_call>\n{", '<tool_call>\n{"name": "get_w'])
def test_a_forced_call_cut_before_its_name_is_neither_content_nor_a_call(cut):
    """A grammar forced the calls, so what was generated is their markup: cut (max_tokens, a stop
    string) before the name, the client gets no call and none of the markup as content."""
    parsed = parse_message(cut, HERMES.parser(stream_arguments=True))
    assert parsed.content is None and parsed.tool_calls == []
    unforced = parse_message(cut, HERMES.parser())  # free text may just have looked like a tag
    assert unforced.content == cut


def test_a_whole_call_without_its_end_tag_is_still_a_call():
    """The model stopped (EOS) after the call's JSON, before `</tool_call>`."""
    parsed = parse_message(
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', HERMES.parser()
    )
    assert parsed.content == "Sure." and calls_of(parsed) == [("get_weather", '{"city": "Paris"}')]
    cut = parse_message('<tool_call>\n{"name": "get_weather", "argu', HERMES.parser())
    assert cut.content == '<tool_call>\n{"name": "get_weather", "argu' and cut.tool_calls == []


def test_stream_chunks_end_with_tool_calls():
    request = EngineRequest("r1", PromptInput(text="hi"), SamplingParams(max_tokens=64))
    stream = RequestStream(request, PreparedPrompt([1, 2, 3]))
    stream.push(0, "Sure." + CALL_A[:30], [5], [], None, None)
    stream.push(0, CALL_A[30:], [6], [], "stop", None)

    async def drain() -> list[bytes]:
        events = chat_event_stream(
            stream,
            chunk=partial(ChatCompletionChunk, "chatcmpl-1", 0, "m"),
            include_usage=False,
            on_done=lambda s, err: None,
            tool_parser=lambda: HERMES.parser(stream_arguments=True),
        )
        return [e async for e in events]

    events = sse_events(anyio.run(drain))
    assert events[-1] == DONE
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[1:-1]]  # after the role chunk
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"content": "Sure."}
    assert deltas[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert (
        "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1])
        == '{"city": "Paris", "unit": "c"}'
    )
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


# -- request rules -----------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat_request(**fields) -> ChatCompletionRequest:
    return msgspec.convert({"messages": [{"role": "user", "content": "hi"}], **fields}, ChatCompletionRequest)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}},
            "tool_choice",
        ),
        (
            {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_inconsistent_tool_requests_are_refused(fields, param):
    with pytest.raises(InvalidRequestError) as caught:
        _chat_grammar(chat_request(**fields))
    assert caught.value.param == param


def test_grammar_and_parsing_follow_tool_choice():
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert _chat_grammar(chat_request()) is None and parser_factory(chat_request()) is None
    assert _chat_grammar(chat_request(tools=[TOOL])) is None  # auto: parse, do not force
    assert parser_factory(chat_request(tools=[TOOL]))().stream_arguments is False
    assert parser_factory(chat_request(tools=[TOOL], tool_choice="none")) is None
    required = _chat_grammar(chat_request(tools=[TOOL], tool_choice="required", parallel_tool_calls=False))
    assert (
        required.kind == "tool_calls"
        and required.param == "tools"
        and json.loads(required.source)["parallel"] is False
    )
    assert (
        json.loads(_chat_grammar(chat_request(tools=[TOOL], tool_choice=named)).source)["tools"][0]["name"]
        == "get_weather"
    )
    assert parser_factory(chat_request(tools=[TOOL], tool_choice=named))().stream_arguments is True
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    spec = _chat_grammar(
        chat_request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    )
    assert (
        spec.kind == "json_schema"
        and json.loads(spec.source) == schema
        and list(json.loads(spec.source)["properties"]) == ["b", "a"]
    )
    assert _chat_grammar(chat_request(response_format={"type": "json_object"})).kind == "json_object"
    assert parser_factory(chat_request(tools=[TOOL], response_format={"type": "json_object"})) is None
