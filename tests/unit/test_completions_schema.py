"""/v1/completions without a server: wire decoding, prompt shapes -> engine requests, logprobs."""

from __future__ import annotations

import json
from functools import partial

import anyio
import msgspec
import pytest

from app.media import ImageFetchPolicy
from app.prompt_logprobs import TextOffsets
from app.routes.completions import _event_stream, _logprobs
from app.schemas.completions import CompletionChunk, CompletionRequest
from app.settings import Settings
from app.translate import Translator
from models.prompt import PreparedPrompt
from scheduler.errors import GenerationError, InvalidRequestError
from scheduler.request import EngineRequest, PromptInput, RequestStream, SamplingParams, TokenLogprob
from tests.unit.sse import sse_events


def _request(**body) -> CompletionRequest:
    return msgspec.json.decode(msgspec.json.encode(body), type=CompletionRequest)


def _translate(**body):
    settings = Settings()
    translator = Translator(settings, ImageFetchPolicy(), None)
    return translator.completion(_request(model=settings.model_name, **body), "cmpl-1")


def _completion_events(streams, *, n: int, on_done, echoes=None, want_logprobs=False):
    """The completions route's SSE writes for `streams` (one per prompt), usage included."""
    return _event_stream(
        streams,
        echoes or [""] * len(streams),
        chunk=partial(CompletionChunk, "c", 0, "m"),
        n=n,
        want_logprobs=want_logprobs,
        top=0,
        include_usage=True,
        on_done=on_done,
    )


def test_defaults_follow_openai() -> None:
    import msgspec

    from app.translate import COMPLETIONS_DEFAULT_MAX_TOKENS

    request = _request(prompt="x")
    # Absent: OpenAI's 16, applied as a default by translate (not as if the client had sent it).
    assert request.max_tokens is msgspec.UNSET and COMPLETIONS_DEFAULT_MAX_TOKENS == 16
    assert request.n == 1 and request.logprobs is None and not request.echo


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", [("hi", None)]),
        (["a", "b"], [("a", None), ("b", None)]),
        ([1, 2, 3], [(None, (1, 2, 3))]),
        ([[1], [2, 3]], [(None, (1,)), (None, (2, 3))]),
    ],
)
def test_prompt_shapes(prompt, expected) -> None:
    engine_requests = _translate(prompt=prompt, n=2, temperature=0.0)
    assert [(r.prompt.text, r.prompt.token_ids) for r in engine_requests] == expected
    assert {r.n for r in engine_requests} == {2} and {r.kind for r in engine_requests} == {"completion"}
    assert len({r.params for r in engine_requests}) == 1


def test_add_special_tokens_reaches_text_prompts() -> None:
    [engine_request] = _translate(prompt="hi", add_special_tokens=False)
    assert engine_request.prompt.add_special_tokens is False


def test_max_tokens_null_leaves_it_to_the_server() -> None:
    assert _translate(prompt="x", max_tokens=None)[0].params.max_tokens is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "suffix": "s"}, "suffix"),
        ({"prompt": "x", "best_of": 3, "n": 2}, "best_of"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": [[1], 2]}, "prompt"),
    ],
)
def test_refused(body, param) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        _translate(**body)
    assert caught.value.param == param


def test_logprobs_payload_offsets_continue() -> None:
    entries = [
        TokenLogprob(5, -0.5, [(5, -0.5), (6, -1.0)], token="ab", top_tokens=["ab", "c"]),
        TokenLogprob(7, -2.0, [(8, -0.1)], token="d", top_tokens=["e"]),
    ]
    offsets = TextOffsets("ab", base=3)
    payload = _logprobs(entries, offsets)
    assert payload.tokens == ["ab", "d"]
    assert payload.token_logprobs == [-0.5, -2.0]
    # The sampled token is always among the top entries, as in OpenAI's answers.
    assert payload.top_logprobs == [{"ab": -0.5, "c": -1.0}, {"e": -0.1, "d": -2.0}]
    # "d" has not come yet (a stream may hold text back): it starts where the text is so far.
    assert payload.text_offset == [3, 5]
    # It comes with the next token's text, which is then placed after it.
    offsets.extend("df")
    assert _logprobs([TokenLogprob(9, -1.0, [], token="f")], offsets).text_offset == [6]


def test_alternatives_that_decode_alike_keep_the_most_likely_value() -> None:
    """Byte pieces decode to the same "\ufffd": the later, less likely one overwrote the key."""
    entry = TokenLogprob(
        3, -7.5, [(1, -4.9), (2, -5.0), (3, -5.2)], token="\ufffd", top_tokens=["\ufffd", " w", "\ufffd"]
    )
    top = _logprobs([entry], TextOffsets("\ufffd", base=0)).top_logprobs[0]
    assert top == {"\ufffd": -4.9, " w": -5.0}
    assert list(top.values()) == sorted(top.values(), reverse=True)


def _entry(token: str, raw: bytes | None = None) -> TokenLogprob:
    return TokenLogprob(1, -1.0, [], token=token, token_bytes=raw if raw is not None else token.encode())


def test_text_offsets_of_tokens_that_split_characters() -> None:
    """ "𝔘ok" in byte tokens (each decodes alone to U+FFFD): the pieces of the character start at
    it, the next token after it; offsets never go back nor past the text."""
    text = "𝔘ok"
    raw = text.encode()
    entries = [
        _entry("\ufffd", raw[:1]),
        _entry("\ufffd", raw[1:3]),
        _entry("\ufffd", raw[3:4]),
        _entry("ok"),
    ]
    assert [TextOffsets(text).place(e) for e in entries[:1]] == [0]
    offsets = TextOffsets(text)
    assert [offsets.place(e) for e in entries] == [0, 0, 0, 1]
    # A character completed by a token that also holds more text: that token starts at the character.
    offsets = TextOffsets(text + "!")
    assert [offsets.place(e) for e in [_entry("\ufffd", raw[:2]), _entry("\ufffdok!", raw[2:] + b"!")]] == [
        0,
        0,
    ]


def test_text_offsets_skip_tokens_the_text_does_not_show() -> None:
    # A BOS the echoed prompt does not show, a SentencePiece token with its prefix space at the very
    # start, a stop token at the end.
    offsets = TextOffsets("hello world")
    entries = [_entry("<s>"), _entry("hello", b" hello"), _entry(" world"), _entry("</s>")]
    assert [offsets.place(e) for e in entries] == [0, 0, 5, 11]
    # SentencePiece with "▁" a token of its own: the first one is the prefix space decode() drops.
    offsets = TextOffsets("hello world")
    entries = [
        _entry("<s>"),
        _entry("", b" "),
        _entry("he"),
        _entry("llo"),
        _entry("", b" "),
        _entry("world"),
    ]
    assert [offsets.place(e) for e in entries] == [0, 0, 0, 2, 5, 6]


def _streamed_offsets(entries: list[TokenLogprob], text: str, arrivals: list[tuple[int, int]]) -> list[int]:
    """Offsets as a stream places them: each update brings `arrivals[i]` = (entries so far, text
    so far), the text lagging the tokens as a detokenizer's held-back bytes make it."""
    offsets, pending, placed = TextOffsets(), [], []
    sent_entries = sent_text = 0
    for number, (upto_entries, upto_text) in enumerate(arrivals):
        offsets.extend(text[sent_text:upto_text])
        pending.extend(entries[sent_entries:upto_entries])
        sent_entries, sent_text = upto_entries, upto_text
        _, settled = offsets.place_settled(pending, final=number == len(arrivals) - 1)
        placed.extend(settled)
    return placed


def test_streamed_offsets_equal_the_whole_answers() -> None:
    """Offsets were placed as each update came, before the text of a split character (or of a
    possible stop string) had been sent: they took the current position and differed from the
    non-streamed answer's."""
    cjk = "世".encode()
    cases = [
        # A split character, its text sent with the token after it.
        ("a世b", [_entry("a"), _entry("\ufffd", cjk[:2]), _entry("\ufffd", cjk[2:]), _entry("b")]),
        # Two bytes that never make a character (U+FFFD each), then ASCII.
        (
            "x\ufffd\ufffdwn",
            [_entry("x"), _entry("\ufffd\ufffd", b"\xb3\xa1"), _entry("\ufffd", b"\xe4"), _entry("wn")],
        ),
        # A special token the text skips, mid-stream.
        ("hi there", [_entry("hi"), _entry("<|sep|>"), _entry(" there")]),
    ]
    for text, entries in cases:
        whole_offsets = TextOffsets(text)
        whole = [whole_offsets.place(e) for e in entries]
        n = len(entries)
        # Text lagging the tokens by one update, all at the end, or arriving with them.
        arrivals = [
            [(k, len(text) * max(0, k - 1) // n) for k in range(1, n + 1)] + [(n, len(text))],
            [(k, 0) for k in range(1, n + 1)] + [(n, len(text))],
            [(n, len(text))],
        ]
        for arrival in arrivals:
            assert _streamed_offsets(entries, text, arrival) == whole, (text, arrival)


def test_a_skipped_special_token_holds_a_streams_logprobs_back_briefly() -> None:
    """A special token the text never shows (mistral's `<｜end▁of▁sentence｜>` mid-output) kept
    every later logprob until the stream's end: its place was only settled by 1,024 more
    characters. It is settled once a little text follows its place."""
    entries = [_entry("a"), _entry("<|sep|>")] + [_entry("b") for _ in range(60)]
    offsets, pending, sent = TextOffsets(), [], []
    for number, entry in enumerate(entries):
        offsets.extend("" if entry.token == "<|sep|>" else entry.token)
        pending.append(entry)
        sent.extend(offsets.place_settled(pending, final=False)[1])
        if number == 50:
            assert len(sent) >= 10, sent  # the special token and the tokens after it went out
    whole = TextOffsets("a" + "b" * 60)
    assert sent == [whole.place(e) for e in entries][: len(sent)]


def test_stream_failure_is_a_final_error_event() -> None:
    """Prompt 0 finishes; prompt 1 fails mid-way: its text so far, then the error, then [DONE]."""

    async def main() -> tuple[list[bytes], list]:
        engine_request = EngineRequest("c", PromptInput(text="x"), SamplingParams())
        streams = [RequestStream(engine_request, PreparedPrompt([1])) for _ in "ab"]
        streams[0].push(0, "ok", [5], [], "length", None)
        streams[1].push(0, "par", [6], [], None, None)
        streams[1].push(0, "", [], [], "error", GenerationError("boom"))
        errors: list = []
        events = _completion_events(streams, n=1, on_done=errors.append)
        return sse_events([event async for event in events]), errors

    events, errors = anyio.run(main)
    assert events[-1] == b"data: [DONE]\n\n"
    payloads = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    texts = [(p["choices"][0]["index"], p["choices"][0]["text"]) for p in payloads[:2]]
    assert texts == [(0, "ok"), (1, "par")]
    assert payloads[2]["error"]["code"] == "generation_failed" and "usage" not in payloads[2]
    assert len(payloads) == 3 and [e.message for e in errors] == ["boom"]


def test_a_streamed_update_is_one_write_and_the_last_prompt_ends_in_its_last_write() -> None:
    async def main():
        engine_request = _translate(prompt=["a", "b"], n=2, temperature=0.0)[0]
        streams = [RequestStream(engine_request, PreparedPrompt([1])) for _ in "ab"]
        for p, stream in enumerate(streams):
            stream.push(0, f"p{p}c0", [5], [], "length", None)
            stream.push(1, f"p{p}c1", [6], [], "stop", None)
        events = _completion_events(streams, n=2, on_done=lambda error: None)
        return [write async for write in events]

    writes = anyio.run(main)
    # Prompt 0's choices share a write; prompt 1's go with its usage chunk and [DONE].
    assert [len(sse_events([w])) for w in writes] == [2, 4]
    first = [json.loads(e.removeprefix(b"data: ")) for e in sse_events(writes[:1])]
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in first] == [(0, "p0c0"), (1, "p0c1")]
    assert writes[1].endswith(b"data: [DONE]\n\n") and b'"usage"' in writes[1]


def test_an_answer_finished_during_the_echo_still_streams_its_tail() -> None:
    """The echo waits for the first token, then is sent (an await): the rest of the answer and
    its end could arrive meanwhile, and the stream, seeing the request finished, stopped after
    the update it held and never read them (a streamed echo lost its last tokens' logprobs)."""

    async def main() -> list[bytes]:
        engine_request = EngineRequest("c", PromptInput(text="x"), SamplingParams(logprobs=0), n=1)
        stream = RequestStream(engine_request, PreparedPrompt([1]))
        stream.push(0, "a", [5], [TokenLogprob(5, -0.5, [], token="a")], None, None)
        events = _completion_events(
            [stream], n=1, on_done=lambda error: None, echoes=["x"], want_logprobs=True
        )
        sent = [await anext(events)]  # the echo: the answer ends while it goes out
        stream.push(
            0,
            "bc",
            [6, 7],
            [TokenLogprob(6, -1.0, [], token="b"), TokenLogprob(7, -1.0, [], token="c")],
            "length",
            None,
        )
        sent += [event async for event in events]
        return sse_events(sent)

    events = anyio.run(main)
    payloads = [json.loads(e.removeprefix(b"data: ")) for e in events if e != b"data: [DONE]\n\n"]
    tokens = [
        t for p in payloads for c in p["choices"] for t in (c.get("logprobs") or {}).get("tokens") or []
    ]
    finishes = [c["finish_reason"] for p in payloads for c in p["choices"] if c["finish_reason"]]
    assert tokens[-3:] == ["a", "b", "c"] and finishes == ["length"]


def test_an_answer_whole_before_the_echo_is_streamed_whole() -> None:
    """A prompt the prefix cache held is prefilled at once, and the whole answer can be in before
    the echo goes out: the stream, already finished, stopped at the first update it had held for
    the echo (the prefill's), and sent the echo and [DONE] without the answer."""

    async def main() -> list[bytes]:
        engine_request = EngineRequest("c", PromptInput(text="x"), SamplingParams(logprobs=0), n=1)
        stream = RequestStream(engine_request, PreparedPrompt([1, 2]))
        events = _completion_events(
            [stream], n=1, on_done=lambda error: None, echoes=["x"], want_logprobs=True
        )
        sent: list[bytes] = []

        async def read() -> None:
            sent.extend([event async for event in events])

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await anyio.sleep(0.01)  # the reader waits for the prefill
            stream.push(0, "", [], [], None, None, prompt_logprobs=[TokenLogprob(1, None, [], token="x")])
            await anyio.sleep(0.01)  # ... reads it, and waits for the first token
            answer = [TokenLogprob(5, -0.5, [], token="a"), TokenLogprob(6, -1.0, [], token="b")]
            stream.push(0, "ab", [5, 6], answer, "length", None)  # the whole answer at once
        return sse_events(sent)

    payloads = [json.loads(e.removeprefix(b"data: ")) for e in anyio.run(main) if e != b"data: [DONE]\n\n"]
    text = "".join(c["text"] for p in payloads for c in p["choices"])
    tokens = [
        t for p in payloads for c in p["choices"] for t in (c.get("logprobs") or {}).get("tokens") or []
    ]
    assert text == "xab" and tokens[-2:] == ["a", "b"]


def test_text_offsets_after_bytes_that_never_made_a_character() -> None:
    """Byte-level: held bytes the next token shows to be no character are one U+FFFD, and that
    token starts after it. Byte fallback: a run of byte tokens with one invalid byte is written as
    one U+FFFD a byte, "e" (0x65) included, so each token takes its bytes' share of the run instead
    of an "e" further on; offsets stay equal streamed and whole."""
    emoji = "😀".encode()
    cases = [
        ("\ufffd rest", [_entry("\ufffd", emoji[:2]), _entry(" rest")], [0, 1]),
        (
            "a\ufffd\ufffd hello e",
            [_entry("a"), _entry("\ufffd", b"\xb6"), _entry("e"), _entry(" hello"), _entry(" e")],
            [0, 1, 2, 3, 9],
        ),
        (
            "\ufffd\ufffd\ufffdhello e",
            [
                _entry("\ufffd", b"\xe4"),
                _entry("\ufffd", b"\xbd"),
                _entry("e"),
                _entry("hello"),
                _entry(" e"),
            ],
            [0, 0, 2, 3, 8],
        ),
    ]
    for text, entries, expected in cases:
        whole = TextOffsets(text)
        assert [whole.place(e) for e in entries] == expected, text
        n = len(entries)
        for arrival in ([(k, 0) for k in range(1, n + 1)] + [(n, len(text))], [(n, len(text))]):
            assert _streamed_offsets(entries, text, arrival) == expected, (text, arrival)


def test_a_skipped_special_token_takes_no_share_of_a_replaced_run() -> None:
    """`</s>` (not in the text) before a stray byte took the byte's U+FFFD, and the byte was placed
    after its own character; streamed and whole differed."""
    cases = [
        ("\ufffd the", [_entry("</s>"), _entry("\ufffd", b"\x80"), _entry(" the")], [0, 0, 1]),
        (
            "\ufffd\ufffd\ufffd",
            [_entry("</s>"), _entry("\ufffd", b"\x80"), _entry("\ufffd", b"\x81"), _entry("\ufffd", b"\x82")],
            [0, 0, 1, 2],
        ),
    ]
    for text, entries, expected in cases:
        whole = TextOffsets(text)
        assert [whole.place(e) for e in entries] == expected, text
        n = len(entries)
        for arrival in (
            [(k, 0) for k in range(1, n + 1)] + [(n, len(text))],
            [(n, 1), (n, len(text))],
            [(n, len(text))],
        ):
            assert _streamed_offsets(entries, text, arrival) == expected, (text, arrival)
