"""`/v1/apply_template` wire types."""

from __future__ import annotations

from typing import Annotated

import msgspec

from app.schemas.chat import MAX_MESSAGES, MAX_TOOLS, ChatMessage, TemplateKwargs, Tool


class ApplyTemplateRequest(msgspec.Struct, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: TemplateKwargs | None = None
    model: str | None = None


class ApplyTemplateResponse(msgspec.Struct):
    prompt: str
