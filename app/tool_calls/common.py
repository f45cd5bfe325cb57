"""What every tool-call format shares: the OpenAI deltas a parser produces, the whole-message
assembly, and the small text helpers the parsers are built from."""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.strict_schema import closed_objects
from scheduler.request import GrammarSpec

# `{"name": "...", "arguments": ` (or "parameters") with the arguments value right behind it: where a
# forced call's header is complete and its arguments can start streaming.
HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')
_ALNUM = string.ascii_letters + string.digits


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


class ToolCallParser(Protocol):
    """Output text in, OpenAI deltas out; `finish` settles what was held back at the end."""

    num_calls: int

    def feed(self, text: str) -> list[Delta]: ...

    def finish(self) -> list[Delta]: ...


class ToolCallFormat(Protocol):
    """One chat format's tool-call markup: the grammar that forces calls in it (tool_choice
    "required" or named) and the parser that reads them back."""

    name: str
    # The format's tags; kept in the text for the parser where the vocabulary marks them special.
    markers: tuple[str, ...]

    def grammar(
        self, tools: list[dict[str, Any]], *, only: str | None = None, parallel: bool = True
    ) -> GrammarSpec: ...

    def parser(self, *, stream_arguments: bool = False) -> ToolCallParser: ...


@dataclass
class ParsedMessage:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


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


def finish_reason_for(engine_reason: str | None, num_calls: int) -> str | None:
    """OpenAI says "tool_calls" when the model stopped after calling; a cut ("length") stays."""
    return "tool_calls" if num_calls and engine_reason == "stop" else engine_reason


def grammar_spec(tools: list[dict[str, Any]], only: str | None, parallel: bool, **layout: Any) -> GrammarSpec:
    """The `tool_calls` grammar (models.grammar.tool_calls_lark) for the chosen tools in `layout`."""
    chosen = [
        # `index`: where the tool is in the request, for an error that names its parameters.
        {
            "name": f["name"],
            "parameters": closed_objects(f.get("parameters")) if f.get("strict") else f.get("parameters"),
            "index": i,
        }
        for i, f in enumerate(tool["function"] for tool in tools)
        if only is None or f["name"] == only
    ]
    config = {**layout, "tools": chosen, "parallel": parallel and only is None}
    return GrammarSpec("tool_calls", json.dumps(config), param="tools")


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def json_string(escaped: str) -> str | None:
    try:
        return json.loads(f'"{escaped}"')
    except ValueError:
        return None


def call_from_object(call: Any) -> tuple[str, str] | None:
    """`{"name": ..., "arguments" | "parameters": ...}` -> (name, arguments as JSON text)."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return call["name"], arguments_text(call.get("arguments", call.get("parameters", {})))


def arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):  # some models send the arguments already encoded
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def openai_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def mistral_call_id() -> str:
    # Mistral's chat templates refuse any tool call id that is not 9 letters and digits, and
    # clients send the ids back in the next turn's history.
    return "".join(secrets.choice(_ALNUM) for _ in range(9))
