"""What route handlers need, built once per app and reached through `request.app.state`."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import msgspec
from litestar import Request

from app.errors import engine_error_to_response, invalid_body
from app.metrics import Metrics, log_request
from app.settings import Settings
from app.translate import Translator
from scheduler.errors import EngineError, ModelNotReadyError

if TYPE_CHECKING:
    from scheduler.core import Scheduler
    from scheduler.request import RequestStream

log = logging.getLogger(__name__)
T = TypeVar("T")
SYSTEM_FINGERPRINT = "fp_docoserve_0_1"


@dataclass
class Services:
    settings: Settings
    translator: Translator
    metrics: Metrics
    scheduler: Scheduler | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def require_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise ModelNotReadyError("the server is starting; retry shortly")
        return self.scheduler


def services(request: Request) -> Services:
    return request.app.state.services


async def strict_body(request: Request, data_type: type[T]) -> T:
    """The body as `data_type`, with OpenAI's strict types. Litestar converts leniently ("10"
    becomes 10, "true" becomes True); the JSON it already parsed is converted again, strictly (a
    conversion of Python objects, no second parse)."""
    try:
        return msgspec.convert(await request.json(), type=data_type, strict=True)
    except msgspec.ValidationError as exc:
        raise invalid_body(exc) from None


@dataclass
class Call(Generic[T]):
    """One generation request as a route sees it, once `begin` has checked the body."""

    data: T
    svc: Services
    request_id: str
    tracker: RequestTracker


async def begin(request: Request, data_type: type[T], *, endpoint: str, id_prefix: str) -> Call[T]:
    """The start every generation route shares: a request id, a tracker that records how the
    request ends (a refused body too), the strictly converted body."""
    svc = services(request)
    request_id = new_request_id(id_prefix, request)
    tracker = RequestTracker(svc, endpoint, request_id)
    with tracker.failures():
        data = await strict_body(request, data_type)
    await log_ignored_fields(request, data)
    return Call(data, svc, request_id, tracker)


def new_request_id(prefix: str, request: Request) -> str:
    """Use the caller's X-Request-Id when it is sane, so logs line up across services."""
    supplied = request.headers.get("x-request-id", "")
    if supplied and len(supplied) <= 128 and supplied.isascii() and supplied.isprintable():
        return supplied
    return f"{prefix}-{uuid.uuid4().hex}"


class RequestTracker:
    """Records how a request ended (metrics, and the PROGRESS_LOGS line) exactly once."""

    def __init__(self, svc: Services, endpoint: str, request_id: str) -> None:
        self.svc = svc
        self.endpoint = endpoint
        self.request_id = request_id
        self.started = time.monotonic()
        self._done = False

    def finish(self, status: int, stream: RequestStream | None = None, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        self.svc.metrics.observe(self.endpoint, status, self.started, stream)
        if self.svc.settings.progress_logs or status >= 500:
            log_request(self.endpoint, status, self.request_id, self.started, stream, error)

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Errors raised before a response exists are recorded with the status they will get."""
        try:
            yield
        except EngineError as exc:
            status, _, _ = engine_error_to_response(exc)
            self.finish(status, error=exc.message)
            raise
        except Exception as exc:
            self.finish(getattr(exc, "status_code", 500), error=type(exc).__name__)
            raise


async def log_ignored_fields(request: Request, data: object) -> None:
    """Unknown request fields are accepted, as OpenAI clients expect; at debug level, say which."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        return
    if isinstance(body, dict):
        ignored = sorted(set(body) - set(type(data).__struct_fields__))
        if ignored:
            log.debug(
                "%s %s: ignored unknown fields %s", request.method, request.url.path, ", ".join(ignored)
            )


def warning_headers(warnings: list[str]) -> dict[str, str] | None:
    if not warnings:
        return None
    return {"X-Request-Warnings": " | ".join(w.replace("\n", " ") for w in warnings)}
