"""A deliberately misbehaving HTTP/1.1 server on 127.0.0.1 for the image-fetch tests.

Raw asyncio in its own thread and loop, so it can lie about Content-Length, trickle bytes and
redirect anywhere, independently of the event loop under test. One request per connection.
Every handler is bounded in count and time; stopping the server cancels whatever still runs.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Self

SECRET_BODY = b"SECRET-BODY-DO-NOT-ECHO internal 10.9.8.7 /etc/passwd"

Handler = Callable[[asyncio.StreamWriter], Awaitable[None]]


def self_signed_tls(folder: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only it) for a certificate valid for `name`."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True, timeout=20,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HostileServer:
    def __init__(self, png: bytes, *, tls: ssl.SSLContext | None = None) -> None:
        self.png = png
        self.port = 0
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, lowercased headers)
        self.server_names: list[str | None] = []  # TLS SNI seen
        self._tls = tls
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()

    def __enter__(self) -> Self:
        if self._tls is not None:
            self._tls.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("hostile server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._tls)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            path = request_line.split(" ")[1]
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)
            }
            self.requests.append((path, headers))
            await self._route(path)(writer)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client hung up or never finished its request: that is the point of some routes
        finally:
            self._tasks.discard(task)
            writer.close()

    def _route(self, path: str) -> Handler:
        if path.startswith("/chain/"):
            return self._chain(int(path.rsplit("/", 1)[1]), delay_s=0.0, prefix="/chain/")
        if path.startswith("/slow-chain/"):
            return self._chain(int(path.rsplit("/", 1)[1]), delay_s=0.3, prefix="/slow-chain/")
        png = self.png
        routes: dict[str, Handler] = {
            "/png": self._send(png, "image/png"),
            "/png-as-octets": self._send(png, "application/octet-stream"),
            "/truncated": self._send(png[: len(png) // 2], "image/png"),
            "/html": self._send(
                b"<html><body>" + SECRET_BODY + b"</body></html>", "text/html; charset=utf-8"
            ),
            "/status/404": self._send(SECRET_BODY, "image/png", status="404 Not Found"),
            "/status/500": self._send(SECRET_BODY, "text/plain", status="500 Internal Server Error"),
            "/empty": self._send(b"", "image/png"),
            "/big-nolen": self._big(chunked=False),
            "/big-chunked": self._big(chunked=True),
            "/big-announced": self._announced_huge,
            "/short-body": self._short_body,
            "/trickle": self._trickle_body,
            "/trickle-headers": self._trickle_headers,
            "/loop": self._redirect("/loop"),
            "/redirect-relative": self._redirect("../png", status="301 Moved Permanently"),
            "/redirect-private": self._redirect("http://10.0.0.1/x"),
            "/redirect-metadata": self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/redirect-mapped": self._redirect("http://[::ffff:10.0.0.1]/x"),
            "/redirect-decimal": self._redirect("http://167772161/x"),  # 10.0.0.1
            "/redirect-file": self._redirect("file:///etc/passwd"),
            "/redirect-userinfo": self._redirect(f"http://user@127.0.0.1:{self.port}/png"),
            "/redirect-numeric-self": self._redirect(f"http://2130706433:{self.port}/png"),
            "/redirect-no-location": self._send(b"", "text/plain", status="302 Found"),
        }
        return routes.get(path, self._send(b"no such route", "text/plain", status="404 Not Found"))

    def _send(self, body: bytes, content_type: str, *, status: str = "200 OK") -> Handler:
        async def handler(writer: asyncio.StreamWriter) -> None:
            headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
            writer.write(_head(status, headers) + body)

        return handler

    def _redirect(self, location: str, *, status: str = "302 Found") -> Handler:
        async def handler(writer: asyncio.StreamWriter) -> None:
            writer.write(_head(status, {"Location": location, "Content-Length": "0"}))

        return handler

    def _chain(self, remaining: int, *, delay_s: float, prefix: str) -> Handler:
        async def handler(writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(delay_s)
            if remaining <= 0:
                await self._send(self.png, "image/png")(writer)
            else:
                await self._redirect(f"{prefix}{remaining - 1}")(writer)

        return handler

    def _big(self, *, chunked: bool, block: bytes = b"\x89" * 16384, blocks: int = 64) -> Handler:
        """A body of `blocks` times `block` (1 MiB by default), with or without a length."""

        async def handler(writer: asyncio.StreamWriter) -> None:
            extra = {"Transfer-Encoding": "chunked"} if chunked else {}
            writer.write(_head("200 OK", {"Content-Type": "image/png", **extra}))
            for _ in range(blocks):
                writer.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")

        return handler

    async def _announced_huge(self, writer: asyncio.StreamWriter) -> None:
        writer.write(_head("200 OK", {"Content-Type": "image/png", "Content-Length": str(10**12)}))
        for _ in range(40):  # hold the line up to 2 s; a good client has hung up long before
            writer.write(b"\x00" * 1024)
            await writer.drain()
            await asyncio.sleep(0.05)

    async def _short_body(self, writer: asyncio.StreamWriter) -> None:
        writer.write(_head("200 OK", {"Content-Type": "image/png", "Content-Length": "100000"}))
        writer.write(self.png[:10])

    async def _trickle_body(self, writer: asyncio.StreamWriter) -> None:
        writer.write(_head("200 OK", {"Content-Type": "image/png", "Content-Length": str(len(self.png))}))
        for byte in self.png[:100]:  # 5 s at most
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)

    async def _trickle_headers(self, writer: asyncio.StreamWriter) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"a" * 60:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
