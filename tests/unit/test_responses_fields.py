"""/v1/responses request fields and logprobs, without a server: what `include`, `top_logprobs`,
`prompt_cache_options`, `moderation`, `context_management` become; the engine's warnings in
Responses terms; and where each token's logprob lands in the output (streamed or not, with a
tool-call parser cutting text and calls), driven with a real RequestStream fed by hand."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from app.request_fields import check_undeclared
from app.responses_convert import chat_form, responses_warnings
from app.responses_stream import OutputBuilder, feed_choice, final_response, token_pieces
from app.schemas.responses import ResponsesRequest
from app.tool_calls import HERMES
from scheduler.errors import ContextLengthExceededError, InvalidRequestError
from scheduler.request import TokenLogprob
from tests.unit.test_responses_stream import events_of, initial, make_stream

pytestmark = pytest.mark.anyio
LOGPROBS = ["message.output_text.logprobs"]
CALL_TOKENS = ["<tool_call>", "\n", '{"name": "f", "arguments": {"x": 1}}', "\n", "</tool_call>"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def updates_of(pushes: list[tuple], parser=None) -> list[tuple[str, dict]]:
    """The events of a stream fed update by update: each push is read before the next is made
    (pushes a reader has not taken yet would be coalesced into one update)."""
    stream = make_stream()

    async def produce() -> None:
        for push in pushes:
            stream.push(0, *push)
            while stream._pending:
                await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        events, _ = await events_of(stream, parser)
    return events


def request(**fields) -> ResponsesRequest:
    return msgspec.convert({"input": "hi", **fields}, ResponsesRequest)


def lp(token: str, token_id: int = 0) -> TokenLogprob:
    """A generated token's logprob as the replica names it, with one alternative."""
    return TokenLogprob(
        token_id,
        -0.5 - token_id,
        [(token_id, -0.5 - token_id), (99, -3.0)],
        token=token,
        top_tokens=[token, "z"],
        token_bytes=token.encode(),
        top_token_bytes=[token.encode(), b"z"],
    )


def tokens(*texts: str) -> list[TokenLogprob]:
    return [lp(text, i) for i, text in enumerate(texts)]


# -- the request ----------------------------------------------------------------------------------
def test_the_include_asks_the_engine_for_logprobs_with_top_logprobs_alternatives() -> None:
    chat = chat_form(request(include=LOGPROBS, top_logprobs=5)).request
    assert chat.logprobs is True and chat.top_logprobs == 5
    chat = chat_form(request(include=LOGPROBS)).request
    assert chat.logprobs is True and chat.top_logprobs == 0


def test_top_logprobs_alone_returns_none_as_openai_and_says_so() -> None:
    req = request(top_logprobs=5)
    chat = chat_form(req).request
    assert chat.logprobs is False and chat.top_logprobs is None
    [warning] = responses_warnings(req, [])
    assert "top_logprobs has no effect without include" in warning and LOGPROBS[0] in warning
    assert responses_warnings(request(top_logprobs=0), []) == []
    assert responses_warnings(request(top_logprobs=3, include=LOGPROBS), []) == []


@pytest.mark.parametrize(
    "value",
    ["reasoning.encrypted_content", "message.input_image.image_url", "web_search_call.action.sources"],
)
def test_include_values_naming_outputs_never_made_are_accepted(value: str) -> None:
    chat = chat_form(request(include=[value])).request
    assert chat.logprobs is False


def test_an_unknown_include_value_is_a_400_naming_it() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        chat_form(request(include=[*LOGPROBS, "message.output_text.nope"]))
    assert raised.value.param == "include[1]" and "message.output_text.nope" in raised.value.message


def test_prompt_cache_options_are_hints_but_prewarm_is_refused() -> None:
    chat_form(request(prompt_cache_options={"mode": "explicit", "ttl": "12h"}, prompt_cache_retention="24h"))
    chat_form(request(prompt_cache_options={"prewarm": False}))
    with pytest.raises(InvalidRequestError) as raised:
        chat_form(request(prompt_cache_options={"prewarm": True}))
    assert raised.value.param == "prompt_cache_options.prewarm"


def test_the_lowered_max_tokens_is_named_max_output_tokens() -> None:
    lowered = "max_tokens 1000 was lowered to this server's limit of 128 (MAX_NEW_TOKENS_DEFAULT)"
    cut = "the prompt was 20 tokens; the first 4 were dropped to fit MAX_INPUT_TOKENS=16"
    assert responses_warnings(request(max_output_tokens=1000), [lowered, cut]) == [
        "max_output_tokens 1000 was lowered to this server's limit of 128 (MAX_NEW_TOKENS_DEFAULT)",
        cut,
    ]
    form = chat_form(request())
    with pytest.raises(ContextLengthExceededError) as raised, form.responses_params():
        raise ContextLengthExceededError("Please reduce the prompt or max_tokens.", param="max_tokens")
    assert raised.value.param == "max_output_tokens"
    assert raised.value.message == str(raised.value) == "Please reduce the prompt or max_output_tokens."


def test_a_template_refusing_the_system_role_names_instructions() -> None:
    """Gemma's template raises "System role not supported": the chat side names the system
    message (`messages[0]`), which on /v1/responses is `instructions` (it said `input`)."""
    form = chat_form(request(instructions="Be brief."))
    with pytest.raises(InvalidRequestError) as raised, form.responses_params():
        raise InvalidRequestError("the chat template rejected the messages: System role", param="messages[0]")
    assert raised.value.param == "instructions"
    assert form.param("messages") == "input"


# -- fields no Struct declares ----------------------------------------------------------------------
DECLARED = tuple(ResponsesRequest.__struct_fields__)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_moderation_is_refused_unless_null(path: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        check_undeclared({"moderation": {"model": "omni-moderation-latest"}}, (), path)
    assert raised.value.param == "moderation"
    check_undeclared({"moderation": None}, (), path)


def test_context_management_is_refused_on_responses_unless_empty() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        check_undeclared({"context_management": [{"type": "compaction"}]}, DECLARED, "/v1/responses")
    assert raised.value.param == "context_management" and "compact" in raised.value.message
    check_undeclared({"context_management": None}, DECLARED, "/v1/responses")
    check_undeclared({"context_management": []}, DECLARED, "/v1/responses")


def test_prompt_cache_fields_change_nothing_on_chat(caplog) -> None:
    body = {"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}, "prompt_cache_retention": "24h"}
    with caplog.at_level("DEBUG", logger="app.request_fields"):
        check_undeclared(body, (), "/v1/chat/completions")
    assert "ignored fields that change nothing: prompt_cache_options, prompt_cache_retention" in caplog.text


def test_the_logprobs_hint_says_what_works() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        check_undeclared({"logprobs": True}, DECLARED, "/v1/responses")
    assert raised.value.param == "logprobs" and LOGPROBS[0] in raised.value.message
    check_undeclared({"logprobs": False}, DECLARED, "/v1/responses")


# -- where logprobs land --------------------------------------------------------------------------
def test_token_pieces_cut_the_text_at_its_tokens() -> None:
    entries = tokens("Hel", "lo", "")
    assert token_pieces("Hello", entries) == [("Hel", entries[:1]), ("lo", entries[1:2]), ("", entries[2:])]
    # A token whose own text is not where the text goes on: the rest goes as one piece.
    odd = tokens("a", "\ufffd", "b")
    assert token_pieces("a\u00e9b", odd) == [("a", odd[:1]), ("\u00e9b", odd[1:])]
    assert token_pieces("tail", []) == [("tail", [])] and token_pieces("", []) == []
    # A SentencePiece answer's first token keeps its space; the text does not.
    spaced = tokens(" Hi", " there")
    assert token_pieces("Hi there", spaced) == [("Hi", spaced[:1]), (" there", spaced[1:])]
    assert token_pieces("ab!", tokens("a", "b")) == [("a", [lp("a", 0)]), ("b", [lp("b", 1)]), ("!", [])]


def shape(entry: TokenLogprob) -> dict:
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": list(entry.token_bytes),
        "top_logprobs": [
            {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token_bytes)},
            {"token": "z", "logprob": -3.0, "bytes": [122]},
        ],
    }


async def test_streamed_deltas_carry_their_tokens_logprobs_and_the_part_all_of_them() -> None:
    entries = tokens("Hel", "lo", "!", "")  # the last: the stop token, no text of its own
    pushes = [
        ("Hel", [0], entries[:1], None, None),
        ("", [1], entries[1:2], None, None),  # text held back (by a stop string, say)
        ("lo!", [2], entries[2:3], None, None),
        ("", [3], entries[3:], "stop", None),
    ]
    events = await updates_of(pushes)
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    assert [d["delta"] for d in deltas] == ["Hel", "lo!", ""]
    assert [[e["token"] for e in d["logprobs"]] for d in deltas] == [["Hel"], ["lo", "!"], [""]]
    everything = [shape(e) for e in entries]
    [done] = [data for name, data in events if name == "response.output_text.done"]
    [part_done] = [data for name, data in events if name == "response.content_part.done"]
    assert done["logprobs"] == part_done["part"]["logprobs"] == everything
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["logprobs"] == everything

    builder = OutputBuilder()
    feed_choice(builder, None, "Hello!", True, entries)
    whole = msgspec.to_builtins(final_response(initial(), builder, make_stream(), "stop", None))
    assert whole["output"][0]["content"][0] == final["output"][0]["content"][0]


async def test_without_logprobs_the_parts_have_none() -> None:
    stream = make_stream()
    stream.push(0, "Hi", [0], [], "stop", None)
    events, _ = await events_of(stream)
    assert all(data.get("logprobs", []) == [] for _, data in events)
    assert events[-1][1]["response"]["output"][0]["content"][0]["logprobs"] == []


def _cut(texts: list[str], entries: list, cuts: list[int]) -> list[tuple]:
    """The engine's updates for these tokens, `cuts[i]` tokens in update i, the last one finished."""
    pushes, at = [], 0
    for n in cuts:
        finish = "stop" if at + n == len(texts) else None
        pushes.append(("".join(texts[at : at + n]), [0] * n, entries[at : at + n], finish, None))
        at += n
    return pushes


@pytest.mark.parametrize("cuts", [[1] * 10, [2, 3, 5], [10], [4, 6], [5, 5]])
async def test_with_a_call_the_message_has_its_own_tokens_however_the_updates_were_cut(cuts) -> None:
    texts = ["Let", " me", " check", ".", *CALL_TOKENS, ""]
    entries = tokens(*texts)
    assert sum(cuts) == len(texts)
    pushes = _cut(texts, entries, cuts)
    events = await updates_of(pushes, HERMES.parser)
    assert len([name for name, _ in events if name == "response.output_text.delta"]) >= 2
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    message = final["output"][0]["content"][0]
    assert message["text"] == "Let me check."
    assert message["logprobs"] == [shape(e) for e in entries[:4]]
    deltas = [data for name, data in events if name == "response.output_text.delta"]
    assert [e for d in deltas for e in d["logprobs"]] == message["logprobs"]

    builder = OutputBuilder()
    feed_choice(builder, HERMES.parser(), "".join(texts), True, entries)
    whole = msgspec.to_builtins(final_response(initial(), builder, make_stream(), "stop", None))
    assert whole["output"][0]["content"][0] == message


async def test_a_call_alone_drops_its_tokens_logprobs() -> None:
    entries = tokens(*CALL_TOKENS, "")
    stream = make_stream()
    stream.push(0, "".join(CALL_TOKENS), [0] * len(entries), entries, "stop", None)
    events, _ = await events_of(stream, HERMES.parser)
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["function_call"]
    assert all(data.get("logprobs", []) == [] for _, data in events)


@pytest.mark.parametrize("cuts", [[1] * 9, [3, 6], [6, 3], [9]])
async def test_text_after_a_call_has_its_own_tokens_not_the_closing_tag(cuts) -> None:
    texts = [*CALL_TOKENS, "\n", " Done", ".", ""]  # the newline after the tag is no text
    entries = tokens(*texts)
    assert sum(cuts) == len(texts)
    pushes = _cut(texts, entries, cuts)
    events = await updates_of(pushes, HERMES.parser)
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["function_call", "message"]
    part = final["output"][1]["content"][0]
    assert part["text"].strip() == "Done."
    assert [e["token"] for e in part["logprobs"]] == [" Done", ".", ""]

    builder = OutputBuilder()
    feed_choice(builder, HERMES.parser(), "".join(texts), True, entries)
    whole = msgspec.to_builtins(final_response(initial(), builder, make_stream(), "stop", None))
    assert whole["output"][1]["content"][0] == part
