"""Llama 3.x JSON tool calls (vLLM's `llama3_json`), as Llama 3.1-3.3 chat templates ask for them:

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", ...}

The answer is the calls, possibly after `<|python_tag|>`; several are separated by `;`. An answer
that starts with `{` but is no call (a JSON reply) stays content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.tool_calls.common import call_from_object, grammar_spec, openai_call_id
from app.tool_calls.trailing import CallScan, TrailingParser, find_marker, scan_json_call
from scheduler.request import GrammarSpec

PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Llama3JsonFormat:
    name: str = "llama3_json"
    layout: str = " \t\r\n;"
    markers: tuple[str, ...] = (PYTHON_TAG,)

    @staticmethod
    def call_id() -> str:
        return openai_call_id()

    def grammar(
        self, tools: list[dict[str, Any]], *, only: str | None = None, parallel: bool = True
    ) -> GrammarSpec:
        layout = {"begin": "", "end": "", "separator": "; ", "arguments_key": "parameters"}
        return grammar_spec(tools, only, parallel, **layout)

    def parser(self, *, stream_arguments: bool = False) -> TrailingParser:
        return TrailingParser(self, stream_arguments=stream_arguments)

    def find_start(self, text: str, *, at_start: bool) -> tuple[int, int, int]:
        if at_start:
            stripped = text.lstrip()
            if stripped.startswith("{"):
                return len(text) - len(stripped), 0, 0
            if not stripped:  # only whitespace so far: a call may still open the answer
                return -1, 0, len(text)
        return find_marker(text, (PYTHON_TAG,))

    def parse_calls(self, calls: str) -> list[tuple[str, str]] | None:
        found: list[tuple[str, str]] = []
        pos = 0
        while True:
            while pos < len(calls) and calls[pos].isspace():
                pos += 1
            if pos == len(calls):
                return found or None
            if found:
                if calls[pos] != ";":
                    return None
                pos += 1
                while pos < len(calls) and calls[pos].isspace():
                    pos += 1
            try:
                value, pos = _DECODER.raw_decode(calls, pos)
            except ValueError:
                return None
            call = call_from_object(value)
            if call is None:
                return None
            found.append(call)

    def scan_call(self, calls: str, pos: int) -> CallScan | None:
        return scan_json_call(calls, pos, self.layout)


LLAMA3_JSON = Llama3JsonFormat()
