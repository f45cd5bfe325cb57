"""Engine updates -> OpenAI responses: SSE chunks for streams, one body for the rest.

Also watches the client connection while a non-streamed request runs, so a client that goes away
frees its batch slot at the next step instead of generating for nobody.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from litestar import Request

from app.errors import engine_error_to_response
from app.tool_calls import ToolCallParser, finish_reason_for
from scheduler.errors import EngineError, GenerationError
from scheduler.request import ChoiceUpdate, RequestStream, StreamUpdate, TokenLogprob

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.encode


def sse(payload: Any) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def logprobs_payload(entries: list[TokenLogprob]) -> dict[str, Any]:
    content = []
    for entry in entries:
        tops = [
            {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            for text, (_, logprob) in zip(entry.top_tokens or [], entry.top, strict=False)
        ]
        content.append(
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": list(entry.token.encode("utf-8")),
                "top_logprobs": tops,
            }
        )
    return {"content": content, "refusal": None}


def usage_payload(stream: RequestStream) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": stream.completion_tokens,
        "total_tokens": stream.prompt_tokens + stream.completion_tokens,
    }
    if stream.num_image_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": 0, "image_tokens": stream.num_image_tokens}
    return usage


def stream_error_payload(error: EngineError) -> dict[str, Any]:
    """The OpenAI error object a failed stream ends with (before `[DONE]`)."""
    return msgspec.to_builtins(engine_error_to_response(error)[1])


def stream_failure(update: StreamUpdate) -> EngineError:
    return update.error or GenerationError("generation failed")


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Collected:
    choices: list[ChoiceResult]
    error: EngineError | None = None
    disconnected: bool = False

    @property
    def failure(self) -> EngineError | None:
        """Why the request failed, if it did (a choice can fail without a message of its own)."""
        if self.error is not None:
            return self.error
        if any(c.finish_reason == "error" for c in self.choices):
            return GenerationError("generation failed")
        return None


async def collect(request: Request, stream: RequestStream) -> Collected:
    """Gather a whole completion; cancel it if the client disconnects meanwhile."""
    result = Collected([ChoiceResult() for _ in range(stream.request.n)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_disconnect, request, stream, tg.cancel_scope, result)
        try:
            async for update in stream:
                _accumulate(result, update)
        finally:
            tg.cancel_scope.cancel()
    return result


def _accumulate(result: Collected, update: StreamUpdate) -> None:
    for choice in update.choices:
        target = result.choices[choice.index]
        target.text += choice.text
        target.token_ids.extend(choice.token_ids)
        target.logprobs.extend(choice.logprobs)
        if choice.finish_reason is not None:
            target.finish_reason = choice.finish_reason
    if update.error:
        result.error = update.error


async def _cancel_on_disconnect(
    request: Request, stream: RequestStream, scope: anyio.CancelScope, result: Collected
) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            result.disconnected = True
            stream.cancel()
            scope.cancel()
            return
        if (
            message["type"] == "http.request"
            and not message.get("more_body", False)
            and not message.get("body")
        ):
            # Body already consumed; some servers answer repeated receives at once. Poll gently.
            await anyio.sleep(0.05)


async def chat_event_stream(
    stream: RequestStream,
    *,
    base: dict[str, Any],
    include_usage: bool,
    on_done: Callable[[RequestStream, EngineError | None], None],
    tool_parser: Callable[[], ToolCallParser] | None = None,
) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events, a usage chunk when asked, then `[DONE]`. A failure after the
    stream started is sent as a final error event before `[DONE]`. With `tool_parser`, each
    choice's text goes through its own parser: content and `tool_calls` deltas."""
    error: EngineError | None = None
    parsers = [tool_parser() for _ in range(stream.request.n)] if tool_parser is not None else None
    try:
        for index in range(stream.request.n):
            yield sse(_chunk(base, index, {"role": "assistant", "content": ""}))
        async for update in stream:
            for choice in update.choices:
                if choice.finish_reason == "error":
                    # Text that arrived with the failure is still sent; the error event follows.
                    error = stream_failure(update)
                    choice.finish_reason = None
                if parsers is not None:
                    for event in _parsed_chunks(base, choice, parsers[choice.index]):
                        yield event
                    continue
                if choice.text or choice.logprobs:
                    logprobs = logprobs_payload(choice.logprobs) if choice.logprobs else None
                    yield sse(_chunk(base, choice.index, {"content": choice.text}, logprobs=logprobs))
                if choice.finish_reason is not None:
                    yield sse(_chunk(base, choice.index, {}, finish_reason=choice.finish_reason))
            if error:
                break
        if error:
            yield sse(stream_error_payload(error))
        elif include_usage:
            yield sse({**base, "choices": [], "usage": usage_payload(stream)})
        yield DONE
    finally:
        stream.cancel()  # no-op when finished; frees the slot when the client went away
        on_done(stream, error)


def _parsed_chunks(base: dict[str, Any], choice: ChoiceUpdate, parser: ToolCallParser) -> list[bytes]:
    deltas = parser.feed(choice.text) if choice.text else []
    if choice.finish_reason is not None:
        deltas += parser.finish()
    logprobs = logprobs_payload(choice.logprobs) if choice.logprobs else None
    events = []
    for delta in deltas:
        payload = {"content": delta} if isinstance(delta, str) else {"tool_calls": [delta.payload()]}
        events.append(sse(_chunk(base, choice.index, payload, logprobs=logprobs)))
        logprobs = None  # once per update, on its first chunk
    if logprobs is not None:  # the text is held back (a tag may be starting); its logprobs are not
        events.append(sse(_chunk(base, choice.index, {}, logprobs=logprobs)))
    if choice.finish_reason is not None:
        events.append(
            sse(
                _chunk(
                    base,
                    choice.index,
                    {},
                    finish_reason=finish_reason_for(choice.finish_reason, parser.num_calls),
                )
            )
        )
    return events


def _chunk(
    base: dict[str, Any],
    index: int,
    delta: dict[str, Any],
    *,
    finish_reason: str | None = None,
    logprobs: Any = None,
) -> dict[str, Any]:
    return {
        **base,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def now() -> int:
    return int(time.time())
