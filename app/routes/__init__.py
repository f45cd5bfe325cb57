"""Route handlers. GET routes answer HEAD too (probes and uptime checkers send it); every route
documents its errors in the OpenAI shape it actually sends."""

from __future__ import annotations

from functools import partial
from typing import Any

from litestar import HttpMethod, post, route
from litestar.openapi import ResponseSpec

from app.auth import SECURITY_REQUIREMENT, require_api_key
from app.http_limits import refuse_compressed_body, refuse_non_json_body
from app.schemas.common import ErrorResponse

get_or_head = partial(route, http_method=[HttpMethod.GET, HttpMethod.HEAD])

_ERRORS = {
    400: "Invalid request (the field is named in `param`)",
    401: "Missing or wrong API key",
    404: "Unknown model",
    408: "The request body stopped arriving",
    413: "Request body too large",
    415: "Compressed or non-JSON request body (send JSON, uncompressed)",
    503: "Loading, overloaded (see Retry-After) or shutting down",
    500: "Generation failed",
}
ERROR_RESPONSES = {
    status: ResponseSpec(data_container=ErrorResponse, description=text, generate_examples=False)
    for status, text in _ERRORS.items()
}


def protected(method: Any, path: str, *, summary: str, tag: str = "OpenAI") -> Any:
    """A route behind the API key, its errors documented: `protected(post, "/v1/...", summary=...)`."""
    return method(
        path,
        guards=[require_api_key, refuse_compressed_body, refuse_non_json_body]
        if method is post
        else [require_api_key],
        security=SECURITY_REQUIREMENT,
        responses=ERROR_RESPONSES,
        tags=[tag],
        summary=summary,
        **({"status_code": 200} if method is post else {}),
    )
