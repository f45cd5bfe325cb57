"""`/v1/apply_template` wire types."""

from __future__ import annotations

from typing import Annotated

import msgspec

from app.schemas.chat import ChatMessage, Tool
from app.schemas.common import JSONObject


class ApplyTemplateRequest(msgspec.Struct, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: JSONObject | None = None
    model: str | None = None


class ApplyTemplateResponse(msgspec.Struct):
    prompt: str
