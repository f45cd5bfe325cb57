"""POST /generate (TGI-style simple generation)."""

from __future__ import annotations

import time

from litestar import Request, Response, post

from app.auth import SECURITY_REQUIREMENT, require_api_key
from app.errors import status_of
from app.routes import ERROR_RESPONSES
from app.schemas.generate import GenerateRequest, GenerateResponse
from app.services import RequestTracker, new_request_id, services, strict_body, warning_headers
from app.streaming import collect


@post(
    "/generate",
    responses=ERROR_RESPONSES,
    guards=[require_api_key],
    security=SECURITY_REQUIREMENT,
    tags=["Simple"],
    summary="Generate a continuation of raw text (no chat template)",
    status_code=200,
)
async def generate(request: Request, data: GenerateRequest) -> Response:
    data = await strict_body(request, GenerateRequest)
    svc = services(request)
    request_id = new_request_id("gen", request)
    tracker = RequestTracker(svc, "generate", request_id)
    with tracker.failures():
        stream = await svc.require_scheduler().submit(svc.translator.generate(data, request_id))
    collected = await collect(request, stream)
    choice = collected.choices[0]
    if (failure := collected.failure) is not None:
        tracker.finish(status_of(failure), stream, failure.message)
        raise failure
    tracker.finish(499 if collected.disconnected else 200, stream)
    body = GenerateResponse(
        generated_text=choice.text,
        finish_reason=choice.finish_reason,
        generated_tokens=stream.completion_tokens,
        prompt_tokens=stream.prompt_tokens,
        latency_seconds=round(time.monotonic() - tracker.started, 4),
        warnings=stream.warnings or None,
    )
    return Response(body, headers=warning_headers(stream.warnings))
