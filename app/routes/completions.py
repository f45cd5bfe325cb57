"""POST /v1/completions (OpenAI's legacy text completions).

Each prompt of a batch is its own engine request with the same parameters; choice `i` of prompt
`p` is reported as index `p * n + i`. Echo prepends the prompt text; prompt-token logprobs are not
computed by the engine, so with `echo` the logprobs cover the generated tokens only (their
`text_offset`s still index into the returned text, prompt included).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from functools import partial

from litestar import Request, Response, post

from app.errors import status_of
from app.routes import protected
from app.schemas.completions import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from app.services import SYSTEM_FINGERPRINT, Services, begin, warning_headers
from app.streaming import collect, end_of_stream, now, sse, sse_response, stream_failure, usage_of
from scheduler.errors import EngineError
from scheduler.request import EngineRequest, RequestStream, TokenLogprob


@protected(
    post,
    "/v1/completions",
    summary="Create a text completion (raw prompt, no chat template; streaming or not)",
)
async def completions(request: Request, data: CompletionRequest) -> Response:
    call = await begin(request, CompletionRequest, endpoint="completions", id_prefix="cmpl")
    data, svc, tracker = call.data, call.svc, call.tracker
    with tracker.failures():
        scheduler = svc.require_scheduler()
        engine_requests = svc.translator.completion(data, call.request_id)
        streams = await _submit_all(scheduler, engine_requests)
        try:
            echoes = [await _prompt_text(scheduler, r) if data.echo else "" for r in engine_requests]
        except BaseException:
            _cancel(streams)
            raise
    model = svc.settings.model_name
    warnings = [w for s in streams for w in s.warnings]
    headers = warning_headers(warnings)
    want_logprobs = data.logprobs is not None
    recorded = False

    def record(status: int, error: EngineError | None = None) -> None:
        # The tracker takes one stream (latency, TTFT, the log line); the other prompts' tokens
        # go to the counters here so that they stay exact.
        nonlocal recorded
        if not recorded:
            recorded = True
            tracker.finish(status, streams[0], error.message if error else None)
            _count_tokens(svc, streams[1:])

    def on_done(error: EngineError | None) -> None:
        # `cancelled` is set when the client left before the end (499, as for chat).
        record(status_of(error) if error else 499 if any(s.cancelled for s in streams) else 200, error)

    if data.stream:
        chunk = partial(CompletionChunk, call.request_id, now(), model, system_fingerprint=SYSTEM_FINGERPRINT)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        events = _event_stream(
            streams,
            echoes,
            chunk=chunk,
            n=data.n,
            want_logprobs=want_logprobs,
            include_usage=include_usage,
            on_done=on_done,
        )
        return sse_response(events, headers)

    choices: list[CompletionChoice] = []
    try:
        for p, (stream, echo) in enumerate(zip(streams, echoes, strict=True)):
            collected = await collect(request, stream)
            if collected.disconnected:
                record(499)
                break  # nobody reads the answer any more
            if (failure := collected.failure) is not None:
                on_done(failure)
                raise failure
            for i, choice in enumerate(collected.choices):
                logprobs = _logprobs(choice.logprobs, len(echo))[0] if want_logprobs else None
                text = echo + choice.text
                choices.append(CompletionChoice(p * data.n + i, text, logprobs, choice.finish_reason))
    finally:
        _cancel(streams)  # the other prompts' rows when this one failed or the client left
    on_done(None)
    body = CompletionResponse(
        id=call.request_id,
        created=int(streams[0].created),
        model=model,
        choices=choices,
        usage=usage_of(streams),
        system_fingerprint=SYSTEM_FINGERPRINT,
        latency_seconds=round(time.monotonic() - tracker.started, 4),
        warnings=warnings or None,
    )
    return Response(body, headers=headers)


async def _submit_all(scheduler, engine_requests: list[EngineRequest]) -> list[RequestStream]:
    """All or nothing: when a later prompt is refused, the ones already admitted are cancelled."""
    scheduler.check_room(sum(r.n for r in engine_requests))  # all of them, or none
    streams: list[RequestStream] = []
    try:
        for engine_request in engine_requests:
            streams.append(await scheduler.submit(engine_request))
    except BaseException:
        _cancel(streams)
        raise
    return streams


async def _prompt_text(scheduler, engine_request: EngineRequest) -> str:
    prompt = engine_request.prompt
    if prompt.token_ids is not None:
        return await scheduler.detokenize(list(prompt.token_ids))
    return prompt.text or ""


def _cancel(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.cancel()  # no-op for a finished stream


def _count_tokens(svc: Services, streams: list[RequestStream]) -> None:
    for stream in streams:
        svc.metrics.prompt_tokens.inc(stream.prompt_tokens)
        svc.metrics.completion_tokens.inc(stream.completion_tokens)


def _logprobs(entries: list[TokenLogprob], offset: int) -> tuple[CompletionLogprobs, int]:
    """OpenAI's completions logprobs; `offset` is where the first token's text starts in the
    choice's text. Returns the offset after the last token, for the next stream chunk."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry in entries:
        top = {text: logprob for text, (_, logprob) in zip(entry.top_tokens or [], entry.top, strict=False)}
        top.setdefault(entry.token, entry.logprob)  # OpenAI always includes the sampled token
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(tokens, token_logprobs, top_logprobs, text_offset), offset


async def _event_stream(
    streams: list[RequestStream],
    echoes: list[str],
    *,
    chunk: Callable[[list[CompletionChoice]], CompletionChunk],
    n: int,
    want_logprobs: bool,
    include_usage: bool,
    on_done: Callable[[EngineError | None], None],
) -> AsyncIterator[bytes]:
    """`text_completion` chunks, then `end_of_stream`. Prompts are read one after another: all of
    them generate at once in the engine, and later ones' text waits, coalesced, until read."""
    error: EngineError | None = None

    def event(index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None) -> bytes:
        return sse(chunk([CompletionChoice(index, text, logprobs, finish_reason)]))

    try:
        for p, (stream, echo) in enumerate(zip(streams, echoes, strict=True)):
            offsets = [len(echo)] * n
            if echo:
                empty = _logprobs([], 0)[0] if want_logprobs else None
                for i in range(n):
                    yield event(p * n + i, echo, empty, None)
            async for update in stream:
                for choice in update.choices:
                    finish_reason = choice.finish_reason
                    if finish_reason == "error":
                        # Text that arrived with the failure is still sent; the error event follows.
                        error, finish_reason = stream_failure(update), None
                    if not (choice.text or choice.logprobs or finish_reason):
                        continue
                    logprobs = None
                    if want_logprobs:
                        logprobs, offsets[choice.index] = _logprobs(choice.logprobs, offsets[choice.index])
                    yield event(p * n + choice.index, choice.text, logprobs, finish_reason)
                if error:
                    break
            if error:
                break
        usage = chunk([]) if include_usage and not error else None
        if usage is not None:
            usage.usage = usage_of(streams)
        yield end_of_stream(error, usage)
    finally:
        _cancel(streams)  # frees the slots when the client went away
        on_done(error)
