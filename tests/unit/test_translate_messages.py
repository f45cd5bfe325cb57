"""OpenAI messages -> what the chat template receives."""

from __future__ import annotations

import re

import msgspec

from app.chat_messages import chat_messages as _messages
from app.schemas.chat import ChatMessage


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


def test_a_legacy_function_call_reaches_the_template_as_a_tool_call():
    """The functions API's assistant `function_call` used to be dropped (an empty assistant turn)
    while the `function` result that answers it was kept."""
    user, call, result = _convert(
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_w", "arguments": '{"c": 1}'}},
        {"role": "function", "name": "get_w", "content": "RESULT"},
    )
    assert call["role"] == "assistant" and call["content"] == ""
    [tool_call] = call["tool_calls"]
    assert tool_call["type"] == "function"
    assert tool_call["function"] == {"name": "get_w", "arguments": '{"c": 1}'}
    # An id of 9 letters and digits (Mistral's templates refuse any other), and its result paired.
    assert re.fullmatch(r"[A-Za-z0-9]{9}", tool_call["id"])
    assert result == {"role": "tool", "name": "get_w", "content": "RESULT", "tool_call_id": tool_call["id"]}


def test_low_detail_caps_an_images_side_and_other_details_do_not():
    """`detail` used to be validated and then dropped: "low" now reaches the prompt builder as a
    512-pixel cap on the image's longest side (OpenAI's low-resolution version)."""
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    message = {
        "role": "user",
        "content": [
            {**part, "image_url": {**part["image_url"], "detail": "low"}},
            {**part, "image_url": {**part["image_url"], "detail": "high"}},
            part,
        ],
    }
    converted, urls, params, max_sides = _messages([msgspec.convert(message, ChatMessage)])
    assert len(urls) == 3 and params[0] == "messages[0].content[0].image_url"
    assert max_sides == [512, None, None]
