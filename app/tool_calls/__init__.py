"""Tool calls in generated text, in the format of the model's chat template, parsed without a
tokenizer.

A format (`hermes`, `llama3_json`, `mistral`) knows its markup. It builds the grammar that forces
calls (tool_choice "required" or a named function) and the parser that turns output text into
OpenAI deltas: `content` text, then per call a header (`id`, `name`, `arguments: ""`) and argument
fragments. The non-streamed answer is the same parser fed the whole text, so both agree by
construction.

Which format a server speaks is TOOL_CALL_PARSER (vLLM's `--tool-call-parser` names), or with
`auto` what the chat template shows (`select_format`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from app.schemas.chat import ChatCompletionRequest, NamedToolChoice
from app.tool_calls.common import (
    Delta,
    ParsedMessage,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallParser,
    finish_reason_for,
    parse_message,
)
from app.tool_calls.hermes import HERMES
from app.tool_calls.llama3 import LLAMA3_JSON, PYTHON_TAG
from app.tool_calls.mistral import ARGS, MISTRAL, MISTRAL_ARGS, TOOL_CALLS

__all__ = [
    "FORMATS",
    "HERMES",
    "Delta",
    "ParsedMessage",
    "ToolCallDelta",
    "ToolCallFormat",
    "ToolCallParser",
    "finish_reason_for",
    "forces_tool_calls",
    "parse_message",
    "parser_factory",
    "select_format",
]

FORMATS: dict[str, ToolCallFormat] = {"hermes": HERMES, "llama3_json": LLAMA3_JSON, "mistral": MISTRAL}
# What a chat template shows of its tool-call format, checked in this order.
_SIGNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mistral", (TOOL_CALLS, "[AVAILABLE_TOOLS]")),
    ("hermes", ("<tool_call>",)),
    ("llama3_json", (PYTHON_TAG, "Environment: ipython", '"parameters": dictionary of argument name')),
)


def select_format(setting: str, chat_template: str | None) -> tuple[ToolCallFormat, str]:
    """The format for TOOL_CALL_PARSER `setting` ("auto" or a name in FORMATS) and the model's
    chat template, with why it was chosen (for the startup log and /health)."""
    template = chat_template or ""
    name, why = setting, "TOOL_CALL_PARSER"
    if setting == "auto":
        found = [name for name, signs in _SIGNS if any(sign in template for sign in signs)]
        name, why = (
            (found[0], "from the chat template")
            if found
            else ("hermes", "the default: no known format in the chat template")
        )
    if name == "mistral" and ARGS in template:
        return MISTRAL_ARGS, f"{why}, [ARGS] layout"
    return FORMATS[name], why


def forces_tool_calls(req: ChatCompletionRequest) -> bool:
    return req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)


def parser_factory(
    req: ChatCompletionRequest, fmt: ToolCallFormat = HERMES
) -> Callable[[], ToolCallParser] | None:
    """How this request's output is read: None for plain content (no tools offered, tool_choice
    "none", or an output constraint such as a JSON response_format or a guided_* field, which
    leaves no room for calls)."""
    if not req.tools or req.tool_choice == "none":
        return None
    if req.constrains_output():
        return None
    return functools.partial(fmt.parser, stream_arguments=forces_tool_calls(req))
