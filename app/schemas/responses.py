"""`/v1/responses` wire types, as the OpenAI Responses API defines them (stateless subset).

Request fields this server cannot honour are declared anyway, so that the translation can refuse
them by name (400 with `param`) instead of ignoring them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from app.schemas.chat import MAX_CONTENT_PARTS, MAX_TOOLS, PositiveInt, Temperature, TopP
from app.schemas.common import JSONObject

MAX_INPUT_ITEMS = 4096
MAX_METADATA_KEYS = 16


# -- request: input items ------------------------------------------------------------------------
class InputTextPart(msgspec.Struct, tag_field="type", tag="input_text"):
    text: str


class InputImagePart(msgspec.Struct, tag_field="type", tag="input_image"):
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class InputFilePart(msgspec.Struct, tag_field="type", tag="input_file"):
    file_id: str | None = None
    file_data: str | None = None
    file_url: str | None = None
    filename: str | None = None


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    """Generated text: in a response's message items, and in assistant turns a client sends back."""

    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str


InputContent = InputTextPart | InputImagePart | InputFilePart | OutputText | RefusalPart


class InputItem(msgspec.Struct, kw_only=True):
    """One `input` item, every kind in one shape: `type` says which fields matter ("message":
    role and content, the default when absent; "function_call": call_id, name, arguments;
    "function_call_output": call_id, output). Other types are refused by the translation."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | Annotated[list[InputContent], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | Annotated[list[InputContent], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] | None = None
    id: str | None = None
    status: str | None = None


# -- request: tools and formats ------------------------------------------------------------------
class FunctionTool(msgspec.Struct, kw_only=True):
    """A tool as the Responses API declares it (flat, no `function` wrapper); only `function`
    tools can run here, other types are refused by the translation."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: JSONObject | None = None
    strict: bool | None = None


class ToolChoiceObject(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None


class FormatText(msgspec.Struct, tag_field="type", tag="text"):
    pass


class FormatJsonObject(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


class FormatJsonSchema(msgspec.Struct, tag_field="type", tag="json_schema", kw_only=True):
    name: str
    schema: JSONObject
    description: str | None = None
    strict: bool | None = None


TextFormat = FormatText | FormatJsonObject | FormatJsonSchema


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(msgspec.Struct, kw_only=True):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    # OpenAI pads stream deltas with an `obfuscation` field against network side channels; this
    # server sends none, whatever the value.
    include_obfuscation: bool | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    input: str | Annotated[list[InputItem], msgspec.Meta(max_length=MAX_INPUT_ITEMS)]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: Annotated[list[FunctionTool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False  # null: false, as OpenAI's reference allows
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512 (echoed in every
    # streamed response object, an unbounded value multiplied the answer's size).
    metadata: (
        Annotated[
            dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
            msgspec.Meta(max_length=MAX_METADATA_KEYS),
        ]
        | None
    ) = None
    # "message.output_text.logprobs" returns the output text's logprobs (top_logprobs: how many
    # alternatives each); the other values name outputs this server never makes (accepted).
    include: Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    # Accepted, without effect on the output (echoed where the response has them).
    stream_options: StreamOptions | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: JSONObject | None = None  # but `prewarm: true` (no output) is refused
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Need state or abilities this server lacks: refused unless absent or neutral.
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | JSONObject | None = None
    background: bool | None = None
    prompt: JSONObject | None = None
    max_tool_calls: PositiveInt | None = None
    reasoning: ReasoningConfig | None = None

    def __post_init__(self) -> None:
        if self.stream is None:
            self.stream = False


# -- response --------------------------------------------------------------------------------------
class MessageItem(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    id: str
    status: str
    role: str = "assistant"
    content: list[OutputText] = msgspec.field(default_factory=list)


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


OutputItem = MessageItem | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class IncompleteDetails(msgspec.Struct):
    reason: str


class ResponseError(msgspec.Struct):
    code: str
    message: str


class ResponseObject(msgspec.Struct, kw_only=True):
    """The response object: the non-streamed body, and the `response` of lifecycle events."""

    id: str
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    tool_choice: str | JSONObject
    tools: list[JSONObject]
    text: JSONObject
    temperature: float
    top_p: float
    object: str = "response"
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    previous_response_id: str | None = None
    reasoning: JSONObject = msgspec.field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool = False
    background: bool = False
    truncation: str = "disabled"
    top_logprobs: int = 0
    service_tier: str = "default"
    user: str | None = None
    usage: ResponseUsage | None = None
    # What the server changed in the request (as chat's `warnings`): a max_output_tokens lowered
    # to MAX_NEW_TOKENS_DEFAULT, a prompt cut to MAX_INPUT_TOKENS. Not an OpenAI field.
    warnings: list[str] | None = None


# -- stream events (each one SSE `event:` + `data:`, see app.responses_stream) ----------------------
class LifecycleEvent(msgspec.Struct, kw_only=True):
    """response.created, response.in_progress, response.completed, response.incomplete,
    response.failed."""

    type: str
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(msgspec.Struct, kw_only=True):
    """response.output_item.added / .done."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(msgspec.Struct, kw_only=True):
    """response.content_part.added / .done."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(msgspec.Struct, tag_field="type", tag="response.output_text.delta", kw_only=True):
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class TextDoneEvent(msgspec.Struct, tag_field="type", tag="response.output_text.done", kw_only=True):
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ArgumentsDeltaEvent(
    msgspec.Struct, tag_field="type", tag="response.function_call_arguments.delta", kw_only=True
):
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(
    msgspec.Struct, tag_field="type", tag="response.function_call_arguments.done", kw_only=True
):
    sequence_number: int
    item_id: str
    output_index: int
    arguments: str
    name: str
