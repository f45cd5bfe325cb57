"""OpenAI chat messages -> what chat templates receive: roles as templates name them, content
parts as template parts (images as `{"type": "image"}` placeholders, their URLs set aside to fetch),
replayed calls, refusals and reasoning where templates read them."""

from __future__ import annotations

from typing import Any

import msgspec

from app.schemas.chat import ChatMessage, ImageUrlPart, RefusalPart, TextPart, ToolCall
from scheduler.errors import InvalidRequestError

# OpenAI's `detail: "low"`: the model gets a 512 px version of the image (longest side here, aspect
# kept), fewer image tokens on models whose processors take any size.
LOW_DETAIL_SIDE = 512
_ROLE_ALIASES = {"developer": "system", "function": "tool"}
# Roles whose content OpenAI requires (an assistant turn may carry only calls or a refusal, and a
# legacy `function` result may be null).
_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})


def chat_messages(
    messages: list[ChatMessage],
) -> tuple[list[dict[str, Any]], list[str], list[str], list[int | None]]:
    """OpenAI messages -> template-ready dicts; image parts become `{"type": "image"}` placeholders
    and their URLs are returned in order, with the request field each came from and the longest
    side its `detail` allows (None: the server's MAX_IMAGE_SIZE)."""
    converted: list[dict[str, Any]] = []
    urls: list[str] = []
    params: list[str] = []
    max_sides: list[int | None] = []  # per image: `detail: "low"` caps its longest side
    legacy_id: str | None = None  # the last legacy function_call's id, for its `function` result
    for i, message in enumerate(messages):
        item: dict[str, Any] = {"role": _ROLE_ALIASES.get(message.role, message.role)}
        content = message.content
        if message.role in _CONTENT_REQUIRED and not (content or isinstance(content, str)):
            # As OpenAI answers them: the template rendered an empty turn in their place.
            missing = "an empty array" if isinstance(content, list) else "missing or null"
            raise InvalidRequestError(
                f"content is required for a {message.role} message ({missing}); send a string "
                "(it may be empty) or a list of content parts",
                param=f"messages[{i}].content",
            )
        if isinstance(content, list):
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, RefusalPart) and message.role == "assistant":
                    # What the assistant said, as OpenAI's answers carry it; the template reads text.
                    parts.append({"type": "text", "text": part.refusal})
                elif isinstance(part, ImageUrlPart):
                    urls.append(part.image_url.url)
                    params.append(f"messages[{i}].content[{j}].image_url")
                    max_sides.append(LOW_DETAIL_SIDE if part.image_url.detail == "low" else None)
                    parts.append({"type": "image"})
                else:
                    kind = part.__struct_config__.tag  # the `type` the client sent
                    raise InvalidRequestError(
                        f"content parts of type '{kind}' are not supported by this server "
                        "(text and image_url are)",
                        param=f"messages[{i}].content[{j}]",
                    )
            item["content"] = parts
        elif not content and message.role == "assistant" and message.refusal:
            item["content"] = message.refusal  # a replayed refusal: what the assistant said
        else:
            item["content"] = content if content is not None else ""
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            item["tool_calls"] = [msgspec.to_builtins(c) for c in message.tool_calls]
        elif message.function_call is not None and message.role == "assistant":
            # The functions API has no call ids; templates that pair calls with results by id
            # (Mistral's: 9 letters and digits) get one, and the `function` result after it too.
            legacy_id = f"fn{i:07d}"
            item["tool_calls"] = [msgspec.to_builtins(ToolCall(function=message.function_call, id=legacy_id))]
        if message.role == "function" and message.tool_call_id is None and legacy_id is not None:
            item["tool_call_id"] = legacy_id
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        reasoning = message.reasoning_content if message.reasoning_content is not None else message.reasoning
        if reasoning is not None:
            item["reasoning_content"] = reasoning
        converted.append(item)
    return converted, urls, params, max_sides
