"""Incremental detokenization never splits a character; stop strings are never emitted."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from models.detokenize import IncrementalDetokenizer, StopStringMatcher

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
    assert detok.flush(ids[:-1], "") == tokenizer.decode(ids[:-1])


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
