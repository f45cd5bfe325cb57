"""`/v1/chat/completions` wire types, as the OpenAI API defines them (plus peers' extensions)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from app.schemas.common import ChoiceLogprobs, JSONObject, PromptLogprobs, StreamOptions, Usage

# response_format's types are re-exported: chat requests are where clients know them from.
from app.schemas.structured import JsonSchemaFormat as JsonSchemaFormat
from app.schemas.structured import ResponseFormat as ResponseFormat
from app.schemas.structured import StructuredFields

Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
# Bounds on what a client may ask the engine to check every step or compile (OpenAI: 4 stop
# sequences, 300 logit_bias entries, 128 tools).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128
# Bounds on what one body may hold in number of objects (each one becomes Python objects, more
# than once: a 64 MiB body of 1.9 million one-word messages took 2 GiB and 27 s of the event
# loop). Well above what a conversation sends; OpenAI's own cap on messages is lower.
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 1024
MAX_TEMPLATE_KWARGS = 256
TemplateKwargs = Annotated[dict[str, Any], msgspec.Meta(max_length=MAX_TEMPLATE_KWARGS)]
StopString = Annotated[str, msgspec.Meta(max_length=MAX_STOP_STRING_CHARS)]
# 0 would keep no token at all (vLLM rejects it too); greedy decoding is temperature 0.
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
# A torch.Generator seed is a 64-bit integer; anything wider is a client error, not a failed generation.
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class ImageUrl(msgspec.Struct):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImageUrlPart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: ImageUrl


class InputAudioPart(msgspec.Struct, tag_field="type", tag="input_audio"):
    input_audio: JSONObject


class FilePart(msgspec.Struct, tag_field="type", tag="file"):
    file: JSONObject


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str


ContentPart = TextPart | ImageUrlPart | InputAudioPart | FilePart | RefusalPart


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str = ""


class ToolCall(msgspec.Struct):
    function: FunctionCall
    id: str | None = None
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    # The legacy functions API's single call on an assistant turn (its result comes back in a
    # `function` message): it reaches the template as a tool call.
    function_call: FunctionCall | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    # An earlier answer's reasoning sent back (vLLM's `reasoning_content`, or `reasoning`): reaches
    # the template as `reasoning_content`, which reasoning models' templates render (Qwen3: in
    # <think> for the turns after the last user message).
    reasoning_content: str | None = None
    reasoning: str | None = None


# Tools reach the chat template as the client sent them (`tojson` in Qwen's and Llama 3's, a loop
# over keys in Mistral's), as transformers renders them: fields left out stay out (no nulls), and
# `type` comes before `function`, as OpenAI's clients write them.
class FunctionDefinition(msgspec.Struct, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: JSONObject | None = None
    # Accepted; forced calls (tool_choice required or named) always follow `parameters` by
    # constrained decoding, strict or not.
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class SamplingFields(StructuredFields, kw_only=True):
    """Fields chat and completions requests share: OpenAI's, then those peers accept beyond
    OpenAI's (vLLM, SGLang, TGI); the output constraints come from `StructuredFields`."""

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    # OpenAI's reference marks these nullable: null is the default, as the field left out.
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]],
            msgspec.Meta(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = None
    user: str | None = None

    top_k: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    stop_token_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool = True
    # vLLM: logprobs of the prompt's tokens with this many alternatives (at most 20, as vLLM's default).
    prompt_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None

    def __post_init__(self) -> None:
        if self.n is None:
            self.n = 1
        if self.stream is None:
            self.stream = False


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = False  # null: false, as OpenAI's reference allows
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    # Passed to the chat template as `reasoning_effort` (gpt-oss's and other reasoning models'
    # templates read it; a template that does not ignores it, as vLLM does).
    # The openai SDK's values ("none" is GPT-5.1's default; "xhigh" and "max" came later).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    add_generation_prompt: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logprobs is None:
            self.logprobs = False


class AssistantMessage(msgspec.Struct):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[Any] | None = None
    refusal: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None
    latency_seconds: float | None = None
    warnings: list[str] | None = msgspec.field(default=None)
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when the request asked


class ChoiceDelta(msgspec.Struct, omit_defaults=True):
    """What a stream chunk adds to a choice; absent fields are left out, as OpenAI does."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[Any] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(
    msgspec.Struct, omit_defaults=True, tag_field="object", tag="chat.completion.chunk"
):
    """One `data:` event of a streamed chat completion (`usage` on the final usage chunk, or on
    every chunk with `continuous_usage_stats`; `object` is the tag, always written)."""

    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    # Left out unless asked for; with `include_usage`, null on every chunk but the last, as
    # OpenAI sends it (the SDK's documentation says so; clients test `usage === null`).
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET
