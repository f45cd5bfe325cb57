"""Tool calls in generated text, Hermes / Qwen2.5 style, parsed without a tokenizer:

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Calls may sit anywhere in the text, between pieces of content. Markup and the whitespace around
it are never content. A block that is not a call (bad JSON, no
name) stays in the content as written.

The parser is incremental and the non-streamed answer is the same parser fed the whole text, so
both agree by construction. Arguments stream as they are generated only when a grammar forces the
calls (`stream_arguments`): then the JSON cannot turn out malformed, and the header can be trusted
as soon as it is complete. Unconstrained ("auto") calls are checked whole, at their end tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.tool_calls.common import (
    HEADER,
    Delta,
    ToolCallDelta,
    call_from_object,
    grammar_spec,
    json_string,
    openai_call_id,
    partial_suffix,
)
from scheduler.request import GrammarSpec


@dataclass(frozen=True)
class HermesFormat:
    name: str = "hermes"
    open_tag: str = "<tool_call>"
    close_tag: str = "</tool_call>"

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.open_tag, self.close_tag)

    def grammar(
        self, tools: list[dict[str, Any]], *, only: str | None = None, parallel: bool = True
    ) -> GrammarSpec:
        """One call (of `only`, when named) or, with `parallel`, one or more, laid out as the
        chat template renders them."""
        layout = {"begin": self.open_tag + "\n", "end": "\n" + self.close_tag, "separator": "\n"}
        return grammar_spec(tools, only, parallel, **layout)

    def parser(self, *, stream_arguments: bool = False) -> HermesParser:
        return HermesParser(self, stream_arguments=stream_arguments)


HERMES = HermesFormat()


class HermesParser:
    def __init__(self, fmt: HermesFormat, *, stream_arguments: bool) -> None:
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
                    keep = partial_suffix(self._buffer, self.fmt.open_tag)
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
                    raw = raw[: len(raw) - partial_suffix(raw, self.fmt.close_tag)]
                    self._send_arguments(_strip_wrapper(raw), out)
                return out
            body = self._buffer[:at]
            self._buffer = self._buffer[at + len(self.fmt.close_tag) :]
            if self.stream_arguments:
                self._open_header(body, out)
            self._close_call(body, out)

    def finish(self) -> list[Delta]:
        """The output ended: settle what was held back. A call cut short (max_tokens, a stop
        string) stays a call once its header went out. Cut before that, its text is content, unless
        a grammar forced the calls: then everything generated is their markup, and a call without
        its name yet is nothing a client could use."""
        out: list[Delta] = []
        if self._in_call and self._args_start is not None:
            self._end_call()
        elif self.stream_arguments:
            self._in_call = False
        elif self._in_call and (call := _whole_call(self._buffer)) is not None:
            # A whole call whose end tag never came (the model stopped first): a call, as vLLM's
            # Hermes parser takes it too.
            name, arguments = call
            out.append(ToolCallDelta(self.num_calls, id=openai_call_id(), name=name))
            if arguments:
                out.append(ToolCallDelta(self.num_calls, arguments))
            self._end_call()
        elif self._in_call:
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
            header = HEADER.match(text)
            name = json_string(header.group(1)) if header else None
            if name is None:
                return False
            out.append(ToolCallDelta(self.num_calls, id=openai_call_id(), name=name))
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
        out.append(ToolCallDelta(self.num_calls, id=openai_call_id(), name=name))
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
        return call_from_object(json.loads(body))
    except ValueError:
        return None
