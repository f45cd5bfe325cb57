"""Swagger UI at /docs, ReDoc at /redoc and the schema at /openapi.json, behind the API key.

Litestar also mounts its own schema router (at /schema, guarded the same way); these root paths
are the ones the product documents.
"""

from __future__ import annotations

from litestar import Litestar, MediaType, Request, Response, Router
from litestar.openapi.plugins import JsonRenderPlugin, RedocRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import OpenAPIMediaType, Schema

from app.auth import require_api_key
from app.errors import error_body, error_response
from app.routes import get_or_head

SCHEMA_PATH = "/schema"
SWAGGER = SwaggerRenderPlugin(path="/swagger")
REDOC = RedocRenderPlugin(path="/redoc")
JSON_SCHEMA = JsonRenderPlugin(path="/openapi.json")


def _schema(request: Request) -> dict:
    return request.app.openapi_schema.to_schema()


def _rendered(path: str, plugin, media_type: MediaType):
    """A page rendered from the schema by one of Litestar's OpenAPI plugins, behind the API key."""

    @get_or_head(
        path,
        guards=[require_api_key],
        include_in_schema=False,
        media_type=media_type,
        sync_to_thread=False,
        name=f"docs:{path}",
    )
    def render(request: Request) -> Response[bytes]:
        return Response(plugin.render(request, _schema(request)), media_type=media_type)

    return render


swagger_ui = _rendered("/docs", SWAGGER, MediaType.HTML)
redoc_ui = _rendered("/redoc", REDOC, MediaType.HTML)
openapi_json = _rendered("/openapi.json", JSON_SCHEMA, MediaType.JSON)


STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def document_streams(app: Litestar) -> None:
    """With `stream: true` these routes answer 200 as Server-Sent Events; the document says so
    (Litestar derives only the JSON answer from the handler)."""
    for path in STREAMING_PATHS:
        operation = app.openapi_schema.paths[path].post
        success = operation.responses["200"]
        success.content = {
            **(success.content or {}),
            # Each event's data is a chunk, a final error object, or `[DONE]`.
            "text/event-stream": OpenAPIMediaType(schema=Schema(description="chunks, then `[DONE]`")),
        }


def _schema_not_found_as_json(response: Response) -> Response:
    # Litestar's schema router answers unknown schema paths with an HTML page; keep our shape.
    if response.status_code == 404:
        return error_response(404, error_body(404, "not found"))
    return response


def schema_router() -> Router:
    return Router(
        SCHEMA_PATH,
        route_handlers=[],
        guards=[require_api_key],
        include_in_schema=False,
        after_request=_schema_not_found_as_json,
    )
