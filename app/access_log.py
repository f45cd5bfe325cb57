"""One line per HTTP request, and the HTTP counts by route and status.

A Litestar middleware (outside the guards, so refused keys are logged and counted too): it gives
every request an id (the caller's `X-Request-Id` when it is sane, else a new one), returns it in
the `X-Request-Id` response header, and when the response is complete (the last byte of a stream
included) logs one line: method, route, status, latency, and for generation routes what
`RequestTracker` recorded (response id, tokens, images, time to first token, replica, finish
reason). Plain text by default; with `LOG_FORMAT=json` the same fields as JSON keys
(`app.log_format`). Never the key; the prompt never.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

request_log = logging.getLogger("docoserve.requests")
REQUEST_ID_HEADER = b"x-request-id"
GENERATION_KEY = "docoserve_generation"  # scope state: what RequestTracker recorded
REQUEST_ID_KEY = "docoserve_request_id"


# Letters, digits and `._:-` only: an id with spaces, quotes or `=` could forge fields of the log
# line it is printed in.
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            supplied = value.decode("latin-1")
            if _SANE_ID.fullmatch(supplied):
                return supplied
            break
    return f"req-{uuid.uuid4().hex}"


def scope_request_id(scope: Scope) -> str | None:
    return scope.get("state", {}).get(REQUEST_ID_KEY)


def access_log(count: Callable[[str, str, int], None]) -> Callable[[ASGIApp], ASGIApp]:
    """`count(method, route, status)` is called once per request (the metrics' HTTP counter)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.monotonic()
            request_id = request_id_from(scope.get("headers", []))
            state = scope.setdefault("state", {})
            state[REQUEST_ID_KEY] = request_id
            status = 500  # if the app raises before answering, the server answers 500

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    headers = [h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER]
                    headers.append((REQUEST_ID_HEADER, request_id.encode("latin-1")))
                    message = {**message, "headers": headers}
                await send(message)

            try:
                await app(scope, receive, send_with_id)
            finally:
                method = scope.get("method", "")
                route = scope.get("path_template") or scope.get("path", "")
                generation = state.get(GENERATION_KEY)
                # A client that left mid-stream got its 200 headers, but not the answer: 499, as in
                # the request log line and the generation metrics.
                count(method, route, generation.get("status", status) if generation else status)
                log_line(method, route, status, time.monotonic() - started, request_id, generation)

        return wrapped

    return middleware


UNMATCHED_ROUTE = "unmatched"  # the metrics label of paths no route serves (404, 405)
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


def unrouted_logger(count: Callable[[str, str, int], None]) -> Callable[[Message, Scope], Any]:
    """A Litestar `before_send` hook for the answers the router gives itself (404 for an unknown
    path, 405 for a wrong method): route middleware never sees those requests, so they get their
    request id, line and count here. Their path is the caller's: it is logged cut short with
    anything unprintable replaced, and counted under one label (a label per path would let any
    client grow the metrics without bound)."""

    async def before_send(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start" or scope.get("type") != "http":
            return
        state = scope.setdefault("state", {})
        if REQUEST_ID_KEY in state:  # the access-log middleware has it
            return
        request_id = request_id_from(scope.get("headers", []))
        state[REQUEST_ID_KEY] = request_id
        message["headers"] = [
            *(h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER),
            (REQUEST_ID_HEADER, request_id.encode("latin-1")),
        ]
        method = _UNPRINTABLE.sub("?", scope.get("method", ""))[:16]
        status = message["status"]
        count(method, UNMATCHED_ROUTE, status)
        path = _UNPRINTABLE.sub("?", scope.get("path", ""))[:200]
        log_line(method, path, status, 0.0, request_id, None)

    return before_send


def log_line(
    method: str, route: str, status: int, latency: float, request_id: str, generation: dict[str, Any] | None
) -> None:
    fields: dict[str, Any] = {
        "method": method,
        "path": route,
        "status": status,
        "latency_s": round(latency, 4),
        "request_id": request_id,
    }
    if generation:
        status = generation.get("status", status)  # 499 when the client left before the end
        fields.update(generation)
        message = _seed_line(status, latency, fields)
    else:
        message = f"[req] {method} {route} {status} latency={latency:.3f}s request_id={request_id}"
    request_log.log(_level(route, status), "%s", message, extra={"fields": fields})


class RefusalSampler(logging.Filter):
    """With per-request lines off, one line per route every `every_s` for the 503s turned away
    for load, counting the ones left out: in a burst every refused request wrote its own line,
    on the event loop, at the moment the server has the least time to spare. The count rides on
    the route's next such line; the metrics count every one."""

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        if record.levelno != logging.WARNING or not fields or fields.get("status") != 503:
            return True
        route, now = fields.get("path", ""), time.monotonic()
        last = self._last.get(route)
        if last is not None and now - last < self.every_s:
            self._held[route] = self._held.get(route, 0) + 1
            return False
        held = self._held.pop(route, 0)
        if held:
            record.msg, record.args = (
                f"{record.getMessage()} (and {held} more 503s on {route} in {now - last:.0f} s)",
                (),
            )
        self._last[route] = now
        return True


def _level(route: str, status: int) -> int:
    """A probe answered 503 while the model loads or drains is the answer it asked for, and a
    503 elsewhere is backpressure the client may retry: neither is the server failing."""
    if status == 503:
        return logging.INFO if route.startswith("/health") else logging.WARNING
    return logging.ERROR if status >= 500 else logging.INFO


def _seed_line(status: int, latency: float, fields: dict[str, Any]) -> str:
    """The seed's vLLM-like line, e.g. `[req] chat 200 id=chatcmpl-... latency=0.532s gen=0.471s
    model=m tokens: prompt=45 completion=128 total=173 tps=271.7 do_sample=true temp=0.8 top_p=0.9
    seed=42`, then what this server adds (request id, route, TTFT, images, replica, finish reason).
    `/generate` has the seed's shorter line first: `[req] generate 200 id=... gen=0.095s tokens:
    completion=64 tps=673.2 do_sample=false`, a parser of it reading the same fields in the same
    order; the chat line's other fields follow it."""
    if fields["endpoint"] == "generate":
        return _seed_generate_line(status, latency, fields)
    parts = [f"[req] {fields['endpoint']} {status} id={fields['id']} latency={latency:.3f}s"]
    if fields.get("gen_s") is not None:
        parts.append(f"gen={fields['gen_s']:.3f}s")
    parts.append(f"model={fields.get('model', '')}")
    if "prompt_tokens" in fields:
        prompt, completion = fields["prompt_tokens"], fields["completion_tokens"]
        parts.append(f"tokens: prompt={prompt} completion={completion} total={prompt + completion}")
        if fields.get("tps") is not None:
            parts.append(f"tps={fields['tps']}")
    if "do_sample" in fields:
        parts.append(
            f"do_sample={str(fields['do_sample']).lower()} temp={fields['temperature']} "
            f"top_p={fields['top_p']} seed={fields['seed']}"
        )
    extra = ("request_id", "path", "ttft_s", "images", "image_tokens", "replica", "finish_reason", "error")
    parts.extend(f"{name}={_plain(fields[name])}" for name in extra if fields.get(name) not in (None, 0))
    return " ".join(parts)


def _seed_generate_line(status: int, latency: float, fields: dict[str, Any]) -> str:
    parts = [f"[req] generate {status} id={fields['id']}"]
    if fields.get("gen_s") is not None:
        parts.append(f"gen={fields['gen_s']:.3f}s")
    if "prompt_tokens" in fields:
        parts.append(f"tokens: completion={fields['completion_tokens']}")
        if fields.get("tps") is not None:
            parts.append(f"tps={fields['tps']}")
    if "do_sample" in fields:
        parts.append(f"do_sample={str(fields['do_sample']).lower()}")
    parts.append(f"latency={latency:.3f}s model={_plain(fields.get('model', ''))}")
    if "prompt_tokens" in fields:
        parts.append(f"prompt_tokens={fields['prompt_tokens']}")
    if "do_sample" in fields:
        parts.append(f"temp={fields['temperature']} top_p={fields['top_p']} seed={fields['seed']}")
    extra = ("request_id", "path", "ttft_s", "replica", "finish_reason", "error")
    parts.extend(f"{name}={_plain(fields[name])}" for name in extra if fields.get(name) not in (None, 0))
    return " ".join(parts)


def _plain(value: Any) -> str:
    if isinstance(value, str) and (not value or any(c in value for c in ' "=')):
        return '"' + value.replace('"', "'") + '"'
    return str(value)
