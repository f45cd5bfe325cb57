"""`/v1/completions` wire types: OpenAI's legacy text completions (plus peers' extensions)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, UnsetType

from app.schemas.chat import PositiveInt, SamplingFields
from app.schemas.common import NonNegativeInt, PromptLogprobs, Usage

# A string, a list of strings, a list of token ids or a list of such lists. msgspec allows one
# array type per union, so the element union is checked for consistency in translate.
PromptElement = str | int | list[int]


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[PromptElement]
    # Absent: OpenAI's default for this endpoint (16), as a default (lowered to the room left, not
    # warned about); null: the server's; 0 (with echo): score the prompt only.
    max_tokens: NonNegativeInt | None | UnsetType = UNSET
    best_of: PositiveInt | None = None
    # OpenAI allows 0..5; vLLM (and this server) up to 20.
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    echo: bool | None = False  # null: false, as OpenAI's reference allows
    suffix: str | None = None
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.echo is None:
            self.echo = False


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, omit_defaults=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when the request asked


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    object: str = "text_completion"
    system_fingerprint: str | None = None
    latency_seconds: float | None = None
    warnings: list[str] | None = None


class CompletionChunk(msgspec.Struct, omit_defaults=True, tag_field="object", tag="text_completion"):
    """One `data:` event of a streamed completion (`usage` on the final usage chunk, or on every
    chunk with `continuous_usage_stats`; `object` is the tag, always written)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    # Left out unless asked for; with `include_usage`, null on every chunk but the last, as
    # OpenAI sends it (the SDK's documentation says so; clients test `usage === null`).
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET
