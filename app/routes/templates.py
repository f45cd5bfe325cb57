"""POST /v1/apply_template: the chat template rendered with the generation prompt."""

from __future__ import annotations

from litestar import Request, post

from app.auth import SECURITY_REQUIREMENT, require_api_key
from app.routes import ERROR_RESPONSES
from app.schemas.templates import ApplyTemplateRequest, ApplyTemplateResponse
from app.services import services, strict_body


@post(
    "/v1/apply_template",
    responses=ERROR_RESPONSES,
    guards=[require_api_key],
    security=SECURITY_REQUIREMENT,
    tags=["Simple"],
    summary="Render messages through the model's chat template",
    status_code=200,
)
async def apply_template(request: Request, data: ApplyTemplateRequest) -> ApplyTemplateResponse:
    data = await strict_body(request, ApplyTemplateRequest)
    svc = services(request)
    prompt = await svc.translator.template_prompt(data)
    return ApplyTemplateResponse(prompt=await svc.require_scheduler().render(prompt))
