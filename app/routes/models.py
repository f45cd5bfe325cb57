"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from litestar import Request

from app.routes import get_or_head, protected
from app.schemas.models import ModelCard, ModelList
from app.services import services


def _card(request: Request) -> ModelCard:
    svc = services(request)
    context = svc.scheduler.max_model_len if svc.scheduler is not None else None
    return ModelCard(id=svc.settings.model_name, created=svc.created, max_model_len=context)


@protected(get_or_head, "/v1/models", summary="List the served model")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request)])


@protected(get_or_head, "/v1/models/{model_id:path}", summary="Describe the served model")
async def retrieve_model(request: Request, model_id: str) -> ModelCard:
    services(request).translator.check_model(model_id.lstrip("/"))
    return _card(request)
