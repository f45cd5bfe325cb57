"""POST /tokenize and /detokenize (vLLM's shapes), with the tokenizer the server serves with."""

from __future__ import annotations

from litestar import Request, Response, post

from app.routes import protected
from app.schemas.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from app.services import services, strict_body, undeclared_fields, warning_headers


@protected(
    post,
    "/tokenize",
    summary="Token ids of a raw prompt, or of messages rendered with the chat template",
    tag="Simple",
)
async def tokenize(request: Request, data: TokenizeRequest) -> Response[TokenizeResponse]:
    data = await strict_body(request, TokenizeRequest)
    ignored = await undeclared_fields(request, TokenizeRequest)
    svc = services(request)
    scheduler = svc.require_scheduler()
    prepared = await scheduler.tokenize(await svc.translator.tokenize_prompt(data))
    tokens = prepared.token_ids
    body = TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=scheduler.max_model_len)
    # A prompt over MAX_INPUT_TOKENS comes back left-truncated, as generation would see it; the
    # header says so.
    return Response(body, headers=warning_headers([*ignored, *prepared.warnings]))


@protected(post, "/detokenize", summary="Text of a list of token ids (special tokens included)", tag="Simple")
async def detokenize(request: Request, data: DetokenizeRequest) -> Response[DetokenizeResponse]:
    data = await strict_body(request, DetokenizeRequest)
    ignored = await undeclared_fields(request, DetokenizeRequest)
    svc = services(request)
    svc.translator.check_model(data.model)
    body = DetokenizeResponse(prompt=await svc.require_scheduler().detokenize(data.tokens))
    return Response(body, headers=warning_headers(ignored))
