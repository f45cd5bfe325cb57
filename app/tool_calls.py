"""Tool calls in generated text, Hermes / Qwen2.5 style, parsed without a tokenizer:

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A `ToolCallFormat` knows the markup. It builds the grammar that forces calls (tool_choice
"required" or a named function) and the parser that turns output text into OpenAI deltas:
`content` text, then per call a header (`id`, `name`, `arguments: ""`) and argument fragments.
Markup and the whitespace around it are never content. A block that is not a call (bad JSON, no
name) stays in the content as written.

The parser is incremental and the non-streamed answer is the same parser fed the whole text, so
both agree by construction. Arguments stream as they are generated only when a grammar forces the
calls (`stream_arguments`): then the JSON cannot turn out malformed, and the header can be trusted
as soon as it is complete. Unconstrained ("auto") calls are checked whole, at their end tag.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.schemas.chat import ChatCompletionRequest, NamedToolChoice
from scheduler.request import GrammarSpec

# The Hermes layout: `{"name": "...", "arguments": ` with the arguments value right behind it.
_HEADER = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)'
)


@dataclass(frozen=True)
class ToolCallFormat:
    open_tag: str = "<tool_call>"
    close_tag: str = "</tool_call>"

    def grammar(
        self, tools: list[dict[str, Any]], *, only: str | None = None, parallel: bool = True
    ) -> GrammarSpec:
        """One call (of `only`, when named) or, with `parallel`, one or more, laid out as the
        chat template renders them."""
        chosen = [
            {"name": f["name"], "parameters": f.get("parameters")}
            for f in (tool["function"] for tool in tools)
            if only is None or f["name"] == only
        ]
        config = {
            "begin": self.open_tag + "\n",
            "end": "\n" + self.close_tag,
            "separator": "\n",
            "tools": chosen,
            "parallel": parallel and only is None,
        }
        return GrammarSpec("tool_calls", json.dumps(config), param="tools")

    def parser(self, *, stream_arguments: bool = False) -> ToolCallParser:
        return ToolCallParser(self, stream_arguments=stream_arguments)


HERMES = ToolCallFormat()


def forces_tool_calls(req: ChatCompletionRequest) -> bool:
    return req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)


def parser_factory(req: ChatCompletionRequest) -> Callable[[], ToolCallParser] | None:
    """How this request's output is read: None for plain content (no tools offered, tool_choice
    "none", or an output constraint such as a JSON response_format, which leaves no room for calls)."""
    if not req.tools or req.tool_choice == "none":
        return None
    if req.constrains_output():
        return None
    return functools.partial(HERMES.parser, stream_arguments=forces_tool_calls(req))


@dataclass
class ToolCallDelta:
    """One OpenAI `delta.tool_calls[]` entry: the header carries id and name, fragments only
    arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def payload(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


Delta = str | ToolCallDelta  # a str is content


@dataclass
class ParsedMessage:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class ToolCallParser:
    def __init__(self, fmt: ToolCallFormat, *, stream_arguments: bool) -> None:
        self.fmt = fmt
        self.stream_arguments = stream_arguments
        self.num_calls = 0
        self._buffer = ""  # text not yet decided: a partial tag, or the body of an open call
        self._in_call = False
        self._held_ws = ""  # trailing whitespace of the content: layout if a call follows
        self._call_lead = ""  # the whitespace dropped before the open call, restored if it is no call
        self._after_call = False  # whitespace right after a call is layout too
        self._args_start: int | None = (
            None  # where the arguments begin in the buffer, once the header is sent
        )
        self._args_sent = 0

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        self._buffer += text
        while True:
            if not self._in_call:
                at = self._buffer.find(self.fmt.open_tag)
                if at < 0:
                    keep = _partial_suffix(self._buffer, self.fmt.open_tag)
                    self._text(self._buffer[: len(self._buffer) - keep], out, then="more")
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return out
                self._text(self._buffer[:at], out, then="call")
                self._buffer = self._buffer[at + len(self.fmt.open_tag) :]
                self._in_call = True
                continue
            at = self._buffer.find(self.fmt.close_tag)
            if at < 0:
                if self.stream_arguments and self._open_header(self._buffer, out):
                    # Hold back what may still turn out to be the call's closing brace or end tag.
                    raw = self._buffer[self._args_start :]
                    raw = raw[: len(raw) - _partial_suffix(raw, self.fmt.close_tag)]
                    self._send_arguments(_strip_wrapper(raw), out)
                return out
            body = self._buffer[:at]
            self._buffer = self._buffer[at + len(self.fmt.close_tag) :]
            if self.stream_arguments:
                self._open_header(body, out)
            self._close_call(body, out)

    def finish(self) -> list[Delta]:
        """The output ended: settle what was held back. A call cut short (max_tokens) stays a
        call once its header went out; otherwise its text is content."""
        out: list[Delta] = []
        if self._in_call:
            if self._args_start is not None:
                self._end_call()
            else:
                out.append(self._call_lead + self.fmt.open_tag + self._buffer)
                self._in_call = False
        else:
            self._text(self._buffer, out, then="end")
        self._buffer = ""
        return out

    # -- content -------------------------------------------------------------------------------
    def _text(self, text: str, out: list[Delta], *, then: str) -> None:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        full = self._held_ws + text
        shown = full if then == "end" else full.rstrip()
        held = full[len(shown) :]
        self._held_ws, self._call_lead = ("", held) if then == "call" else (held, "")
        if shown:
            out.append(shown)

    # -- calls ---------------------------------------------------------------------------------
    def _open_header(self, text: str, out: list[Delta]) -> bool:
        """Send the call's header once `{"name": ..., "arguments": ` is complete; True once sent."""
        if self._args_start is None:
            header = _HEADER.match(text)
            name = _json_string(header.group(1)) if header else None
            if name is None:
                return False
            out.append(ToolCallDelta(self.num_calls, id=_call_id(), name=name))
            self._args_start = header.end()
        return True

    def _close_call(self, body: str, out: list[Delta]) -> None:
        if self._args_start is not None:
            self._send_arguments(_strip_wrapper(body[self._args_start :]), out)
            self._end_call()
            return
        call = _whole_call(body)
        if call is None:
            out.append(self._call_lead + self.fmt.open_tag + body + self.fmt.close_tag)
            self._in_call = self._after_call = False
            return
        name, arguments = call
        out.append(ToolCallDelta(self.num_calls, id=_call_id(), name=name))
        if arguments:
            out.append(ToolCallDelta(self.num_calls, arguments))
        self._end_call()

    def _send_arguments(self, arguments: str, out: list[Delta]) -> None:
        if len(arguments) > self._args_sent:
            out.append(ToolCallDelta(self.num_calls, arguments[self._args_sent :]))
            self._args_sent = len(arguments)

    def _end_call(self) -> None:
        self.num_calls += 1
        self._in_call = False
        self._after_call = True
        self._args_start = None
        self._args_sent = 0


def finish_reason_for(engine_reason: str | None, num_calls: int) -> str | None:
    """OpenAI says "tool_calls" when the model stopped after calling; a cut ("length") stays."""
    return "tool_calls" if num_calls and engine_reason == "stop" else engine_reason


def parse_message(text: str, parser: ToolCallParser) -> ParsedMessage:
    """A whole completion -> content (None when only calls remain) and OpenAI `tool_calls`."""
    content = ""
    calls: list[dict[str, Any]] = []
    for delta in [*parser.feed(text), *parser.finish()]:
        if isinstance(delta, str):
            content += delta
        elif delta.id is not None:
            function = {"name": delta.name, "arguments": delta.arguments}
            calls.append({"id": delta.id, "type": "function", "function": function})
        else:
            calls[delta.index]["function"]["arguments"] += delta.arguments
    return ParsedMessage(content or None, calls)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _strip_wrapper(raw: str) -> str:
    """The arguments value from what follows the header: without the call object's closing brace
    and the layout around it. Applied to any prefix of the final text, the result is a prefix of
    the final arguments, so fragments never need taking back."""
    raw = raw.rstrip()
    if raw.endswith("}"):
        raw = raw[:-1].rstrip()
    return raw


def _whole_call(body: str) -> tuple[str, str] | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models send the arguments already encoded
        return call["name"], arguments
    return call["name"], json.dumps(arguments, ensure_ascii=False)


def _json_string(escaped: str) -> str | None:
    try:
        return json.loads(f'"{escaped}"')
    except ValueError:
        return None


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
