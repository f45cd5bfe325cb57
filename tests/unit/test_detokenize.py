"""Incremental detokenization never splits a character; stop strings are never emitted."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from models.detokenize import IncrementalDetokenizer, StopStringMatcher, TokenBytes, token_bytes_for

TEXT = "naïve café — 中文字符 and emoji 😀🦀 done."


@pytest.fixture(scope="module")
def tokenizer(tiny_text_path):
    return AutoTokenizer.from_pretrained(tiny_text_path)


def stream(tokenizer, ids, prompt=()):
    detok = IncrementalDetokenizer(tokenizer, list(prompt))
    return [detok.push(t) for t in ids], detok


def test_streamed_text_equals_full_decode_and_pieces_are_valid(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split())  # multi-byte characters span several tokens
    pieces, _ = stream(tokenizer, ids, prompt=tokenizer("Q:")["input_ids"])
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("offsets_path", [False, True])
def test_kept_special_tokens_stay_and_the_others_are_skipped(tokenizer, offsets_path):
    """A tool-call format's markers may be special tokens: kept for the parser, while every other
    special token is skipped as `skip_special_tokens` would (the tiny vocabulary marks <|im_start|>
    and <|im_end|> special)."""
    ids = tokenizer("<|im_start|>naïve<|im_end|> café<|im_start|>", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [], keep_special_tokens=("<|im_end|>",))
    if offsets_path:
        detok._stream = None
    assert "".join(detok.push(t) for t in ids) + detok.flush() == "naïve<|im_end|> café"
    plain = IncrementalDetokenizer(tokenizer, [])
    assert "".join(plain.push(t) for t in ids) == "naïve café"


def test_python_fallback_matches(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    detok._stream = None  # force the offset-based path used for slow tokenizers
    assert "".join(detok.push(t) for t in ids) == TEXT


def test_flush_returns_bytes_of_an_unfinished_character(tokenizer):
    ids = tokenizer("🦀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    pieces, detok = stream(tokenizer, ids[:-1])
    assert "".join(pieces) == ""
    assert detok.flush() == tokenizer.decode(ids[:-1])
    assert detok.flush() == ""  # owed once


@pytest.mark.parametrize(
    "chunks,stops,emitted,hit",
    [
        (["Hello wo", "rld STOP here"], ["STOP"], "Hello world ", True),
        (["abc S", "T", "O", "P"], ["STOP"], "abc ", True),
        (["abc S", "T", "x"], ["STOP"], "abc STx", False),
        (["a", "b"], [], "ab", False),
        (["x<|", "end|>y"], ["<|end|>", "zz"], "x", True),
    ],
)
def test_stop_strings_are_held_back_and_never_emitted(chunks, stops, emitted, hit):
    matcher = StopStringMatcher(stops)
    out, stopped = "", False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out += text
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    assert (out, stopped) == (emitted, hit)


PARTIAL = "𝔘ok🫠 naïve 中文"


def test_token_bytes_join_into_the_texts_utf8_where_tokens_split_characters(tokenizer):
    ids = tokenizer(PARTIAL, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    texts, raw = detok.token_texts_and_bytes(ids)
    assert "\ufffd" in texts  # some tokens hold part of a character: their text alone is U+FFFD
    assert b"".join(raw) == PARTIAL.encode()
    assert all(data == text.encode() for text, data in zip(texts, raw, strict=True) if "\ufffd" not in text)


def test_token_bytes_fall_back_to_the_text_when_the_piece_is_unknown(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    names = token_bytes_for(tokenizer)
    assert names is token_bytes_for(tokenizer)  # one cache per tokenizer, not per sequence

    class Broken:
        backend_tokenizer = None

        def convert_ids_to_tokens(self, token_id):
            raise RuntimeError("no vocabulary")

    broken = Broken()
    assert TokenBytes(broken).of(broken, 7, "a\ufffd") == "a\ufffd".encode()
    texts, raw = detok.token_texts_and_bytes([tokenizer.convert_tokens_to_ids("<|im_end|>")])
    assert raw == [texts[0].encode()] == [b"<|im_end|>"]  # an added token is its text


def test_a_prompt_that_ends_inside_a_character_is_never_repeated(tokenizer):
    """A token-id prompt may stop partway through a character, the generated tokens finishing it.
    Fed the prompt's tokens as context, DecodeStream answers the whole context once the character
    completes; the answer must hold the generated tokens' text only."""
    ids = tokenizer("Say 🦀 done", add_special_tokens=False)["input_ids"]
    crab = tokenizer("🦀", add_special_tokens=False)["input_ids"]
    assert len(crab) > 1
    # Where the crab's bytes start in "Say 🦀 done" (after "Say" and a space token or " " merged in).
    split = next(i for i in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:i]))
    prompt, generated = ids[:split], ids[split:]
    pieces, detok = stream(tokenizer, generated, prompt=prompt)
    text = "".join(pieces) + detok.flush()
    assert "Say" not in text
    assert text == tokenizer.decode(generated)
    assert text.endswith(" done")
