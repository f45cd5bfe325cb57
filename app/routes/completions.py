"""POST /v1/completions (OpenAI's legacy text completions).

Each prompt of a batch is its own engine request with the same parameters; choice `i` of prompt
`p` is reported as index `p * n + i`. Echo prepends the prompt text; with `logprobs` too, the
engine computes the prompt tokens' logprobs during prefill and they come before the generated
tokens' (the first prompt token's null). `text_offset`s index into the returned text
(`app.prompt_logprobs.TextOffsets`). A prompt cut to MAX_INPUT_TOKENS is echoed as the tokens kept,
which its logprobs and usage count. Streamed, the echo is the first event of each choice and
carries the prompt's logprobs (it waits for the prefill). vLLM's `prompt_logprobs` is a field of
each choice (not with stream, as in vLLM).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from functools import partial

import anyio.lowlevel
from litestar import Request, Response, post

from app.errors import status_of
from app.prompt_logprobs import TextOffsets, echo_logprobs, joined, vllm_prompt_logprobs
from app.routes import protected
from app.schemas.completions import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from app.services import SYSTEM_FINGERPRINT, Services, begin, warning_headers
from app.streaming import (
    collect,
    end_of_stream,
    now,
    sse,
    sse_response,
    stream_failure,
    usage_of,
    with_usage_so_far,
)
from scheduler.errors import EngineError
from scheduler.request import EngineRequest, RequestStream, StreamUpdate, TokenLogprob


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
        engine_requests[0] = call.warned(engine_requests[0])  # the request's warnings are said once
        streams = await scheduler.submit_all(engine_requests)  # all of them, or none
        try:
            echoes = [
                await _prompt_text(scheduler, r, s) if data.echo else ""
                for r, s in zip(engine_requests, streams, strict=True)
            ]
        except BaseException:
            _cancel(streams)
            raise
    model = svc.settings.model_name
    warnings = _warnings_by_prompt(streams)
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
            _count_other_prompts(svc, streams[1:], tracker.started)

    def on_done(error: EngineError | None) -> None:
        # `cancelled` is set when the client left before the end (499, as for chat).
        record(status_of(error) if error else 499 if any(s.cancelled for s in streams) else 200, error)

    if data.stream:
        chunk = partial(CompletionChunk, call.request_id, now(), model, system_fingerprint=SYSTEM_FINGERPRINT)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        if include_usage and data.stream_options.continuous_usage_stats:
            chunk = with_usage_so_far(chunk, streams)
        elif include_usage:
            chunk = partial(chunk, usage=None)
        events = _event_stream(
            streams,
            echoes,
            chunk=chunk,
            n=data.n,
            want_logprobs=want_logprobs,
            top=data.logprobs or 0,
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
            prompt_logprobs = None
            if data.prompt_logprobs is not None:
                prompt_logprobs = vllm_prompt_logprobs(stream.prompt_logprobs, data.prompt_logprobs)
            for i, choice in enumerate(collected.choices):
                text = echo + choice.text
                logprobs = None
                if want_logprobs:
                    logprobs = _logprobs(choice.logprobs, TextOffsets(choice.text, base=len(echo)))
                if logprobs is not None and data.echo:
                    logprobs = joined(echo_logprobs(stream.prompt_logprobs, data.logprobs, echo), logprobs)
                choices.append(
                    CompletionChoice(p * data.n + i, text, logprobs, choice.finish_reason, prompt_logprobs)
                )
            # A prompt's logprobs can be a few MB of objects (4,000 echoed tokens, 20 alternatives
            # each: about 40 ms to build): other requests' events go out between prompts, not
            # after all 64 of them.
            await anyio.lowlevel.checkpoint()
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


async def _prompt_text(scheduler, engine_request: EngineRequest, stream: RequestStream) -> str:
    """The prompt the model saw: one cut to MAX_INPUT_TOKENS is echoed from the tokens kept."""
    prompt = engine_request.prompt
    if stream.kept_prompt_ids is not None:
        return await scheduler.detokenize(stream.kept_prompt_ids)
    if prompt.token_ids is not None:
        return await scheduler.detokenize(list(prompt.token_ids))
    return prompt.text or ""


def _cancel(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.cancel()  # no-op for a finished stream


def _count_other_prompts(svc: Services, streams: list[RequestStream], started: float) -> None:
    """The prompts after the first: their tokens in the server's counters, and each a request of
    its own in vLLM's series, as vLLM counts a multi-prompt completion (only the first was)."""
    for stream in streams:
        svc.metrics.prompt_tokens.inc(stream.prompt_tokens)
        svc.metrics.completion_tokens.inc(stream.completion_tokens)
        svc.metrics.vllm.observe(stream, started, time.monotonic())


def _logprobs(
    entries: list[TokenLogprob], offsets: TextOffsets, placed: list[int] | None = None
) -> CompletionLogprobs:
    """OpenAI's completions logprobs; `offsets` places the tokens in the choice's text, unless
    `placed` has their offsets already (a stream's, `TextOffsets.place_settled`)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for position, entry in enumerate(entries):
        top: dict[str, float] = {}
        for text, (_, logprob) in zip(entry.top_tokens or [], entry.top, strict=False):
            # Tokens that decode alike (byte pieces as "\ufffd") share a key: the most likely
            # one keeps it (a later, less likely one overwrote it, out of order).
            top.setdefault(text, logprob)
        top.setdefault(entry.token, entry.logprob)  # OpenAI always includes the sampled token
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        top_logprobs.append(top)
        text_offset.append(placed[position] if placed is not None else offsets.place(entry))
    return CompletionLogprobs(tokens, token_logprobs, top_logprobs, text_offset)


async def _until_first_token(updates: AsyncIterator[StreamUpdate]) -> list[StreamUpdate]:
    """The updates up to the one with the first token (or an end): the prefill is then done."""
    early: list[StreamUpdate] = []
    while (update := await anext(updates, None)) is not None:
        early.append(update)
        if update.error or any(c.token_ids or c.finish_reason for c in update.choices):
            break
    return early


async def _chained(
    early: list[StreamUpdate], rest: AsyncIterator[StreamUpdate]
) -> AsyncIterator[StreamUpdate]:
    for update in early:
        yield update
    async for update in rest:
        yield update


async def _event_stream(
    streams: list[RequestStream],
    echoes: list[str],
    *,
    chunk: Callable[[list[CompletionChoice]], CompletionChunk],
    n: int,
    want_logprobs: bool,
    top: int,
    include_usage: bool,
    on_done: Callable[[EngineError | None], None],
) -> AsyncIterator[bytes]:
    """`text_completion` chunks, then `end_of_stream`. Prompts are read one after another: all of
    them generate at once in the engine, and later ones' text waits, coalesced, until read. Each
    engine update is one write, as in chat (`app.streaming.chat_event_stream`)."""
    error: EngineError | None = None

    def event(index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None) -> bytes:
        return sse(chunk([CompletionChoice(index, text, logprobs, finish_reason)]))

    try:
        last: list[bytes] = []
        for p, (stream, echo) in enumerate(zip(streams, echoes, strict=True)):
            offsets = [TextOffsets(base=len(echo)) for _ in range(n)]
            pending: list[list[TokenLogprob]] = [[] for _ in range(n)]  # not placed yet
            updates = aiter(stream)
            # The prompt's logprobs are all known once the prefill is done: with the first token.
            # A chunked prefill hands them over chunk by chunk, and the echo built from the first
            # update had only the first chunk's (a 200-token prompt streamed 129 of them).
            early = await _until_first_token(updates) if echo and want_logprobs else []
            if echo:
                prompt = echo_logprobs(stream.prompt_logprobs, top, echo) if want_logprobs else None
                yield b"".join(event(p * n + i, echo, prompt, None) for i in range(n))
            ended: set[int] = set()  # choices whose end this loop has sent
            async for update in _chained(early, updates):
                events = []
                for choice in update.choices:
                    finish_reason = choice.finish_reason
                    if finish_reason is not None:
                        ended.add(choice.index)
                    if finish_reason == "error":
                        # Text that arrived with the failure is still sent; the error event follows.
                        error, finish_reason = stream_failure(update), None
                    if not (choice.text or choice.logprobs or finish_reason):
                        continue
                    logprobs = None
                    if want_logprobs:
                        placer = offsets[choice.index]
                        placer.extend(choice.text)
                        pending[choice.index].extend(choice.logprobs)
                        ready, placed = placer.place_settled(
                            pending[choice.index], final=finish_reason is not None or error is not None
                        )
                        logprobs = _logprobs(ready, placer, placed)
                    events.append(event(p * n + choice.index, choice.text, logprobs, finish_reason))
                # The updates read, not the stream's state, say where the end is: the whole answer
                # can arrive while the echo goes out, and a stream already finished then stopped
                # at the first of the updates held back for it (the answer was lost).
                if error or (p == len(streams) - 1 and len(ended) == n):
                    last = events  # sent with the end of the stream
                    break
                if events:
                    yield b"".join(events)
            if error:
                break
        usage = chunk([]) if include_usage and not error else None
        if usage is not None:
            usage.usage = usage_of(streams)
        yield b"".join([*last, end_of_stream(error, usage)])
    finally:
        _cancel(streams)  # frees the slots when the client went away
        on_done(error)


def _warnings_by_prompt(streams: list[RequestStream]) -> list[str]:
    """The request's warnings once, then each prompt's own (its truncation, a lowered max_tokens)
    named by its index when there are several: "the first 12 were dropped" said which prompt
    only by its place among the warnings."""
    said = list(streams[0].request.warnings)
    owns = [stream.warnings[len(stream.request.warnings) :] for stream in streams]
    if len(owns) == 1:
        return said + owns[0]
    # What every prompt was told alike (a max_tokens lowered to the cap) is said once.
    common = [w for w in owns[0] if all(w in own for own in owns[1:])]
    said += common
    for i, own in enumerate(owns):
        said += [f"prompt[{i}]: {w}" for w in own if w not in common]
    return said
