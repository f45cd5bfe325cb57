"""Engine updates -> Responses API output: the items, the final response object, and the SSE
events of a streamed response.

`OutputBuilder` turns generated text (through the tool-call parser when tools are offered) into
output items: a `message` with one `output_text` part for content, a `function_call` item per
call. It records the stream events each step makes; a non-streamed response is the same builder
fed the whole text with its events dropped, so both answers agree by construction (what
`responses.stream()` accumulates equals what `responses.create` returns).

Logprobs (`include: ["message.output_text.logprobs"]`) follow the text they were generated with:
an `output_text.delta` carries the logprobs of the tokens it holds, and of earlier tokens whose
text was held back (a tool-call tag may have been starting); tokens with no text of their own (a
stop token) go out on an empty delta before the part closes; the tokens that wrote a function
call have none (function_call items have no logprobs), nor those closing its tag before text
goes on. With a tool-call parser, text is fed token
by token, so that where each token's logprob lands does not depend on how the engine's updates
were cut (stream and create agree).

Events, each SSE `event: <type>` + `data: <json>` with a `sequence_number` from 0:
response.created, response.in_progress; per item output_item.added, then for a message
content_part.added, output_text.delta..., output_text.done, content_part.done, for a call
function_call_arguments.delta..., function_call_arguments.done; output_item.done; finally
response.completed, response.incomplete (max_output_tokens reached) or response.failed. No
`[DONE]`: OpenAI ends a Responses stream with its last event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from app.errors import engine_error_to_response
from app.schemas.common import TokenLogprobEntry
from app.schemas.responses import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    LifecycleEvent,
    MessageItem,
    OutputItemEvent,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
)
from app.streaming import choice_logprobs, stream_failure
from app.tool_calls import Delta, ToolCallDelta, ToolCallParser
from scheduler.errors import EngineError
from scheduler.request import RequestStream, TokenLogprob

_encode = msgspec.json.encode


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    def __init__(self) -> None:
        self.output: list[MessageItem | FunctionCallItem] = []
        self._events: list[tuple[str, msgspec.Struct]] = []
        self._sequence = 0
        self._message: MessageItem | None = None  # open items: at most one of the two
        self._call: FunctionCallItem | None = None
        self._logprobs: list[TokenLogprob] = []  # of tokens whose text has not been emitted yet
        self._fed = 0  # how many of them the current feed brought

    # -- events --------------------------------------------------------------------------------
    def _next(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def _emit(self, kind: str, event: msgspec.Struct) -> None:
        self._events.append((kind, event))

    def lifecycle(self, kind: str, response: ResponseObject) -> bytes:
        self._emit(kind, LifecycleEvent(type=kind, sequence_number=self._next(), response=response))
        return self.drain()

    def drain(self) -> bytes:
        """The SSE bytes of the events recorded since the last drain."""
        data = b"".join(
            b"event: " + kind.encode() + b"\ndata: " + _encode(event) + b"\n\n"
            for kind, event in self._events
        )
        self._events.clear()
        return data

    # -- output --------------------------------------------------------------------------------
    def feed(self, deltas: list[Delta], logprobs: Sequence[TokenLogprob] = ()) -> None:
        """Output deltas, and the logprobs of the tokens they came from (when asked for)."""
        self._logprobs.extend(logprobs)
        self._fed = len(logprobs)
        for delta in deltas:
            if isinstance(delta, str):
                self._text(delta)
            else:
                self._call_delta(delta)

    def finish(self, status: str) -> None:
        """Close what is open with `status`; an answer with no item at all is one empty message."""
        if not self.output:
            self._open_message()
        if self._message is not None and self._logprobs:
            self._text("", force=True)  # tokens without text of their own (a stop token)
        self._logprobs, self._fed = [], 0
        self._close(status)

    def _take_logprobs(self) -> list[TokenLogprobEntry]:
        if not self._logprobs:
            return []
        entries = choice_logprobs(self._logprobs).content or []
        self._logprobs, self._fed = [], 0
        return entries

    def _text(self, text: str, force: bool = False) -> None:
        if not text and not force:
            return
        if self._message is None:
            if self._call is not None:
                # Text after a call: the tokens before this feed closed the call's tag.
                del self._logprobs[: len(self._logprobs) - self._fed]
            self._close("completed")
            self._open_message()
        message = self._message
        part = message.content[0]
        part.text += text
        logprobs = self._take_logprobs()
        part.logprobs.extend(logprobs)
        index = len(self.output) - 1
        self._emit(
            "response.output_text.delta",
            TextDeltaEvent(
                sequence_number=self._next(),
                item_id=message.id,
                output_index=index,
                content_index=0,
                delta=text,
                logprobs=logprobs,
            ),
        )

    def _call_delta(self, delta: ToolCallDelta) -> None:
        self._logprobs, self._fed = [], 0  # the tokens that wrote the call (a tag held back included)
        if delta.id is not None:  # a new call's header
            self._close("completed")
            self._call = FunctionCallItem(
                id=_item_id("fc"), call_id=delta.id, name=delta.name or "", arguments="", status="in_progress"
            )
            self.output.append(self._call)
            added = msgspec.structs.replace(self._call)
            self._emit(
                "response.output_item.added",
                OutputItemEvent(
                    type="response.output_item.added",
                    sequence_number=self._next(),
                    output_index=len(self.output) - 1,
                    item=added,
                ),
            )
        if delta.arguments and self._call is not None:
            self._call.arguments += delta.arguments
            self._emit(
                "response.function_call_arguments.delta",
                ArgumentsDeltaEvent(
                    sequence_number=self._next(),
                    item_id=self._call.id,
                    output_index=len(self.output) - 1,
                    delta=delta.arguments,
                ),
            )

    def _open_message(self) -> None:
        self._message = MessageItem(id=_item_id("msg"), status="in_progress", content=[])
        self.output.append(self._message)
        index = len(self.output) - 1
        added = MessageItem(id=self._message.id, status="in_progress", content=[])
        self._emit(
            "response.output_item.added",
            OutputItemEvent(
                type="response.output_item.added",
                sequence_number=self._next(),
                output_index=index,
                item=added,
            ),
        )
        self._message.content.append(OutputText(text=""))
        self._emit(
            "response.content_part.added",
            ContentPartEvent(
                type="response.content_part.added",
                sequence_number=self._next(),
                item_id=self._message.id,
                output_index=index,
                content_index=0,
                part=OutputText(text=""),
            ),
        )

    def _close(self, status: str) -> None:
        index = len(self.output) - 1
        if self._message is not None:
            message, self._message = self._message, None
            text, logprobs = message.content[0].text, message.content[0].logprobs
            common = {"item_id": message.id, "output_index": index, "content_index": 0}
            self._emit(
                "response.output_text.done",
                TextDoneEvent(sequence_number=self._next(), text=text, logprobs=list(logprobs), **common),
            )
            self._emit(
                "response.content_part.done",
                ContentPartEvent(
                    type="response.content_part.done",
                    sequence_number=self._next(),
                    part=OutputText(text=text, logprobs=list(logprobs)),
                    **common,
                ),
            )
            message.status = status
            self._item_done(index, message)
        elif self._call is not None:
            call, self._call = self._call, None
            self._emit(
                "response.function_call_arguments.done",
                ArgumentsDoneEvent(
                    sequence_number=self._next(),
                    item_id=call.id,
                    output_index=index,
                    arguments=call.arguments,
                    name=call.name,
                ),
            )
            call.status = status
            self._item_done(index, call)

    def _item_done(self, index: int, item: MessageItem | FunctionCallItem) -> None:
        self._emit(
            "response.output_item.done",
            OutputItemEvent(
                type="response.output_item.done", sequence_number=self._next(), output_index=index, item=item
            ),
        )


def final_response(
    initial: ResponseObject,
    builder: OutputBuilder,
    stream: RequestStream,
    finish_reason: str | None,
    error: EngineError | None,
) -> ResponseObject:
    """The response object once generation ended: its items closed, status, usage."""
    fields: dict[str, Any] = {}
    if error is not None:
        http_status, body, _ = engine_error_to_response(error)
        status, item_status = "failed", "incomplete"
        # OpenAI's codes here name the failure's kind: every engine failure is "server_error",
        # the request's own (a grammar that fails mid-way) "invalid_prompt", the nearest on its list.
        code = "server_error" if http_status >= 500 else "invalid_prompt"
        fields["error"] = ResponseError(code=code, message=body.error.message)
    elif finish_reason == "length":
        status = item_status = "incomplete"
        fields["incomplete_details"] = IncompleteDetails(reason="max_output_tokens")
    else:
        status, item_status = "completed", "completed"
        fields["completed_at"] = int(time.time())
    builder.finish(item_status)
    usage = ResponseUsage(
        input_tokens=stream.prompt_tokens,
        output_tokens=stream.completion_tokens,
        total_tokens=stream.prompt_tokens + stream.completion_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=stream.cached_tokens),
    )
    return msgspec.structs.replace(initial, status=status, output=list(builder.output), usage=usage, **fields)


def feed_choice(
    builder: OutputBuilder,
    parser: ToolCallParser | None,
    text: str,
    finished: bool,
    logprobs: list[TokenLogprob] | None = None,
) -> None:
    """Generated text (and its tokens' logprobs, when asked for) -> the builder, through the
    tool-call parser when there is one."""
    if parser is None:
        builder.feed([text], logprobs or ())
        return
    for piece, entries in token_pieces(text, logprobs or []):
        builder.feed(parser.feed(piece) if piece else [], entries)
    if finished:
        builder.feed(parser.finish())


def token_pieces(text: str, logprobs: list[TokenLogprob]) -> list[tuple[str, list[TokenLogprob]]]:
    """`text` cut at its tokens' boundaries, each piece with its token's logprob, so that the
    parser sees the same pieces whether the text came in one update or many. A token whose own
    text is not where the text goes on (part of a character held back, text a stop string cut)
    ends the cutting: the rest goes as one piece with the remaining logprobs. Tokens past the end
    of the text (a stop token) get empty pieces. Only the pieces are cut: the logprobs keep their
    tokens' own text."""
    if not logprobs:
        return [(text, [])] if text else []
    pieces: list[tuple[str, list[TokenLogprob]]] = []
    at = 0
    for i, entry in enumerate(logprobs):
        token = entry.token
        if at == 0 and token.startswith(" ") and not text.startswith(token):
            token = token[1:]  # SentencePiece: the answer's first "▁" is no space in its text
        if token and text.startswith(token, at):
            pieces.append((token, [entry]))
            at += len(token)
        elif at == len(text):
            pieces.append(("", [entry]))
        else:
            pieces.append((text[at:], list(logprobs[i:])))
            return pieces
    if at < len(text):
        pieces.append((text[at:], []))
    return pieces


async def response_event_stream(
    stream: RequestStream,
    *,
    initial: ResponseObject,
    tool_parser: Callable[[], ToolCallParser] | None,
    on_done: Callable[[RequestStream, EngineError | None], None],
) -> AsyncIterator[bytes]:
    builder = OutputBuilder()
    parser = tool_parser() if tool_parser is not None else None
    error: EngineError | None = None
    finish_reason: str | None = None
    try:
        yield builder.lifecycle("response.created", initial)
        yield builder.lifecycle("response.in_progress", initial)
        async for update in stream:
            for choice in update.choices:
                reason = choice.finish_reason
                if reason == "error":
                    # Text that arrived with the failure is still sent; response.failed follows.
                    error = stream_failure(update)
                    reason = None
                feed_choice(
                    builder, parser, choice.text, reason is not None or error is not None, choice.logprobs
                )
                finish_reason = reason or finish_reason
            if error is None and update.error is not None:
                error = update.error
            yield builder.drain()
            if error:
                break
        final = final_response(initial, builder, stream, finish_reason, error)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            final.status, "response.failed"
        )
        yield builder.lifecycle(kind, final)
    finally:
        stream.cancel()  # no-op when finished; frees the slot when the client went away
        on_done(stream, error)
