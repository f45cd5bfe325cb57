"""Limits on how a client may hold a connection: a request body that stops arriving is answered
408 and its connection closed, so stalled uploads cannot pile up. (Headers and idle keep-alive
connections are timed out by granian itself; see entrypoint.py.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Receive, Scope, Send


class RequestBodyTimeout(HTTPException):
    status_code = 408


def body_timeout(timeout_s: float) -> Callable[[ASGIApp], ASGIApp]:
    """Litestar middleware: while a request's body is incomplete, each read must make progress
    within `timeout_s`. After the body, reads only watch for a disconnect and never time out."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            complete = False

            async def timed_receive() -> Any:
                nonlocal complete
                if complete:
                    return await receive()
                message = None
                with anyio.move_on_after(timeout_s):
                    message = await receive()
                if message is None:
                    raise RequestBodyTimeout(
                        detail=f"the request body stopped arriving for {timeout_s:g} s",
                        headers={"Connection": "close"},
                    )
                if message["type"] != "http.request" or not message.get("more_body", False):
                    complete = True
                return message

            await app(scope, timed_receive, send)

        return wrapped

    return middleware
