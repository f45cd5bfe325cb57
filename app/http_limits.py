"""Limits on how a client may send a request and take its answer: a request body that stops
arriving is answered 408 and its connection closed, so stalled uploads cannot pile up; one still
arriving when the server is told to stop is answered 503 at once, so that it cannot hold the
shutdown up; a compressed body is answered 415 instead of being parsed as JSON it is not; a
response write the client leaves waiting drops the response. (Headers and idle keep-alive
connections are timed out by granian itself; see entrypoint.py.)"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler
from litestar.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class RequestBodyTimeout(HTTPException):
    status_code = 408


class UnsupportedContentEncoding(HTTPException):
    status_code = 415


class UnsupportedTransferCoding(HTTPException):
    # RFC 9112 says 501; the fault is the client's, and a 5xx would page whoever watches the rate.
    status_code = 400


class StoppingDuringUpload(HTTPException):
    status_code = 503


class StoppedReading(Exception):
    """A response write waited the body timeout for the client: its answer is dropped."""


class BodyReads:
    """The request bodies being read now. `stop()` (on SIGTERM, on the event loop) ends the reads
    still waiting for bytes, and any read after it, with a 503."""

    def __init__(self) -> None:
        self.stopping = False
        self._waiting: set[anyio.CancelScope] = set()

    def stop(self) -> None:
        self.stopping = True
        for scope in list(self._waiting):
            scope.cancel()

    async def receive(self, receive: Receive, timeout_s: float) -> Any:
        """The next message, or None after `timeout_s` without one or when stopped. Once stopped,
        only a body that has already arrived is read (its request then gets the route's own
        "shutting down" answer, not one that blames its upload)."""
        stopping = self.stopping
        message = None
        with anyio.move_on_after(_ARRIVED_S if stopping else timeout_s) as scope:
            if not stopping:
                self._waiting.add(scope)
            try:
                message = await receive()
            finally:
                self._waiting.discard(scope)
        return message


_UTF8_BOM = b"\xef\xbb\xbf"

# After SIGTERM, how long a read may wait for bytes that the server has in fact already received.
_ARRIVED_S = 0.05


# Codings that compress (RFC 9110's registry and common aliases). Anything else is let through:
# careless clients put a charset there ("Content-Encoding: utf-8") over a plain JSON body.
_COMPRESSIONS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "compress", "x-compress"})


def refuse_compressed_body(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard (after the API key's): a compressed body (`Content-Encoding` gzip, deflate, br, zstd:
    clients that compress uploads) gets a 415 that says so. Without it, the compressed bytes would
    reach the JSON decoder and come back as "not valid JSON", which points the client at the wrong
    fault; decompressing instead would let a small body expand without bound before the size limit
    sees it."""
    encoding = connection.headers.get("content-encoding", "").strip()
    if any(coding.strip() in _COMPRESSIONS for coding in encoding.lower().split(",")):
        raise UnsupportedContentEncoding(
            detail=f"request bodies with Content-Encoding {encoding[:32]!r} are not accepted: "
            "send the JSON uncompressed"
        )
    # granian undoes `chunked` and nothing else: the body of "gzip, chunked" would reach the JSON
    # decoder still compressed, to come back as "not valid JSON".
    transfer = connection.headers.get("transfer-encoding", "").strip()
    codings = [coding.strip() for coding in transfer.lower().split(",") if coding.strip()]
    if any(coding not in ("chunked", "identity") for coding in codings):
        raise UnsupportedTransferCoding(
            detail=f"request bodies with Transfer-Encoding {transfer[:32]!r} are not accepted: "
            "send them chunked or with a Content-Length, uncompressed"
        )


def refuse_non_json_body(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: a body declared as something other than JSON (`text/plain`, a form, multipart) gets
    a 415. Those are the types a browser sends cross-site without a CORS preflight, so without
    this any web page a user visits could start generations on a server that runs without an
    API key. No Content-Type at all is read as JSON (scripts that post a string body send none;
    FastAPI does the same), unless the request comes from a web page (it has an `Origin`): a
    browser sends bodies without a type cross-site without a preflight too (a typeless Blob,
    sendBeacon)."""
    declared = connection.headers.get("content-type", "")
    media_type = declared.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return
    if media_type or connection.headers.get("origin"):
        shown = repr(declared[:48]) if declared else "none"
        raise UnsupportedContentEncoding(
            detail=f"request bodies of Content-Type {shown} are not accepted: "
            "send JSON with Content-Type: application/json"
        )


def body_timeout(timeout_s: float, reads: BodyReads) -> Callable[[ASGIApp], ASGIApp]:
    """Litestar middleware: while a request's body is incomplete, each read must make progress
    within `timeout_s`, and ends with a 503 once `reads` is stopped (the server drains: granian
    waits for every open connection before it exits, and a slow upload would keep it past the
    orchestrator's grace period). After the body, reads only watch for a disconnect."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            complete = False
            first = True

            async def timed_receive() -> Any:
                nonlocal complete, first
                if complete:
                    return await receive()
                message = await reads.receive(receive, timeout_s)
                if message is None and reads.stopping:
                    raise StoppingDuringUpload(
                        detail="the server is shutting down; the request body had not all arrived",
                        headers={"Connection": "close", "Retry-After": "1"},
                    )
                if message is None:
                    raise RequestBodyTimeout(
                        detail=f"the request body stopped arriving for {timeout_s:g} s",
                        headers={"Connection": "close"},
                    )
                if message["type"] != "http.request" or not message.get("more_body", False):
                    complete = True
                if first and message["type"] == "http.request":
                    first = False
                    body = message.get("body", b"")
                    if body.startswith(_UTF8_BOM):
                        # RFC 8259 lets a parser ignore it; PowerShell 5.1 and .NET clients send it.
                        message = {**message, "body": body[len(_UTF8_BOM) :]}
                return message

            stalled = False

            async def timed_send(message: Message) -> None:
                nonlocal stalled
                if message["type"] != "http.response.body":
                    await send(message)
                    return
                # granian buffers about a hundred KiB per connection and then makes a write wait
                # until the client has taken most of them: a client that stops reading kept its
                # request's answer in memory for as long as it kept the connection (81 such
                # streams held 4 GiB). So a write left waiting this long drops the response: a
                # client reading nothing, or one reading slower than about a buffer per timeout
                # (3-4 KB/s at 30 s) while its answer comes faster.
                with anyio.move_on_after(timeout_s) as waited:
                    await send(message)
                if waited.cancelled_caught:
                    stalled = True
                    raise StoppedReading

            try:
                await app(scope, timed_receive, timed_send)
            except Exception:
                # Litestar re-raises it as "Exception caught after response started".
                if not stalled:
                    raise
                log.info(
                    "%s %s: a write waited %g s for the client to read; its response was dropped",
                    scope.get("method", ""),
                    scope.get("path", "")[:200],
                    timeout_s,
                )

        return wrapped

    return middleware
