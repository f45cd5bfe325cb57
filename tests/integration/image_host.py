"""A local image host for the remote-image tests: odd but valid images, a decompression bomb's
header, and hosts that misbehave (slow, oversized, lying about their length), on top of the unit
suite's `HostileServer`."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from typing import Any

from PIL import Image, ImageDraw

from tests.unit._hostile_server import HostileServer, _head


def encode(image: Image.Image, fmt: str, **save: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def picture(
    size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 40, 40), mode: str = "RGB"
) -> Image.Image:
    image = Image.new("RGB", size, color)
    w, h = size
    ImageDraw.Draw(image).rectangle((w // 4, h // 4, w // 2, h // 2), fill=(10, 220, 10))
    return image.convert(mode) if mode != "RGB" else image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a token IDAT: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def palette_with_transparency() -> bytes:
    image = picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return encode(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    image = Image.new("I;16", (32, 32))
    image.putdata([(x * 2000 + y * 37) % 65536 for y in range(32) for x in range(32)])
    return encode(image, "PNG")


def animated_gif() -> bytes:
    frames = [picture(color=(c, 255 - c, 90)) for c in (0, 120, 240)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def rgba_png() -> bytes:
    image = picture(mode="RGBA")
    image.putalpha(Image.linear_gradient("L").resize((32, 32)))
    return encode(image, "PNG")


IMAGE_A = encode(picture(color=(230, 20, 20)), "PNG")
IMAGE_B = encode(picture((40, 24), color=(20, 20, 230)), "PNG")

IMAGES: dict[str, tuple[bytes, str]] = {
    "/ok.png": (encode(picture(), "PNG"), "image/png"),
    "/ok.jpg": (encode(picture(), "JPEG", quality=90), "image/jpeg"),
    "/ok.gif": (encode(picture(), "GIF"), "image/gif"),
    "/ok.webp": (encode(picture(), "WEBP"), "image/webp"),
    "/a.png": (IMAGE_A, "image/png"),
    "/b.png": (IMAGE_B, "image/png"),
    "/1x1.png": (encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "image/png"),
    "/cmyk.jpg": (encode(picture(mode="CMYK"), "JPEG"), "image/jpeg"),
    "/16bit.png": (sixteen_bit_png(), "image/png"),
    "/palette-trns.png": (palette_with_transparency(), "image/png"),
    "/rgba.png": (rgba_png(), "image/png"),
    "/animated.gif": (animated_gif(), "image/gif"),
    "/large.png": (encode(picture((600, 400)), "PNG"), "image/png"),  # > MAX_IMAGE_SIZE (256)
    "/bomb.png": (png_header_only(100_000, 100_000), "image/png"),
    "/wide.png": (encode(Image.new("L", (20_000, 1), 128), "PNG"), "image/png"),
}


class ImageServer(HostileServer):
    """`HostileServer`'s routes (unchanged) plus named images and a few more misbehaviours."""

    def __init__(self) -> None:
        super().__init__(IMAGES["/ok.png"][0])

    def _route(self, path: str):
        if path in IMAGES:
            return self._send(*IMAGES[path])
        extra = {
            "/slow-a.png": self._slow(IMAGE_A, 0.3),
            "/oversized-nolen": self._oversized(chunked=False),
            "/oversized-chunked": self._oversized(chunked=True),
            "/lying-length": self._lying_length,
        }
        return extra.get(path) or super()._route(path)

    def _slow(self, body: bytes, delay_s: float):
        async def handler(writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(delay_s)
            await self._send(body, "image/png")(writer)

        return handler

    def _oversized(self, *, chunked: bool):
        # A PNG signature, then 2 MiB in all: twice the server's MAX_IMAGE_BYTES.
        block = IMAGES["/ok.png"][0][:8] + b"\x00" * (16384 - 8)
        return self._big(chunked=chunked, block=block, blocks=128)

    async def _lying_length(self, writer: asyncio.StreamWriter) -> None:
        # Claims 1000 bytes, then sends 2 MiB: the client must stop at 1000 (a truncated PNG).
        writer.write(_head("200 OK", {"Content-Type": "image/png", "Content-Length": "1000"}))
        big = encode(picture((512, 512)), "PNG")
        for _ in range(max(1, 2 * 1024 * 1024 // len(big))):
            writer.write(big)
            await writer.drain()

    def hits(self, path: str) -> int:
        return sum(1 for seen, _ in self.requests if seen == path)
