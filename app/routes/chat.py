"""POST /v1/chat/completions."""

from __future__ import annotations

import time

from litestar import Request, Response, post
from litestar.response import Stream

from app.auth import SECURITY_REQUIREMENT, require_api_key
from app.schemas.chat import AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse
from app.schemas.common import ChoiceLogprobs, PromptTokensDetails, Usage
from app.services import SYSTEM_FINGERPRINT, RequestTracker, new_request_id, services, warning_headers
from app.streaming import chat_event_stream, collect, logprobs_payload, now
from scheduler.errors import GenerationError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@post(
    "/v1/chat/completions",
    guards=[require_api_key],
    security=SECURITY_REQUIREMENT,
    tags=["OpenAI"],
    summary="Create a chat completion (text and image+text, streaming or not)",
    status_code=200,
)
async def chat_completions(request: Request, data: ChatCompletionRequest) -> Response:
    svc = services(request)
    request_id = new_request_id("chatcmpl", request)
    tracker = RequestTracker(svc, "chat", request_id)
    with tracker.failures():
        scheduler = svc.require_scheduler()
        engine_request = await svc.translator.chat(data, request_id)
        stream = await scheduler.submit(engine_request)
    model = svc.settings.model_name
    headers = warning_headers(stream.warnings) or {}

    if data.stream:
        base = {"id": request_id, "object": "chat.completion.chunk", "created": now(), "model": model, "system_fingerprint": SYSTEM_FINGERPRINT}
        include_usage = bool(data.stream_options and data.stream_options.include_usage)

        def on_done(finished_stream, error):
            tracker.finish(500 if error else 200, finished_stream, error)

        events = chat_event_stream(stream, base=base, include_usage=include_usage, on_done=on_done)
        return Stream(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    collected = await collect(request, stream)
    failed = collected.error or any(c.finish_reason == "error" for c in collected.choices)
    if failed:
        tracker.finish(500, stream, collected.error or "generation failed")
        raise GenerationError("generation failed")
    tracker.finish(499 if collected.disconnected else 200, stream)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=choice.text),
            finish_reason=choice.finish_reason,
            logprobs=ChoiceLogprobs(**logprobs_payload(choice.logprobs)) if data.logprobs else None,
        )
        for i, choice in enumerate(collected.choices)
    ]
    usage = Usage(
        prompt_tokens=stream.prompt_tokens,
        completion_tokens=stream.completion_tokens,
        total_tokens=stream.prompt_tokens + stream.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(image_tokens=stream.num_image_tokens) if stream.num_image_tokens else None,
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
