"""Typed errors raised below the HTTP layer.

Each carries what the OpenAI error shape needs (message, param, code); `app/errors.py` maps the
class to an HTTP status and an OpenAI error `type`. Messages are written for API clients: they never
contain file paths, memory addresses, tensors or raw bytes.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a request that cannot be served as asked."""

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(EngineError):
    """The request is well-formed JSON but asks for something invalid (HTTP 400)."""

    code = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested completion does not fit the model's context (HTTP 400)."""

    code = "context_length_exceeded"


class InvalidImageError(InvalidRequestError):
    """An image could not be fetched, decoded or accepted (HTTP 400)."""

    code = "invalid_image"


class ModelNotReadyError(EngineError):
    """The model is still loading or failed to load (HTTP 503)."""

    code = "model_not_ready"


class OverloadedError(EngineError):
    """Every replica queue is full, or the server is draining (HTTP 503 + Retry-After)."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class ShuttingDownError(OverloadedError):
    """The server stopped before the request finished (HTTP 503 + Retry-After: ask another replica)."""

    code = "server_shutting_down"


class GenerationError(EngineError):
    """The model failed while generating for this request (HTTP 500, details only in the log)."""

    code = "generation_failed"
