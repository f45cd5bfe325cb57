"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import Callable

from litestar import Request, Response, post
from litestar.response import Stream

from app.auth import SECURITY_REQUIREMENT, require_api_key
from app.errors import status_of
from app.routes import ERROR_RESPONSES
from app.schemas.chat import AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse
from app.schemas.common import ChoiceLogprobs, PromptTokensDetails, Usage
from app.services import (
    SYSTEM_FINGERPRINT,
    RequestTracker,
    log_ignored_fields,
    new_request_id,
    services,
    strict_body,
    warning_headers,
)
from app.streaming import ChoiceResult, chat_event_stream, collect, logprobs_payload, now
from app.tool_calls import ToolCallParser, finish_reason_for, parse_message, parser_factory

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@post(
    "/v1/chat/completions",
    responses=ERROR_RESPONSES,
    guards=[require_api_key],
    security=SECURITY_REQUIREMENT,
    tags=["OpenAI"],
    summary="Create a chat completion (text and image+text, streaming or not)",
    status_code=200,
)
async def chat_completions(request: Request, data: ChatCompletionRequest) -> Response:
    data = await strict_body(request, ChatCompletionRequest)
    svc = services(request)
    request_id = new_request_id("chatcmpl", request)
    tracker = RequestTracker(svc, "chat", request_id)
    await log_ignored_fields(request, data)
    with tracker.failures():
        scheduler = svc.require_scheduler()
        engine_request = await svc.translator.chat(data, request_id)
        stream = await scheduler.submit(engine_request)
    model = svc.settings.model_name
    headers = warning_headers(stream.warnings) or {}
    tool_parser = parser_factory(data)

    if data.stream:
        base = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": now(),
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        include_usage = bool(data.stream_options and data.stream_options.include_usage)

        def on_done(finished_stream, error):
            # `cancelled` is set when the client left before the end (as 499 for non-streamed requests).
            status = status_of(error) if error else 499 if finished_stream.cancelled else 200
            tracker.finish(status, finished_stream, error.message if error else None)

        events = chat_event_stream(
            stream, base=base, include_usage=include_usage, on_done=on_done, tool_parser=tool_parser
        )
        return Stream(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    collected = await collect(request, stream)
    if (failure := collected.failure) is not None:
        tracker.finish(status_of(failure), stream, failure.message)
        raise failure
    tracker.finish(499 if collected.disconnected else 200, stream)
    choices = []
    for i, choice in enumerate(collected.choices):
        message, finish_reason = _message(choice, tool_parser)
        logprobs = ChoiceLogprobs(**logprobs_payload(choice.logprobs)) if data.logprobs else None
        choices.append(ChatChoice(index=i, message=message, finish_reason=finish_reason, logprobs=logprobs))
    usage = Usage(
        prompt_tokens=stream.prompt_tokens,
        completion_tokens=stream.completion_tokens,
        total_tokens=stream.prompt_tokens + stream.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(image_tokens=stream.num_image_tokens)
        if stream.num_image_tokens
        else None,
    )
    body = ChatCompletionResponse(
        id=request_id,
        created=int(stream.created),
        model=model,
        choices=choices,
        usage=usage,
        system_fingerprint=SYSTEM_FINGERPRINT,
        latency_seconds=round(time.monotonic() - tracker.started, 4),
        warnings=stream.warnings or None,
    )
    return Response(body, headers=headers or None)


def _message(
    choice: ChoiceResult, tool_parser: Callable[[], ToolCallParser] | None
) -> tuple[AssistantMessage, str | None]:
    if tool_parser is None:
        return AssistantMessage(content=choice.text), choice.finish_reason
    parsed = parse_message(choice.text, tool_parser())
    message = AssistantMessage(content=parsed.content, tool_calls=parsed.tool_calls or None)
    return message, finish_reason_for(choice.finish_reason, len(parsed.tool_calls))
