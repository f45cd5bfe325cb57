"""Every error leaves the server in the OpenAI shape: {"error": {message, type, param, code}}.

One table maps exception classes to (status, OpenAI type, default code). Unexpected exceptions
become a generic 500; their details go to the log only.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    InternalServerException,
    NotAuthorizedException,
    ValidationException,
)

from app.http_limits import StoppingDuringUpload
from app.schemas.common import ErrorBody, ErrorResponse
from scheduler.errors import (
    ContextLengthExceededError,
    EngineError,
    GenerationError,
    InvalidImageError,
    InvalidRequestError,
    ModelNotReadyError,
    OverloadedError,
)

log = logging.getLogger(__name__)


class ModelNotFoundError(EngineError):
    code = "model_not_found"


# (status, OpenAI error type); most specific classes first.
ENGINE_ERRORS: tuple[tuple[type[EngineError], int, str], ...] = (
    (ContextLengthExceededError, 400, "invalid_request_error"),
    (InvalidImageError, 400, "invalid_request_error"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (ModelNotFoundError, 404, "invalid_request_error"),
    (OverloadedError, 503, "server_error"),
    (ModelNotReadyError, 503, "server_error"),
    (GenerationError, 500, "server_error"),
)

HTTP_CODES: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request", "the request is invalid"),
    401: ("authentication_error", "invalid_api_key", "invalid or missing API key"),
    403: ("permission_error", "forbidden", "forbidden"),
    404: ("invalid_request_error", "not_found", "not found"),
    405: ("invalid_request_error", "method_not_allowed", "method not allowed"),
    408: ("invalid_request_error", "request_timeout", "the request did not arrive in time"),
    413: ("invalid_request_error", "request_too_large", "the request body is too large"),
    415: ("invalid_request_error", "unsupported_media_type", "unsupported media type"),
    429: ("rate_limit_error", "rate_limited", "too many requests"),
    503: ("server_error", "unavailable", "the service is unavailable"),
}

_PATH_IN_MESSAGE = re.compile(r" - at `\$\.?([^`]*)`")
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]+)`")


def error_body(
    status: int, message: str, *, type_: str | None = None, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    default_type, default_code, _ = HTTP_CODES.get(status, ("server_error", "internal_error", ""))
    return ErrorResponse(
        ErrorBody(message=message, type=type_ or default_type, param=param, code=code or default_code)
    )


def error_response(
    status: int, body: ErrorResponse, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(
        content=msgspec.json.encode(body), status_code=status, media_type=MediaType.JSON, headers=headers
    )


def engine_error_to_response(exc: EngineError) -> tuple[int, ErrorResponse, dict[str, str] | None]:
    for cls, status, type_ in ENGINE_ERRORS:
        if isinstance(exc, cls):
            headers = None
            if isinstance(exc, OverloadedError):
                headers = {"Retry-After": str(exc.retry_after_s)}
            elif isinstance(exc, ModelNotReadyError):
                headers = {"Retry-After": "5"}
            message = (
                exc.message if status < 500 or not isinstance(exc, GenerationError) else "generation failed"
            )
            return status, error_body(status, message, type_=type_, param=exc.param, code=exc.code), headers
    return 500, error_body(500, "internal server error", code="internal_error"), None


def status_of(exc: EngineError) -> int:
    return engine_error_to_response(exc)[0]


def handle_engine_error(request: Request, exc: EngineError) -> Response[bytes]:
    status, body, headers = engine_error_to_response(exc)
    return error_response(status, body, headers)


def handle_validation_error(request: Request, exc: ValidationException) -> Response[bytes]:
    message, param = _describe_validation(exc)
    return error_response(400, error_body(400, message, param=param, code="invalid_request"))


# Litestar's words when the body stream ends in `http.disconnect`: granian ends it so both when the
# client closes the connection mid-body and when its chunked encoding is malformed (a chunk size
# that is not hex, a chunk longer than it said). The client's fault either way, not a 500 for
# alerts on the 5xx rate to fire on.
_BODY_CUT_SHORT = "client disconnected prematurely"


def handle_http_exception(request: Request, exc: HTTPException) -> Response[bytes]:
    if isinstance(exc, StoppingDuringUpload):
        body = error_body(503, exc.detail, type_="server_error", code="server_shutting_down")
        return error_response(503, body, dict(exc.headers or {}))
    if isinstance(exc, InternalServerException) and exc.detail == _BODY_CUT_SHORT:
        message = (
            "the request body ended before it was complete (connection closed, or chunked encoding malformed)"
        )
        # The connection cannot carry another request: say so, or a client that pools it sends
        # its next request into a socket granian is closing.
        return error_response(400, error_body(400, message, code="incomplete_body"), {"Connection": "close"})
    status = exc.status_code
    type_, code, default_message = HTTP_CODES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", "http_error", "error")
    )
    headers = dict(exc.headers or {})
    if status == 413:
        # The rest of the body is never read, so granian closes the connection after this answer.
        headers.setdefault("Connection", "close")
    if isinstance(exc, NotAuthorizedException):
        headers.setdefault("WWW-Authenticate", "Bearer")
    if status == 413:
        limit = request.app.request_max_body_size
        message = (
            f"the request body is larger than this server's limit of {limit} bytes (MAX_REQUEST_BODY_BYTES); "
            "send images by URL or fewer at a time, or split the prompts over several requests"
            if limit
            else default_message
        )
    elif status == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed for {request.url.path}"
    elif status >= 500:
        message = default_message or "internal server error"
    else:
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else default_message
        if message == "Input data was truncated":
            # msgspec's words for JSON that ends early, and also for a string ending in a lone
            # surrogate escape ("\ud800"), which no valid JSON text may hold.
            message = (
                "the request body is not valid JSON: it ends early, or a string holds a lone UTF-16 "
                "surrogate escape (\\uD800-\\uDFFF not part of a pair)"
            )
        # The JSON decoder's own refusals ("Number out of range - at `$[...]`": it decodes without
        # the route's types, so it cannot say where) read as the validation errors do.
        if match := _PATH_IN_MESSAGE.search(message):
            # It knows no key names: a path through objects (`[...]`) names nothing a client sent.
            param = match.group(1) if match.group(1) and "[...]" not in match.group(1) else None
            message = f"invalid request: {message[: match.start()]}" + (f" (at {param})" if param else "")
            body = error_body(status, message, type_=type_, param=param, code=code)
            return error_response(status, body, headers or None)
    return error_response(status, error_body(status, message, type_=type_, code=code), headers or None)


# The engine's names for the length fields in its messages, where routes with other names for them
# (/generate, max_completion_tokens) write their own; not where a client's own field name is quoted
# or follows "parameters.".
ENGINE_LENGTH_FIELD = re.compile(r"(?<!['.])\b(max|min)_tokens\b")


def _without_mapping_keys(path: str) -> str | None:
    """msgspec writes a key of a mapping as `[...]` (`metadata[...]`): the param is the mapping."""
    return path.replace("[...]", "") or None


def invalid_body(exc: msgspec.ValidationError) -> InvalidRequestError:
    """msgspec's "Expected `int`, got `str` - at `$.max_tokens`" as a 400 naming the field."""
    text = str(exc)
    param = None
    match = _PATH_IN_MESSAGE.search(text)
    if match:
        param = _without_mapping_keys(match.group(1))
        text = text[: match.start()]
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown:  # the refused field itself, not the object holding it
        param = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
    return InvalidRequestError(f"invalid request: {text}" + (f" (at {param})" if param else ""), param=param)


def handle_undecodable_body(request: Request, exc: Exception) -> Response[bytes]:
    if isinstance(exc, RecursionError):
        message = "the request body is nested too deeply"
    else:
        message = "the request body is not valid UTF-8 JSON"
    return error_response(400, error_body(400, message, code="invalid_request"))


def handle_unexpected(request: Request, exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, error_body(500, "internal server error", code="internal_error"))


def _describe_validation(exc: ValidationException) -> tuple[str, str | None]:
    """msgspec says e.g. "Expected `float` <= 2.0 - at `$.temperature`": keep the sentence, turn
    the JSON path into OpenAI's `param`."""
    extra: Any = exc.extra
    detail = None
    key = None
    if isinstance(extra, list) and extra:
        first = extra[0]
        if isinstance(first, dict):
            detail = first.get("message")
            key = first.get("key")
    text = detail or (exc.detail if isinstance(exc.detail, str) else "") or "the request body is invalid"
    if "JSON is malformed" in text or "Malformed" in text or "invalid character" in text.lower():
        return "the request body is not valid JSON", None
    if key == "data" and text == "'data'":
        # Litestar's KeyError for a handler whose body never arrived.
        return "the request body is empty: send a JSON object", None
    # Litestar strips msgspec's " - at `$.x`" suffix and reports the path as `key` ("data" = the body).
    param = _without_mapping_keys(key) if isinstance(key, str) and key != "data" else None
    match = _PATH_IN_MESSAGE.search(text)
    if match:
        param = _without_mapping_keys(match.group(1)) or param
        text = text[: match.start()]
    field = _MISSING_FIELD.search(text) or _UNKNOWN_FIELD.search(text)
    if field:
        param = f"{param}.{field.group(1)}" if param else field.group(1)
    if param:
        text = f"{text} (at {param})"
    return f"invalid request: {text}", param


EXCEPTION_HANDLERS = {
    EngineError: handle_engine_error,
    ValidationException: handle_validation_error,
    HTTPException: handle_http_exception,
    # Raised while the body is decoded (invalid UTF-8 in a string; JSON nested past msgspec's limit).
    UnicodeDecodeError: handle_undecodable_body,
    RecursionError: handle_undecodable_body,
    Exception: handle_unexpected,
}


@contextlib.contextmanager
def renamed_fields(param: Callable[[str | None], str | None], text: Callable[[str], str]) -> Iterator[None]:
    """Engine errors raised inside name a route's own fields: the shared path writes chat's
    (`max_tokens`, `messages`), where /v1/responses and /generate have others."""
    try:
        yield
    except EngineError as exc:
        exc.param = param(exc.param)
        exc.message = text(exc.message)
        exc.args = (exc.message,)
        raise
