"""What route handlers need, built once per app and reached through `request.app.state`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import msgspec
from litestar import Request

from app.access_log import GENERATION_KEY
from app.errors import engine_error_to_response, invalid_body
from app.metrics import Metrics
from app.request_fields import check_undeclared
from app.settings import Settings
from app.tool_calls import ToolCallFormat, select_format
from app.translate import Translator
from scheduler.errors import EngineError, ModelNotReadyError

if TYPE_CHECKING:
    from scheduler.core import Scheduler
    from scheduler.request import EngineRequest, RequestStream

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
    # The tool-call format and why it was chosen, settled once the model's chat template is known.
    tool_calls: tuple[ToolCallFormat, str] | None = None

    def require_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise ModelNotReadyError("the server is starting; retry shortly")
        return self.scheduler

    def tool_format(self) -> ToolCallFormat:
        """TOOL_CALL_PARSER's format, or with `auto` the one the model's chat template shows."""
        if self.tool_calls is None:
            template = self.scheduler.chat_template if self.scheduler is not None else None
            if template is None:  # no replica loaded yet: nothing is generated with this answer
                return select_format(self.settings.tool_call_parser, None)[0]
            self.tool_calls = select_format(self.settings.tool_call_parser, template)
            logging.getLogger("docoserve.server").info(
                "[server] tool calls: %s format (%s)", self.tool_calls[0].name, self.tool_calls[1]
            )
        return self.tool_calls[0]


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


async def undeclared_fields(request: Request, data_type: type) -> list[str]:
    """For routes that do not `begin` a generation (/tokenize, /detokenize, /v1/apply_template):
    the same policy for fields the body does not declare (app.request_fields): a known one that
    would change the answer (`chat_template`, `continue_final_message`) is a 400, an unknown one
    comes back as a warning; they were dropped without a word. Litestar caches the parsed body:
    no second parse."""
    return check_undeclared(await request.json(), data_type.__struct_fields__, request.url.path)


@dataclass
class Call(Generic[T]):
    """One generation request as a route sees it, once `begin` has checked the body."""

    data: T
    svc: Services
    request_id: str
    tracker: RequestTracker
    warnings: tuple[str, ...] = ()  # the body's fields ignored (`check_undeclared`)

    def warned(self, engine_request: EngineRequest) -> EngineRequest:
        """`engine_request` carrying the body's warnings, ahead of its own."""
        if not self.warnings:
            return engine_request
        return dataclasses.replace(engine_request, warnings=self.warnings + engine_request.warnings)

    def renamed_warnings(self, warnings: list[str], rename: Callable[[str], str]) -> list[str]:
        """A stream's warnings with the engine's field names in the route's own words; the body's
        warnings quote what the client sent and stay as they are."""
        return [w if w in self.warnings else rename(w) for w in warnings]


async def begin(
    request: Request, data_type: type[T], *, endpoint: str, id_prefix: str, separator: str = "-"
) -> Call[T]:
    """The start every generation route shares: a request id, a tracker that records how the
    request ends (a refused body too), the strictly converted body."""
    svc = services(request)
    request_id = new_request_id(id_prefix, request, separator)
    tracker = RequestTracker(svc, endpoint, request_id, request.scope.setdefault("state", {}))
    with tracker.failures():
        data = await strict_body(request, data_type)
        ignored = await undeclared_fields(request, data_type)
    return Call(data, svc, request_id, tracker, tuple(ignored))


def new_request_id(prefix: str, request: Request, separator: str = "-") -> str:
    """The response's `id` (`chatcmpl-...`, `resp_...`, as OpenAI's). The caller's X-Request-Id is
    the request's own id (`app.access_log`), returned as a header and logged next to this one."""
    return f"{prefix}{separator}{uuid.uuid4().hex}"


class RequestTracker:
    """Records how a generation request ended exactly once: the engine metrics, and the fields
    the request's log line carries (`app.access_log` writes it when the response is complete)."""

    def __init__(self, svc: Services, endpoint: str, request_id: str, state: dict) -> None:
        self.svc = svc
        self.endpoint = endpoint
        self.request_id = request_id
        self.started = time.monotonic()
        self._state = state
        self._done = False

    def finish(self, status: int, stream: RequestStream | None = None, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        self.svc.metrics.observe(self.endpoint, status, self.started, stream)
        fields = self._state[GENERATION_KEY] = generation_fields(
            self.endpoint,
            self.request_id,
            self.started,
            stream,
            error,
            model=self.svc.settings.model_name,
            sampling=self.svc.settings.progress_logs,
        )
        if status == 499:
            # The client left: the wire may still show the 200 that was started, or nothing.
            fields["status"] = status

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


def warning_headers(warnings: list[str]) -> dict[str, str] | None:
    """The warnings as one header: on one line, and in ASCII (a header is Latin-1 at most; a
    warning quoting a client's non-Latin field name, `名前`, made the answer a 500)."""
    if not warnings:
        return None
    text = " | ".join(" ".join(w.split()) for w in warnings)
    return {"X-Request-Warnings": text.encode("ascii", "backslashreplace").decode("ascii")}


def generation_fields(
    endpoint: str,
    response_id: str,
    started: float,
    stream: RequestStream | None,
    error: str | None,
    *,
    model: str,
    sampling: bool,
) -> dict:
    """What a generation request's log line adds: tokens, images, timings, replica, how it ended;
    with PROGRESS_LOGS also its sampling parameters. Never the prompt, never the key."""
    fields: dict = {"endpoint": endpoint, "id": response_id, "model": model}
    if stream is not None:
        now = time.monotonic()
        first = stream.first_token_at
        end = stream.finished_at or now
        completion = stream.completion_tokens
        # The seed's gen time is the generation's, prompt included: from the request's first step
        # (a rate from the first token on was absurd for one token: microseconds between them).
        began = stream.scheduled_at if stream.scheduled_at is not None else first
        fields.update(
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=completion,
            images=stream.num_images,
            image_tokens=stream.num_image_tokens,
            ttft_s=round(first - started, 4) if first is not None else None,
            gen_s=round(end - began, 4) if first is not None else None,
            tps=round(completion / max(end - began, 1e-9), 1) if first is not None and completion else None,
            replica=stream.replica_name,
            finish_reason=",".join(sorted({r for r in stream.finish_reasons if r})) or None,
        )
        if sampling:
            params = stream.request.params
            fields.update(
                do_sample=not params.is_greedy,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
            )
    if error:
        fields["error"] = error
    return fields
