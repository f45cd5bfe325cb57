"""Formats whose calls end the answer: content, then a start marker, then only calls until the
output ends (Llama 3.x JSON, Mistral `[TOOL_CALLS]`).

A `TrailingFormat` says where the calls begin (`find_start`), how to read them whole (`parse_calls`)
and how to read one forced call from a prefix of the output (`scan_call`). `TrailingParser` does the
rest, as the Hermes parser does: content streams as it comes, holding back what may be the start
of the marker and trailing whitespace (layout, if calls follow). Unforced ("auto") calls are
checked whole when the output ends: what does not parse stays content, marker included. Forced
calls cannot turn out malformed, so their header goes out as soon as it is complete and their
arguments as they are generated; a call cut short (max_tokens) stays a call, and a next call cut
before its name was complete is left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.tool_calls.common import HEADER, Delta, ToolCallDelta, json_string, partial_suffix

_PRIMITIVE = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null")
CLOSE_BRACE = re.compile(r"\s*\}")


@dataclass(frozen=True)
class CallScan:
    """One call read from a prefix of the calls: its name, where its arguments start, how far
    they are known to extend, and (once the call is complete) where the next one may begin."""

    name: str
    args_start: int
    args_known: int
    done_at: int | None = None


class TrailingFormat(Protocol):
    layout: str  # characters between and after calls that are markup, never content
    call_id: Callable[[], str]

    def find_start(self, text: str, *, at_start: bool) -> tuple[int, int, int]:
        """(where the marker is, its length, -) or, when absent, (-1, 0, how many characters at
        the end to hold back: they may begin it). `at_start`: no content was shown yet."""
        ...

    def parse_calls(self, calls: str) -> list[tuple[str, str]] | None: ...

    def scan_call(self, calls: str, pos: int) -> CallScan | None: ...


class TrailingParser:
    def __init__(self, fmt: TrailingFormat, *, stream_arguments: bool) -> None:
        self.fmt = fmt
        self.stream_arguments = stream_arguments
        self.num_calls = 0
        self._buffer = ""  # content not yet shown: a partial marker
        self._held_ws = ""  # trailing whitespace of the content: layout if calls follow
        self._shown = False
        self._calls: str | None = None  # everything after the marker, once it was seen
        self._opening = ""  # the whitespace and marker before the calls, restored if they are none
        self._pos = 0  # where the next forced call starts in `_calls`
        self._open = False  # the header of call `num_calls` went out
        self._sent = 0  # argument characters of the open call already sent

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        if self._calls is not None:
            self._calls += text
        else:
            self._buffer += text
            at, size, keep = self.fmt.find_start(self._buffer, at_start=not self._shown)
            if at < 0:
                self._content(self._buffer[: len(self._buffer) - keep], out)
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return out
            self._content(self._buffer[:at], out)
            self._opening = self._held_ws + self._buffer[at : at + size]
            self._calls, self._buffer, self._held_ws = self._buffer[at + size :], "", ""
        if self.stream_arguments:
            self._scan(out)
        return out

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        calls = self._calls
        if calls is None:
            if self._held_ws + self._buffer:
                out.append(self._held_ws + self._buffer)
        elif self.stream_arguments:
            self._scan(out)
            if self._open:  # cut short: still a call
                self.num_calls += 1
            # else: what follows the last call is markup, or the next one cut before its name;
            # a grammar forced the calls, so the marker and all after it are markup, never content
        else:
            parsed = self.fmt.parse_calls(calls)
            if not parsed:
                out.append(self._opening + calls)
            for name, arguments in parsed or ():
                out.append(ToolCallDelta(self.num_calls, id=self.fmt.call_id(), name=name))
                if arguments:
                    out.append(ToolCallDelta(self.num_calls, arguments))
                self.num_calls += 1
        self._buffer = self._held_ws = ""
        self._calls = None
        return out

    def _content(self, text: str, out: list[Delta]) -> None:
        full = self._held_ws + text
        shown = full.rstrip()
        self._held_ws = full[len(shown) :]
        if shown:
            self._shown = True
            out.append(shown)

    def _scan(self, out: list[Delta]) -> None:
        assert self._calls is not None
        while True:
            call = self.fmt.scan_call(self._calls, self._pos)
            if call is None:
                return
            if not self._open:
                out.append(ToolCallDelta(self.num_calls, id=self.fmt.call_id(), name=call.name))
                self._open = True
            known = self._calls[call.args_start : call.args_known]
            if len(known) > self._sent:
                out.append(ToolCallDelta(self.num_calls, known[self._sent :]))
                self._sent = len(known)
            if call.done_at is None:
                return
            self.num_calls += 1
            self._open, self._sent, self._pos = False, 0, call.done_at


def find_marker(text: str, markers: tuple[str, ...]) -> tuple[int, int, int]:
    """`find_start` for literal markers: the first one in `text`, or how much to hold back."""
    hits = [(at, marker) for marker in markers if (at := text.find(marker)) >= 0]
    if hits:
        at, marker = min(hits)
        return at, len(marker), 0
    return -1, 0, max(partial_suffix(text, marker) for marker in markers)


def scan_json_call(calls: str, pos: int, skip: str) -> CallScan | None:
    """A forced `{"name": ..., "arguments": ...}` object at `pos`, after any `skip` characters."""
    while pos < len(calls) and calls[pos] in skip:
        pos += 1
    header = HEADER.match(calls, pos)
    name = json_string(header.group(1)) if header else None
    if header is None or name is None:
        return None
    known, end = value_extent(calls, header.end())
    close = CLOSE_BRACE.match(calls, end) if end is not None else None
    return CallScan(name, header.end(), known, close.end() if close else None)


def value_extent(text: str, start: int) -> tuple[int, int | None]:
    """How far the JSON value at `text[start:]` is known to extend, and where it ends once it is
    complete. Everything before a container's or string's end belongs to the value, so that much
    can be streamed; a bare number or literal is known only once something follows it."""
    if start >= len(text):
        return start, None
    if text[start] not in '{["':
        match = _PRIMITIVE.match(text, start)
        if match and match.end() < len(text):
            return match.end(), match.end()
        return start, None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if depth == 0:
                    return i + 1, i + 1
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1, i + 1
    return len(text), None
