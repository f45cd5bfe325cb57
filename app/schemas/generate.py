"""TGI-style `/generate` wire types.

Every parameter of TGI's `GenerateParameters` is declared, so that none is dropped silently:
those this server implements act as in TGI (`return_full_text`, `frequency_penalty`, `grammar`),
the others are accepted only at a value that changes nothing (`details: false`, `best_of: 1`,
`typical_p: 1.0`, ...) and otherwise refused by `app.generate_params` with a 400 naming them (clients
such as huggingface_hub's `InferenceClient.text_generation` send several of them at their
defaults). Other unknown members of `parameters` get the policy of `app.request_fields`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from app.schemas.chat import MAX_STOP_STRINGS, Penalty, Seed, StopString, Temperature, TopP
from app.schemas.common import JSONObject
from app.schemas.structured import GrammarText


class GenerateGrammar(msgspec.Struct, forbid_unknown_fields=True):
    """TGI's `grammar`: `{"type": "json", "value": <JSON schema, or its JSON text>}` (`json_object`
    is TGI's alias of `json`), `{"type": "regex", "value": "<regex>"}`, or `{"type":
    "json_schema", "value": {"name": ..., "schema": <JSON schema>}}`."""

    type: Literal["json", "json_object", "json_schema", "regex"]
    value: JSONObject | GrammarText


class GenerateParameters(msgspec.Struct, kw_only=True):
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    min_new_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    do_sample: bool | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    frequency_penalty: Penalty | None = None
    stop: Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | StopString | None = None
    seed: Seed | None = None
    # True: `generated_text` is `inputs` followed by the generated text (TGI's semantics).
    return_full_text: bool | None = None
    grammar: GenerateGrammar | None = None
    # Accepted when at least MAX_INPUT_TOKENS (prompts are cut to that anyway); below it, refused.
    truncate: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Accepted at the values that change nothing only (null, false, 1, 0, 1.0).
    details: bool | None = None
    decoder_input_details: bool | None = None
    top_n_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    best_of: Annotated[int, msgspec.Meta(ge=1)] | None = None
    typical_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    watermark: bool | None = None
    adapter_id: str | None = None


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
