"""Wire types shared by several endpoints (OpenAI shapes)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    image_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = None


class PromptLogprob(msgspec.Struct):
    """One token of vLLM's `prompt_logprobs` entries (token id -> this)."""

    logprob: float
    rank: int | None
    decoded_token: str | None


# vLLM's `prompt_logprobs`: one entry per prompt token, the first null (nothing predicts it).
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=False):
    # null as the default (false), as the SDKs' optional fields send it.
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


JSONObject = dict[str, Any]
