"""Route handlers. GET routes answer HEAD too (probes and uptime checkers send it); every route
documents its errors in the OpenAI shape it actually sends."""

from __future__ import annotations

from functools import partial

from litestar import HttpMethod, route
from litestar.openapi import ResponseSpec

from app.schemas.common import ErrorResponse

get_or_head = partial(route, http_method=[HttpMethod.GET, HttpMethod.HEAD])

_ERRORS = {
    400: "Invalid request (the field is named in `param`)",
    401: "Missing or wrong API key",
    404: "Unknown model",
    408: "The request body stopped arriving",
    413: "Request body too large",
    503: "Loading, overloaded (see Retry-After) or shutting down",
    500: "Generation failed",
}
ERROR_RESPONSES = {
    status: ResponseSpec(data_container=ErrorResponse, description=text, generate_examples=False)
    for status, text in _ERRORS.items()
}
