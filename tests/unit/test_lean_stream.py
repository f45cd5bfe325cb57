"""bench.lean_stream reads a stream's bytes without parsing each event: what it still parses."""

from __future__ import annotations

import json

from bench.lean_stream import _has_content, _last_events


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def test_only_a_non_empty_content_delta_counts_as_the_first_token():
    role = event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    token = event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    assert not _has_content(role)
    assert _has_content(role + token)


def test_usage_and_the_finish_reason_come_from_the_last_events_even_cut_at_the_front():
    stream = (
        event({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]})
        + event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        + event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        + b"data: [DONE]\n\n"
    )
    usage, finish = _last_events(stream[10:])  # the tail kept starts mid-event
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2} and finish == "length"
