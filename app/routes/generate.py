"""POST /generate (TGI-style simple generation)."""

from __future__ import annotations

import time

from litestar import Request, Response, post

from app.routes import protected
from app.schemas.generate import GenerateRequest, GenerateResponse
from app.services import begin, warning_headers
from app.streaming import collect_answer


@protected(post, "/generate", summary="Generate a continuation of raw text (no chat template)", tag="Simple")
async def generate(request: Request, data: GenerateRequest) -> Response:
    call = await begin(request, GenerateRequest, endpoint="generate", id_prefix="gen")
    svc, tracker = call.svc, call.tracker
    with tracker.failures():
        stream = await svc.require_scheduler().submit(svc.translator.generate(call.data, call.request_id))
    collected = await collect_answer(request, stream, tracker)
    choice = collected.choices[0]
    body = GenerateResponse(
        generated_text=choice.text,
        finish_reason=choice.finish_reason,
        generated_tokens=stream.completion_tokens,
        prompt_tokens=stream.prompt_tokens,
        latency_seconds=round(time.monotonic() - tracker.started, 4),
        warnings=stream.warnings or None,
    )
    return Response(body, headers=warning_headers(stream.warnings))
