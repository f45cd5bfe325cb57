"""Logprobs against the text they describe, on the real server: chat's `bytes` rebuild the content's
UTF-8 where tokens split characters, completions' `text_offset`s index the returned text, and an
echoed prompt cut to MAX_INPUT_TOKENS is the prompt the model saw.

builtin:tiny's byte-level vocabulary keeps rare characters (𝔘, 🫠) as several byte tokens, each of
which decodes alone to U+FFFD.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Server, launch, stop, tiny_spec, wait_ready
from tests.integration.helpers import sse_chunks

SPLIT = "𝔘ok🫠"
MAX_INPUT_TOKENS = 64
LONG_PROMPT = "START " + "word " * 200


def _joined(entries: list[dict]) -> bytes:
    return b"".join(bytes(entry["bytes"]) for entry in entries)


def _check_entry_bytes(entries: list[dict]) -> None:
    for entry in entries:
        for item in (entry, *entry["top_logprobs"]):
            # A token's bytes read alone give back its text (U+FFFD for part of a character).
            assert bytes(item["bytes"]).decode("utf-8", errors="replace") == item["token"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprob_bytes_rebuild_the_content(text_server: Server, stream: bool) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 30,
        "logprobs": True,
        "top_logprobs": 2,
        "guided_choice": [SPLIT],
        "stream": stream,
    }
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if stream:
        choices = [c["choices"][0] for c in sse_chunks(response.text) if c["choices"]]
        content = "".join(c["delta"].get("content") or "" for c in choices)
        entries = [e for c in choices if c.get("logprobs") for e in c["logprobs"]["content"]]
    else:
        choice = response.json()["choices"][0]
        content, entries = choice["message"]["content"], choice["logprobs"]["content"]
    assert content == SPLIT
    assert any(e["token"] == "\ufffd" for e in entries)  # the case under test: split characters
    assert _joined(entries) == content.encode()
    _check_entry_bytes(entries)


def _assert_offsets_index(text: str, offsets: list[int]) -> None:
    assert offsets == sorted(offsets)
    assert all(0 <= offset <= len(text) for offset in offsets)


@pytest.mark.parametrize("prompt", [SPLIT, "é 🫠 ok 中文 done"])
def test_echo_text_offsets_index_the_returned_text(text_server: Server, prompt: str) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": 6,
        "echo": True,
        "logprobs": 1,
        "temperature": 0,
        "ignore_eos": True,
    }
    with text_server.http() as client:
        whole = client.post("/v1/completions", json=body)
        streamed = client.post("/v1/completions", json={**body, "stream": True})
    assert whole.status_code == 200 and streamed.status_code == 200, whole.text + streamed.text
    choice = whole.json()["choices"][0]
    text, logprobs = choice["text"], choice["logprobs"]
    tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
    assert text.startswith(prompt)
    _assert_offsets_index(text, offsets)
    # The prompt's tokens sit where the text shows them; a part of a character at that character.
    prompt_tokens = len(tokens) - 6
    for token, offset in zip(tokens[:prompt_tokens], offsets, strict=False):
        assert offset < len(prompt)
        whole_chars = token.split("\ufffd")[0]  # what the token holds before a partial character
        assert text.startswith(whole_chars, offset)
        if "\ufffd" in token:
            assert ord(text[offset + len(whole_chars)]) > 0x7F
    assert offsets[prompt_tokens] == len(prompt)  # the completion starts right after the echo
    chunks = [c["choices"][0] for c in sse_chunks(streamed.text)]
    assert "".join(c["text"] for c in chunks) == text
    assert [o for c in chunks if c.get("logprobs") for o in c["logprobs"]["text_offset"]] == offsets


@pytest.fixture(scope="module")
def short_input_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    spec = tiny_spec("short-input", flags=("--max-input-tokens", str(MAX_INPUT_TOKENS)))
    logs: Path = tmp_path_factory.mktemp("short-input-logs")
    server = launch("short_input_server", spec, tmp_path_factory.mktemp("short-input-cache"), logs)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(server)


@pytest.mark.slow
def test_echo_of_a_cut_prompt_is_the_prompt_the_model_saw(short_input_server: Server) -> None:
    body = {"prompt": LONG_PROMPT, "max_tokens": 4, "echo": True, "logprobs": 1, "ignore_eos": True}
    with short_input_server.http() as client:
        whole = client.post("/v1/completions", json={**body, "temperature": 0})
        streamed = client.post("/v1/completions", json={**body, "temperature": 0, "stream": True})
        # /tokenize cuts as generation does: these are the tokens the model sees.
        kept_ids = client.post("/tokenize", json={"prompt": LONG_PROMPT}).json()["tokens"]
        kept = client.post("/detokenize", json={"tokens": kept_ids}).json()["prompt"]
        by_ids = client.post("/v1/completions", json={**body, "prompt": kept_ids * 3, "max_tokens": 0})
    assert whole.status_code == by_ids.status_code == streamed.status_code == 200, whole.text
    assert len(kept_ids) == MAX_INPUT_TOKENS
    answer = whole.json()
    assert answer["usage"]["prompt_tokens"] == MAX_INPUT_TOKENS
    assert answer["warnings"] and "MAX_INPUT_TOKENS" in whole.headers["X-Request-Warnings"]
    choice = answer["choices"][0]
    text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert len(tokens) == len(offsets) == MAX_INPUT_TOKENS + 4
    echo = "".join(tokens[:MAX_INPUT_TOKENS])
    assert echo == kept and text.startswith(echo) and not text.startswith("START")
    _assert_offsets_index(text, offsets)
    assert offsets[MAX_INPUT_TOKENS] == len(echo)
    chunks = [c["choices"][0] for c in sse_chunks(streamed.text)]
    assert chunks[0]["text"] == echo
    # A token-id prompt is cut the same way, and echoed as the ids kept.
    scored = by_ids.json()
    assert scored["usage"]["prompt_tokens"] == MAX_INPUT_TOKENS and scored["warnings"]
    assert scored["choices"][0]["text"] == kept
    assert scored["choices"][0]["logprobs"]["text_offset"] == offsets[:MAX_INPUT_TOKENS]
