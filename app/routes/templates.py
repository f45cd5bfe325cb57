"""POST /v1/apply_template: the chat template rendered with the generation prompt."""

from __future__ import annotations

from litestar import Request, Response, post

from app.routes import protected
from app.schemas.templates import ApplyTemplateRequest, ApplyTemplateResponse
from app.services import services, strict_body, undeclared_fields, warning_headers


@protected(
    post, "/v1/apply_template", summary="Render messages through the model's chat template", tag="Simple"
)
async def apply_template(request: Request, data: ApplyTemplateRequest) -> Response[ApplyTemplateResponse]:
    data = await strict_body(request, ApplyTemplateRequest)
    ignored = await undeclared_fields(request, ApplyTemplateRequest)
    svc = services(request)
    prompt = await svc.translator.template_prompt(data)
    text, warnings = await svc.require_scheduler().render(prompt)
    return Response(ApplyTemplateResponse(prompt=text), headers=warning_headers([*ignored, *warnings]))
