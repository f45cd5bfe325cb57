"""POST /generate (TGI-style simple generation)."""

from __future__ import annotations

import contextlib
import time

from litestar import Request, Response, post

from app.errors import ENGINE_LENGTH_FIELD, renamed_fields
from app.request_fields import check_undeclared
from app.routes import protected
from app.schemas.generate import GenerateParameters, GenerateRequest, GenerateResponse
from app.services import begin, warning_headers
from app.streaming import collect_answer
from scheduler.errors import InvalidRequestError


@protected(post, "/generate", summary="Generate a continuation of raw text (no chat template)", tag="Simple")
async def generate(request: Request, data: GenerateRequest) -> Response:
    call = await begin(request, GenerateRequest, endpoint="generate", id_prefix="gen")
    svc, tracker = call.svc, call.tracker
    with tracker.failures(), _tgi_names():
        body = await request.json()  # cached by Litestar: no second parse
        parameters = body.get("parameters") if isinstance(body, dict) else None
        call.warnings += tuple(_check_undeclared_parameters(parameters))
        stream = await svc.require_scheduler().submit(
            call.warned(svc.translator.generate(call.data, call.request_id))
        )
    warnings = call.renamed_warnings(stream.warnings, _tgi_text)
    collected = await collect_answer(request, stream, tracker)
    choice = collected.choices[0]
    text = choice.text
    if call.data.parameters.return_full_text:
        text = call.data.inputs + text  # TGI's semantics: the prompt as sent, then the answer
    body = GenerateResponse(
        generated_text=text,
        finish_reason=choice.finish_reason,
        generated_tokens=stream.completion_tokens,
        prompt_tokens=stream.prompt_tokens,
        latency_seconds=round(time.monotonic() - tracker.started, 4),
        warnings=warnings or None,
    )
    return Response(body, headers=warning_headers(warnings))


# The engine names the length fields as chat does; /generate's are parameters.max_new_tokens and
# parameters.min_new_tokens.
_PARAMS = {"max_tokens": "parameters.max_new_tokens", "min_tokens": "parameters.min_new_tokens"}


def _tgi_text(message: str) -> str:
    return ENGINE_LENGTH_FIELD.sub(r"\1_new_tokens", message)


def _tgi_names() -> contextlib.AbstractContextManager[None]:
    """Errors from the shared path name /generate's own fields."""
    return renamed_fields(lambda param: _PARAMS.get(param or "", param), _tgi_text)


def _check_undeclared_parameters(parameters: object) -> list[str]:
    """Members of `parameters` that are not TGI's (those are all declared) get the policy of the
    other routes' unknown fields (`app.request_fields`): a known field that would change the
    answer is refused, naming it as `parameters.<name>`; anything else is accepted, logged, and
    named in the answer's warnings."""
    try:
        return [
            warning.replace("unknown field '", "unknown field 'parameters.", 1)
            for warning in check_undeclared(parameters, GenerateParameters.__struct_fields__, "/generate")
        ]
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"parameters.{exc.message}", param=f"parameters.{exc.param}") from None
