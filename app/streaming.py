"""Engine updates -> OpenAI responses: SSE chunks for streams, one body for the rest.

Also watches the client connection while a non-streamed request runs, so a client that goes away
frees its batch slot at the next step instead of generating for nobody.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import msgspec
from litestar import Request
from litestar.response import Stream

from app.errors import engine_error_to_response, status_of
from app.schemas.chat import ChatChunkChoice, ChatCompletionChunk, ChoiceDelta
from app.schemas.common import ChoiceLogprobs, PromptTokensDetails, TokenLogprobEntry, TopLogprob, Usage
from app.tool_calls import ToolCallParser, finish_reason_for
from scheduler.errors import EngineError, GenerationError
from scheduler.request import RequestStream, StreamUpdate, TokenLogprob

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
_encode = msgspec.json.encode


def sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def sse_response(events: AsyncIterator[bytes], headers: dict[str, str] | None) -> Stream:
    return Stream(events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})


def end_of_stream(error: EngineError | None, usage_chunk: msgspec.Struct | None) -> bytes:
    """How every stream ends: the error object when it failed after starting, otherwise the
    usage chunk when the client asked for one; then `[DONE]`."""
    if error is not None:
        return sse(engine_error_to_response(error)[1]) + DONE
    if usage_chunk is not None:
        return sse(usage_chunk) + DONE
    return DONE


def choice_logprobs(entries: list[TokenLogprob]) -> ChoiceLogprobs:
    """Chat's logprobs object (the chat endpoint's shape; completions have their own). `bytes` are
    each token's own, which join into the content's UTF-8 even where a token holds part of a
    character (its `token` is then U+FFFD)."""
    content = []
    for entry in entries:
        names = entry.top_tokens or []
        raw = entry.top_token_bytes if entry.top_token_bytes is not None else [n.encode() for n in names]
        own = entry.token_bytes if entry.token_bytes is not None else entry.token.encode()
        content.append(
            TokenLogprobEntry(
                token=entry.token,
                logprob=entry.logprob,
                bytes=list(own),
                top_logprobs=[
                    TopLogprob(token=text, logprob=logprob, bytes=list(data))
                    for text, data, (_, logprob) in zip(names, raw, entry.top, strict=False)
                ],
            )
        )
    return ChoiceLogprobs(content=content)


def usage_of(streams: Sequence[RequestStream]) -> Usage:
    """Token counts of one request (several streams: the prompts of one completions request)."""
    prompt = sum(s.prompt_tokens for s in streams)
    completion = sum(s.completion_tokens for s in streams)
    image_tokens = sum(s.num_image_tokens for s in streams)
    cached = sum(s.cached_tokens for s in streams)
    details = PromptTokensDetails(cached_tokens=cached, image_tokens=image_tokens)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        # Always there, as OpenAI sends it (`cached_tokens: 0` when the prefix cache held nothing).
        prompt_tokens_details=details,
    )


def with_usage_so_far(
    chunk: Callable[..., msgspec.Struct], streams: Sequence[RequestStream]
) -> Callable[..., msgspec.Struct]:
    """vLLM's `stream_options.continuous_usage_stats` (with `include_usage`): every chunk carries
    the usage so far, counted when the chunk is made, so it covers the tokens the chunk holds."""

    def with_usage(choices):
        made = chunk(choices)
        made.usage = usage_of(streams)
        return made

    return with_usage


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


async def collect_answer(request: Request, stream: RequestStream, tracker) -> Collected:
    """`collect`, with the outcome recorded on the route's `RequestTracker`: a failure is
    recorded and raised (the handlers turn it into its OpenAI error), a disconnect is a 499."""
    collected = await collect(request, stream)
    if (failure := collected.failure) is not None:
        tracker.finish(status_of(failure), stream, failure.message)
        raise failure
    tracker.finish(499 if collected.disconnected else 200, stream)
    return collected


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
    chunk: Callable[[list[ChatChunkChoice]], ChatCompletionChunk],
    include_usage: bool,
    on_done: Callable[[RequestStream, EngineError | None], None],
    tool_parser: Callable[[], ToolCallParser] | None = None,
    calls_only: bool = False,
) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` events (`chunk` fills in the request's id, model and time), then
    `end_of_stream`. With `tool_parser`, each choice's text goes through its own parser: content
    and `tool_calls` deltas. With `calls_only` (a forced tool call: no text can come) the first
    chunk says so with no content, as OpenAI's do, not an empty string.

    Each engine update becomes one write, however many events it holds (the choices of n > 1, a
    last token with its finish, usage and `[DONE]`): every write costs a send on the event loop, a
    socket write and a read in the client, per stream and per step."""
    error: EngineError | None = None
    parsers = [tool_parser() for _ in range(stream.request.n)] if tool_parser is not None else None

    def event(index: int, delta: ChoiceDelta, logprobs=None, finish_reason=None) -> bytes:
        return sse(chunk([ChatChunkChoice(index, delta, logprobs, finish_reason)]))

    try:
        opening = ChoiceDelta(role="assistant", content=None if calls_only else "")
        yield b"".join(event(index, opening) for index in range(stream.request.n))
        last: list[bytes] = []
        async for update in stream:
            events, error = _chat_events(update, parsers, event)
            if error or stream.exhausted:
                last = events  # sent with the end of the stream
                break
            if events:  # text a tool-call parser holds back makes none
                yield b"".join(events)
        usage = chunk([]) if include_usage and not error else None
        if usage is not None:
            usage.usage = usage_of([stream])
        yield b"".join([*last, end_of_stream(error, usage)])
    finally:
        stream.cancel()  # no-op when finished; frees the slot when the client went away
        on_done(stream, error)


def _chat_events(
    update: StreamUpdate, parsers: list[ToolCallParser] | None, event: Callable[..., bytes]
) -> tuple[list[bytes], EngineError | None]:
    """The events of one update, and the failure it reports if it does."""
    events: list[bytes] = []
    error: EngineError | None = None
    for choice in update.choices:
        finish_reason = choice.finish_reason
        if finish_reason == "error":
            # Text that arrived with the failure is still sent; the error event follows.
            error, finish_reason = stream_failure(update), None
        logprobs = choice_logprobs(choice.logprobs) if choice.logprobs else None
        if parsers is not None:
            parser = parsers[choice.index]
            deltas = parser.feed(choice.text) if choice.text else []
            if finish_reason is not None:
                deltas += parser.finish()
                finish_reason = finish_reason_for(finish_reason, parser.num_calls)
            for delta in deltas:
                if isinstance(delta, str):
                    events.append(event(choice.index, ChoiceDelta(content=delta), logprobs))
                else:
                    events.append(event(choice.index, ChoiceDelta(tool_calls=[delta.payload()]), logprobs))
                logprobs = None  # once per update, on its first chunk
            if logprobs is not None:  # text held back (a tag may be starting); not its logprobs
                events.append(event(choice.index, ChoiceDelta(), logprobs))
        elif choice.text or logprobs is not None:
            events.append(event(choice.index, ChoiceDelta(content=choice.text), logprobs))
        if finish_reason is not None:
            events.append(event(choice.index, ChoiceDelta(), finish_reason=finish_reason))
    return events, error


def now() -> int:
    return int(time.time())
