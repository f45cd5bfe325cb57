"""Responses API requests -> chat completion requests, so that one translation (app.translate)
builds every engine request: the template, images, tools and grammars stay in one place.

What only the Responses API has is handled here: the `input` item list (messages, and the
function calls and their outputs a client sends back statelessly, which become assistant
`tool_calls` and `tool` messages), `instructions` (a system message first), flat tool
definitions, `text.format`, and the refusal of what a server that keeps no state cannot do.
Errors name the Responses field (`input[2].content[0].image_url`), those the chat translation
and the scheduler raise too (`ChatForm.responses_params`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

from app.errors import renamed_fields
from app.schemas.chat import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    ImageUrl,
    ImageUrlPart,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
)
from app.schemas.responses import (
    FormatJsonObject,
    FormatJsonSchema,
    InputContent,
    InputFilePart,
    InputImagePart,
    InputItem,
    InputTextPart,
    OutputText,
    RefusalPart,
    ResponsesRequest,
)
from scheduler.errors import InvalidRequestError

_STATELESS = "this server keeps no responses; send the whole conversation in `input`"
# Chat-side names of the fields whose Responses names differ.
_RENAMED = {"response_format": "text.format", "max_tokens": "max_output_tokens", "messages": "input"}
_CHAT_TOOL_FIELD = re.compile(r"^tools\[(\d+)\]\.function\.")
_MESSAGE_PARAM = re.compile(r"messages\[(\d+)\](?:\.content)?(.*)")
_MAX_TOKENS = re.compile(r"\bmax_tokens\b")

LOGPROBS = "message.output_text.logprobs"
# OpenAI's other `include` values name outputs this server never makes (built-in tool calls,
# reasoning items) or input it never returns (stored input images): accepted, nothing to add.
INCLUDE_NOTHING = frozenset(
    {
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
        "reasoning.encrypted_content",
    }
)


def wants_logprobs(req: ResponsesRequest) -> bool:
    """OpenAI returns the output text's logprobs when `include` asks for them; `top_logprobs`
    alone only says how many alternatives each would carry."""
    return bool(req.include) and LOGPROBS in req.include


def responses_text(message: str) -> str:
    """A warning or error the chat path wrote, with the Responses name of the length field."""
    return _MAX_TOKENS.sub("max_output_tokens", message)


def responses_warnings(req: ResponsesRequest, warnings: list[str]) -> list[str]:
    """The engine's warnings in Responses terms, and what the request asked that did nothing."""
    out = [responses_text(w) for w in warnings]
    if req.top_logprobs and not wants_logprobs(req):
        out.append(f'top_logprobs has no effect without include: ["{LOGPROBS}"] (no logprobs are returned)')
    return out


@dataclass
class ChatForm:
    """The chat request a Responses request amounts to, and where each of its messages came
    from (`origins[i]`: the Responses field holding message i's content)."""

    request: ChatCompletionRequest
    origins: list[str] = field(default_factory=list)

    def param(self, chat_param: str | None) -> str | None:
        if chat_param is None:
            return None
        chat_param = _CHAT_TOOL_FIELD.sub(r"tools[\1].", chat_param)  # Responses tools are flat
        match = _MESSAGE_PARAM.fullmatch(chat_param)
        if match and int(match.group(1)) < len(self.origins):
            return self.origins[int(match.group(1))] + match.group(2)
        return _RENAMED.get(chat_param, chat_param)

    def responses_params(self) -> contextlib.AbstractContextManager[None]:
        """Errors raised inside name the Responses field instead of the chat one."""
        return renamed_fields(self.param, responses_text)


def chat_form(req: ResponsesRequest) -> ChatForm:
    _refuse_unsupported(req)
    form = ChatForm(request=None)  # type: ignore[arg-type]  # filled in below
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append(ChatMessage(role="system", content=req.instructions))
        form.origins.append("instructions")
    if isinstance(req.input, str):
        messages.append(ChatMessage(role="user", content=req.input))
        form.origins.append("input")
    elif not req.input:
        raise InvalidRequestError("input must not be an empty list", param="input")
    else:
        _items(req.input, messages, form.origins)
    form.request = ChatCompletionRequest(
        messages=messages,
        model=req.model,
        temperature=req.temperature,
        top_p=req.top_p,
        max_completion_tokens=req.max_output_tokens,
        tools=_tools(req),
        tool_choice=_tool_choice(req),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=_response_format(req),
        user=req.user,
        stream=req.stream,
        logprobs=wants_logprobs(req),
        top_logprobs=(req.top_logprobs or 0) if wants_logprobs(req) else None,
    )
    return form


def _refuse_unsupported(req: ResponsesRequest) -> None:
    if req.store:
        raise InvalidRequestError(f"store: true is not supported: {_STATELESS}", param="store")
    if req.previous_response_id is not None:
        raise InvalidRequestError(
            f"previous_response_id is not supported: {_STATELESS}", param="previous_response_id"
        )
    if req.conversation is not None:
        raise InvalidRequestError(f"conversation is not supported: {_STATELESS}", param="conversation")
    if req.background:
        raise InvalidRequestError(f"background: true is not supported: {_STATELESS}", param="background")
    if req.prompt is not None:
        raise InvalidRequestError("stored prompt templates are not supported; send input", param="prompt")
    if req.max_tool_calls is not None:
        raise InvalidRequestError("max_tool_calls is not supported by this server", param="max_tool_calls")
    reasoning = req.reasoning
    if reasoning is not None and (
        reasoning.effort not in (None, "none") or reasoning.summary or reasoning.generate_summary
    ):
        raise InvalidRequestError("reasoning options are not supported by this server", param="reasoning")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise InvalidRequestError(
            "text.verbosity other than 'medium' is not supported", param="text.verbosity"
        )
    for i, value in enumerate(req.include or ()):
        if value != LOGPROBS and value not in INCLUDE_NOTHING:
            raise InvalidRequestError(
                f"include value '{value[:64]}' is not known: OpenAI's are "
                + ", ".join(sorted({LOGPROBS, *INCLUDE_NOTHING})),
                param=f"include[{i}]",
            )
    cache = req.prompt_cache_options
    if cache is not None and cache.get("prewarm") is True:
        raise InvalidRequestError(
            "prompt_cache_options.prewarm: true (fill the cache without generating) is not supported: "
            "the prefix cache fills itself as requests are served",
            param="prompt_cache_options.prewarm",
        )


def _items(items: list[InputItem], messages: list[ChatMessage], origins: list[str]) -> None:
    call_names: dict[str, str] = {}
    # The assistant message function calls join while they follow it directly.
    open_turn: ChatMessage | None = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if item.type == "message":
            if item.role is None:
                raise InvalidRequestError("a message item needs a role", param=f"{where}.role")
            if item.content is None:
                raise InvalidRequestError("a message item needs content", param=f"{where}.content")
            message = ChatMessage(
                role=item.role, content=_content(item.content, item.role, f"{where}.content")
            )
            messages.append(message)
            origins.append(f"{where}.content")
            open_turn = message if item.role == "assistant" else None
        elif item.type == "function_call":
            for name in ("call_id", "name", "arguments"):
                if getattr(item, name) is None:
                    raise InvalidRequestError(f"a function_call item needs {name}", param=f"{where}.{name}")
            call_names[item.call_id] = item.name
            call = ToolCall(function=FunctionCall(name=item.name, arguments=item.arguments), id=item.call_id)
            if open_turn is None:
                open_turn = ChatMessage(role="assistant", tool_calls=[])
                messages.append(open_turn)
                origins.append(f"{where}.content")
            open_turn.tool_calls = [*(open_turn.tool_calls or []), call]
        elif item.type == "function_call_output":
            if item.call_id is None:
                raise InvalidRequestError(
                    "a function_call_output item needs call_id", param=f"{where}.call_id"
                )
            if item.output is None:
                raise InvalidRequestError("a function_call_output item needs output", param=f"{where}.output")
            # An empty list of parts is a function that returned nothing: its result is empty text.
            content = _content(item.output, "tool", f"{where}.output") or ""
            name = item.name or call_names.get(item.call_id)
            messages.append(ChatMessage(role="tool", content=content, tool_call_id=item.call_id, name=name))
            origins.append(f"{where}.output")
            open_turn = None
        else:
            raise InvalidRequestError(
                f"input items of type '{item.type[:64]}' are not supported: send message, function_call "
                "and function_call_output items",
                param=f"{where}.type",
            )


def _content(content: str | list[InputContent], role: str, where: str) -> str | list[ContentPart]:
    if isinstance(content, str):
        return content
    parts: list[ContentPart] = []
    for j, part in enumerate(content):
        if isinstance(part, InputTextPart | OutputText):
            parts.append(TextPart(part.text))
        elif isinstance(part, RefusalPart):
            parts.append(TextPart(part.refusal))
        elif isinstance(part, InputImagePart):
            if part.image_url is None:
                raise InvalidRequestError(
                    "input_image needs image_url (a URL or a data URL); file_id needs the Files API, "
                    "which this server does not have",
                    param=f"{where}[{j}].image_url",
                )
            detail = part.detail if part.detail in ("auto", "low", "high") else None
            parts.append(ImageUrlPart(ImageUrl(url=part.image_url, detail=detail)))
        elif isinstance(part, InputFilePart):
            raise InvalidRequestError(
                "input_file parts are not supported by this server", param=f"{where}[{j}]"
            )
    if role == "assistant" and all(isinstance(p, TextPart) for p in parts):
        # Chat templates expect an assistant turn as a string.
        return "".join(p.text for p in parts if isinstance(p, TextPart))
    return parts


def _tools(req: ResponsesRequest) -> list[Tool] | None:
    if req.tools is None:
        return None
    tools = []
    for i, tool in enumerate(req.tools):
        if tool.type != "function":
            raise InvalidRequestError(
                f"tools of type '{tool.type[:64]}' are not supported: only function tools",
                param=f"tools[{i}].type",
            )
        if not tool.name:
            raise InvalidRequestError("a function tool needs a name", param=f"tools[{i}].name")
        definition = FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
        )
        tools.append(Tool(function=definition))
    return tools


def _tool_choice(req: ResponsesRequest) -> str | NamedToolChoice | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.type != "function":
        raise InvalidRequestError(
            f"tool_choice of type '{choice.type[:64]}' is not supported: 'none', 'auto', 'required' "
            'or {"type": "function", "name": ...}',
            param="tool_choice",
        )
    if not choice.name:
        raise InvalidRequestError("tool_choice of type 'function' needs a name", param="tool_choice.name")
    return NamedToolChoice(function=NamedFunction(name=choice.name))


def _response_format(req: ResponsesRequest) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, FormatJsonObject):
        return ResponseFormat(type="json_object")
    if isinstance(fmt, FormatJsonSchema):
        schema = JsonSchemaFormat(
            name=fmt.name, schema=fmt.schema, description=fmt.description, strict=fmt.strict
        )
        return ResponseFormat(type="json_schema", json_schema=schema)
    return None
