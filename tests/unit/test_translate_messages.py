"""OpenAI messages -> what the chat template receives."""

from __future__ import annotations

import msgspec

from app.schemas.chat import ChatMessage
from app.translate import _messages


def _convert(*messages: dict) -> list[dict]:
    return _messages([msgspec.convert(m, ChatMessage) for m in messages])[0]


def test_reasoning_sent_back_reaches_the_template_as_reasoning_content():
    """Qwen3's template renders an assistant turn's `reasoning_content` in <think> after the last
    user message; vLLM's clients send it back under that name, newer ones as `reasoning`."""
    converted = _convert(
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "I need the weather tool."},
        {"role": "assistant", "content": "Warm.", "reasoning": "Check the forecast."},
    )
    assert converted[1] == {
        "role": "assistant",
        "content": "Sunny.",
        "reasoning_content": "I need the weather tool.",
    }
    assert converted[2]["reasoning_content"] == "Check the forecast."
    assert "reasoning_content" not in converted[0]
