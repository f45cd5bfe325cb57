"""Mistral tool calls, after the `[TOOL_CALLS]` marker, in either of Mistral's layouts:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]    (up to v7)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{...}   (v11 and later)

Both are always read; forced calls are written in the layout of the model's chat template
(`args_layout` when it knows `[ARGS]`). Call ids are 9 letters and digits, the only ids Mistral's
templates accept when the calls come back in the history.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app.tool_calls.common import arguments_text, call_from_object, grammar_spec, mistral_call_id
from app.tool_calls.trailing import CallScan, TrailingParser, find_marker, scan_json_call, value_extent
from scheduler.request import GrammarSpec

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_DECODER = json.JSONDecoder()
_NAME = re.compile(r"\s*([^\s\[\]{}]+)\s*")


@dataclass(frozen=True)
class MistralFormat:
    name: str = "mistral"
    args_layout: bool = False
    layout: str = " \t\r\n,]"
    markers: tuple[str, ...] = (TOOL_CALLS, ARGS)

    @staticmethod
    def call_id() -> str:
        return mistral_call_id()

    def grammar(
        self, tools: list[dict[str, Any]], *, only: str | None = None, parallel: bool = True
    ) -> GrammarSpec:
        if self.args_layout:
            layout = {
                "layout": "name_args",
                "begin": TOOL_CALLS,
                "args_marker": ARGS,
                "end": "",
                "separator": "",
            }
        else:
            layout = {"prefix": TOOL_CALLS + "[", "suffix": "]", "begin": "", "end": "", "separator": ", "}
        return grammar_spec(tools, only, parallel, **layout)

    def parser(self, *, stream_arguments: bool = False) -> TrailingParser:
        return TrailingParser(self, stream_arguments=stream_arguments)

    def find_start(self, text: str, *, at_start: bool) -> tuple[int, int, int]:
        return find_marker(text, (TOOL_CALLS,))

    def parse_calls(self, calls: str) -> list[tuple[str, str]] | None:
        text = calls.strip()
        if text.startswith("["):
            try:
                values = json.loads(text)
            except ValueError:
                return None
            found = [call_from_object(v) for v in values] if isinstance(values, list) else [None]
            return None if not found or None in found else found  # type: ignore[return-value]
        found = []
        pos = 0
        while pos < len(text):
            at = text.find(ARGS, pos)
            name = _NAME.fullmatch(text, pos, at) if at >= 0 else None
            if name is None:
                return None
            try:  # the arguments may hold "[TOOL_CALLS]" in a string: read them as JSON
                arguments, pos = _DECODER.raw_decode(text, at + len(ARGS))
            except ValueError:
                return None
            found.append((name.group(1), arguments_text(arguments)))
            rest = text[pos:].lstrip()
            if rest and not rest.startswith(TOOL_CALLS):
                return None
            pos = len(text) - len(rest) + len(TOOL_CALLS)
        return found

    def scan_call(self, calls: str, pos: int) -> CallScan | None:
        if calls.lstrip()[:1] == "[":
            return scan_json_call(calls, pos, self.layout + "[")
        if calls.startswith(TOOL_CALLS, pos):
            pos += len(TOOL_CALLS)
        at = calls.find(ARGS, pos)
        name = _NAME.fullmatch(calls, pos, at) if at >= 0 else None
        if name is None:
            return None
        start = at + len(ARGS)
        known, end = value_extent(calls, start)
        return CallScan(name.group(1), start, known, end)


MISTRAL = MistralFormat()
MISTRAL_ARGS = MistralFormat(args_layout=True)
