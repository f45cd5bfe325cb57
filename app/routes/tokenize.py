"""POST /tokenize and /detokenize (vLLM's shapes), with the tokenizer the server serves with."""

from __future__ import annotations

from litestar import Request, Response, post

from app.auth import SECURITY_REQUIREMENT, require_api_key
from app.routes import ERROR_RESPONSES
from app.schemas.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from app.services import services, strict_body, warning_headers


@post(
    "/tokenize",
    responses=ERROR_RESPONSES,
    guards=[require_api_key],
    security=SECURITY_REQUIREMENT,
    tags=["Simple"],
    summary="Token ids of a raw prompt, or of messages rendered with the chat template",
    status_code=200,
)
async def tokenize(request: Request, data: TokenizeRequest) -> Response[TokenizeResponse]:
    data = await strict_body(request, TokenizeRequest)
    svc = services(request)
    scheduler = svc.require_scheduler()
    prepared = await scheduler.tokenize(await svc.translator.tokenize_prompt(data))
    tokens = prepared.token_ids
    body = TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=scheduler.max_context)
    # A prompt over MAX_INPUT_TOKENS comes back left-truncated, as generation would see it; the
    # header says so.
    return Response(body, headers=warning_headers(prepared.warnings))


@post(
    "/detokenize",
    responses=ERROR_RESPONSES,
    guards=[require_api_key],
    security=SECURITY_REQUIREMENT,
    tags=["Simple"],
    summary="Text of a list of token ids (special tokens included)",
    status_code=200,
)
async def detokenize(request: Request, data: DetokenizeRequest) -> DetokenizeResponse:
    data = await strict_body(request, DetokenizeRequest)
    svc = services(request)
    svc.translator.check_model(data.model)
    return DetokenizeResponse(prompt=await svc.require_scheduler().detokenize(data.tokens))
