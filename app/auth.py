"""Bearer-token guard (constant-time comparison) and the matching OpenAPI security scheme."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import Components, SecurityScheme

SECURITY_SCHEME_NAME = "BearerAuth"
BEARER_COMPONENTS = Components(
    security_schemes={
        SECURITY_SCHEME_NAME: SecurityScheme(
            type="http",
            scheme="bearer",
            description="The server's API_KEY, sent as `Authorization: Bearer <key>`.",
        )
    }
)
SECURITY_REQUIREMENT = [{SECURITY_SCHEME_NAME: []}]


def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Let the request through when no key is configured or the bearer token matches it."""
    expected: bytes | None = connection.app.state.api_key_bytes
    if expected is None:
        return
    # Two Authorization headers are refused whatever their order: taking either one would let a
    # proxy that appends its own header, or a client that sends both, get a different answer.
    headers = connection.headers.getall("authorization", [])
    header = headers[0] if len(headers) == 1 else ""
    scheme, _, token = header.partition(" ")
    # compare_digest on bytes of any length: no early exit that would leak the key's prefix.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise NotAuthorizedException(
            detail="invalid or missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_api_key_for_metrics(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """/metrics is behind the key like the API (Prometheus scrapes with a bearer token), unless
    METRICS_PUBLIC opens it (a scraper that cannot send one, on a private network)."""
    if connection.app.state.metrics_public:
        return
    require_api_key(connection, handler)
