"""TGI-style `/generate` wire types."""

from __future__ import annotations

from typing import Annotated

import msgspec

from app.schemas.chat import MAX_STOP_STRINGS, Seed, StopString, Temperature, TopP


class GenerateParameters(msgspec.Struct, kw_only=True):
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    min_new_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    do_sample: bool | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    stop: Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | StopString | None = None
    seed: Seed | None = None


class GenerateRequest(msgspec.Struct, kw_only=True):
    inputs: Annotated[str, msgspec.Meta(min_length=1)]
    parameters: GenerateParameters = msgspec.field(default_factory=GenerateParameters)
    stream: bool = False


class GenerateResponse(msgspec.Struct):
    generated_text: str
    finish_reason: str | None = None
    generated_tokens: int | None = None
    prompt_tokens: int | None = None
    latency_seconds: float | None = None
    warnings: list[str] | None = None
