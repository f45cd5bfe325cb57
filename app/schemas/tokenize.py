"""`/tokenize` and `/detokenize` wire types, shaped like vLLM's."""

from __future__ import annotations

from typing import Annotated

import msgspec

from app.schemas.chat import MAX_MESSAGES, MAX_TOOLS, ChatMessage, TemplateKwargs, Tool


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """Either `prompt` (raw text) or `messages` (rendered with the chat template), not both."""

    prompt: str | None = None
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)] | None = None
    model: str | None = None
    # null: true for `prompt`, false for `messages` (the template already wrote them).
    add_special_tokens: bool | None = None
    # For `prompt`: true tokenizes special-token spellings as plain text. Chat `messages` always
    # have their content tokenized as text (a client cannot type a control token into a turn).
    split_special_tokens: bool = False
    add_generation_prompt: bool = True
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    chat_template_kwargs: TemplateKwargs | None = None


class TokenizeResponse(msgspec.Struct):
    tokens: list[int]
    count: int
    max_model_len: int | None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str
