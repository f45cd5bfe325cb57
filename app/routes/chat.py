"""POST /v1/chat/completions."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import partial

from litestar import Request, Response, post

from app.errors import ENGINE_LENGTH_FIELD, renamed_fields, status_of
from app.prompt_logprobs import vllm_prompt_logprobs
from app.routes import protected
from app.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from app.services import SYSTEM_FINGERPRINT, begin, warning_headers
from app.streaming import (
    ChoiceResult,
    chat_event_stream,
    choice_logprobs,
    collect_answer,
    now,
    sse_response,
    usage_of,
    with_usage_so_far,
)
from app.tool_calls import ToolCallParser, finish_reason_for, forces_tool_calls, parse_message, parser_factory


@protected(
    post, "/v1/chat/completions", summary="Create a chat completion (text and image+text, streaming or not)"
)
async def chat_completions(request: Request, data: ChatCompletionRequest) -> Response:
    call = await begin(request, ChatCompletionRequest, endpoint="chat", id_prefix="chatcmpl")
    data, svc, tracker = call.data, call.svc, call.tracker
    with tracker.failures(), _length_field_named(data):
        scheduler = svc.require_scheduler()
        tool_format = svc.tool_format()
        engine_request = await svc.translator.chat(data, call.request_id, tool_format)
        stream = await scheduler.submit(call.warned(engine_request))
    if data.max_completion_tokens is not None:
        stream.warnings = call.renamed_warnings(stream.warnings, _completion_length)
    model = svc.settings.model_name
    headers = warning_headers(stream.warnings)
    tool_parser = parser_factory(data, tool_format)

    if data.stream:
        chunk = partial(
            ChatCompletionChunk, call.request_id, now(), model, system_fingerprint=SYSTEM_FINGERPRINT
        )

        def on_done(finished_stream, error):
            # `cancelled` is set when the client left before the end (as 499 for non-streamed requests).
            status = status_of(error) if error else 499 if finished_stream.cancelled else 200
            tracker.finish(status, finished_stream, error.message if error else None)

        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        if include_usage and data.stream_options.continuous_usage_stats:
            chunk = with_usage_so_far(chunk, [stream])
        elif include_usage:
            chunk = partial(chunk, usage=None)
        events = chat_event_stream(
            stream,
            chunk=chunk,
            include_usage=include_usage,
            on_done=on_done,
            tool_parser=tool_parser,
            calls_only=tool_parser is not None and forces_tool_calls(data),
        )
        return sse_response(events, headers)

    with _length_field_named(data):  # a request the KV cache cannot hold fails after submit
        collected = await collect_answer(request, stream, tracker)
    choices = []
    for i, choice in enumerate(collected.choices):
        message, finish_reason = _message(choice, tool_parser)
        logprobs = choice_logprobs(choice.logprobs) if data.logprobs else None
        choices.append(ChatChoice(index=i, message=message, finish_reason=finish_reason, logprobs=logprobs))
    body = ChatCompletionResponse(
        id=call.request_id,
        created=int(stream.created),
        model=model,
        choices=choices,
        usage=usage_of([stream]),
        system_fingerprint=SYSTEM_FINGERPRINT,
        latency_seconds=round(time.monotonic() - tracker.started, 4),
        warnings=stream.warnings or None,
        prompt_logprobs=None
        if data.prompt_logprobs is None
        else vllm_prompt_logprobs(stream.prompt_logprobs, data.prompt_logprobs),
    )
    return Response(body, headers=headers)


def _message(
    choice: ChoiceResult, tool_parser: Callable[[], ToolCallParser] | None
) -> tuple[AssistantMessage, str | None]:
    if tool_parser is None:
        return AssistantMessage(content=choice.text), choice.finish_reason
    parsed = parse_message(choice.text, tool_parser())
    message = AssistantMessage(content=parsed.content, tool_calls=parsed.tool_calls or None)
    return message, finish_reason_for(choice.finish_reason, len(parsed.tool_calls))


def _completion_length(message: str) -> str:
    """The engine names the length field `max_tokens`; a request that sent max_completion_tokens
    (the one that wins) reads its name in the warning that lowered it and in a context-length
    error. The warning about both fields says what was sent already."""
    if "max_completion_tokens" in message:
        return message
    return ENGINE_LENGTH_FIELD.sub(lambda m: "max_completion_tokens" if m[1] == "max" else m[0], message)


def _length_field_named(data: ChatCompletionRequest) -> contextlib.AbstractContextManager[None]:
    if data.max_completion_tokens is None:
        return contextlib.nullcontext()
    return renamed_fields(
        lambda param: "max_completion_tokens" if param == "max_tokens" else param, _completion_length
    )
