"""models.images: bytes -> validated RGB image, on images generated in memory."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib

import pytest
from PIL import Image, ImageFile

from models import images
from models.errors import InvalidImageError
from models.images import DecodedImageCache, ImageLimits, decode_image

pytestmark = pytest.mark.timeout(30)

LIMITS = ImageLimits()
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def png_file(width: int, height: int, bit_depth: int, color_type: int, raw: bytes | None) -> bytes:
    """A hand-made PNG: lets a header claim any size, and writes the 16-bit RGB PIL cannot save."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(raw)) if raw is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def refused(data: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, limits)
    return caught.value.message


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_each_allowed_format(fmt):
    out = decode_image(encode(Image.new("RGB", (64, 48), RED), fmt), LIMITS)
    assert out.mode == "RGB" and out.size == (64, 48)
    assert close(out.getpixel((10, 10)), RED, tolerance=40)


def test_one_pixel():
    out = decode_image(encode(Image.new("RGB", (1, 1), BLUE), "PNG"), LIMITS)
    assert out.size == (1, 1) and out.getpixel((0, 0)) == BLUE


def _pixels_never_decoded(monkeypatch) -> None:
    """Any attempt to decode pixel data fails the test: refusals must come from the header."""

    def load(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_extreme_aspect_ratio_refused_from_header(monkeypatch):
    data = encode(Image.new("L", (20000, 1)), "PNG")
    _pixels_never_decoded(monkeypatch)
    assert refused(data) == "image is 20000 x 1 pixels; its aspect ratio exceeds 200:1"


def test_thin_image_keeps_at_least_one_pixel():
    out = decode_image(encode(Image.new("RGB", (4000, 20), RED), "PNG"), LIMITS)
    assert out.size == (1024, 6)  # the short side rounded up: the aspect ratio never grows
    # 1900 x 10 (190:1, accepted) became 1024 x 5 (204.8:1), which Qwen2-VL's processor refused.
    assert decode_image(encode(Image.new("RGB", (1900, 10), RED), "PNG"), LIMITS).size == (1024, 6)
    wide = ImageLimits(max_aspect_ratio=float("inf"))
    assert decode_image(encode(Image.new("L", (20000, 1)), "PNG"), wide).size == (1024, 1)


def test_resize_keeps_aspect_ratio():
    assert decode_image(encode(Image.new("RGB", (3000, 1500), RED), "PNG"), LIMITS).size == (1024, 512)
    tall = decode_image(encode(Image.new("RGB", (1200, 4000), RED), "JPEG"), LIMITS)  # JPEG: draft path
    assert tall.size == (308, 1024) and close(tall.getpixel((100, 500)), RED)
    assert decode_image(encode(Image.new("RGB", (1024, 10), RED), "PNG"), LIMITS).size == (1024, 10)


def test_cmyk_jpeg():
    out = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), LIMITS)
    assert out.mode == "RGB" and close(out.getpixel((8, 8)), RED, tolerance=20)


def test_16_bit_grayscale_png_is_scaled_not_clipped():
    raw = Image.frombytes("I;16", (4, 1), struct.pack("<4H", 0, 256, 32768, 65535))
    out = decode_image(encode(raw, "PNG"), LIMITS)
    assert [out.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (1, 1, 1),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_16_bit_rgb_png():
    row = b"\x00" + struct.pack(">6H", 65535, 0, 0, 0, 32768, 65535)  # filter byte, 2 pixels
    out = decode_image(png_file(2, 1, 16, 2, row), LIMITS)
    assert out.getpixel((0, 0)) == RED and out.getpixel((1, 0)) == (0, 128, 255)


def test_palette_with_transparency_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 1)
    out = decode_image(encode(img, "PNG", transparency=0), LIMITS)
    assert out.getpixel((0, 0)) == BLUE and out.getpixel((3, 3)) == WHITE


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [("RGBA", (255, 0, 0, 128), (255, 127, 127)), ("LA", (0, 0), WHITE), ("LA", (0, 255), (0, 0, 0))],
)
def test_alpha_composited_on_white(mode, color, expected):
    out = decode_image(encode(Image.new(mode, (8, 8), color), "PNG"), LIMITS)
    assert close(out.getpixel((4, 4)), expected, tolerance=1)


@pytest.mark.parametrize("mode", ["1", "L", "I;16", "P"])
def test_other_modes_become_rgb(mode):
    assert decode_image(encode(Image.new(mode, (8, 8)), "PNG"), LIMITS).mode == "RGB"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_first_frame(fmt):
    frames = [Image.new("RGB", (32, 32), color) for color in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert close(decode_image(data, LIMITS).getpixel((16, 16)), RED, tolerance=40)


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), LIMITS)
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), RED) and close(out.getpixel((10, 35)), BLUE)


def test_multi_picture_jpeg_counts_as_jpeg():
    pictures = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encode(pictures[0], "MPO", save_all=True, append_images=pictures[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert close(decode_image(data, LIMITS).getpixel((8, 8)), RED, tolerance=20)


def test_huge_header_refused_before_decoding(monkeypatch):
    header_only = png_file(100_000, 100_000, 8, 2, raw=None)  # no pixel data at all
    _pixels_never_decoded(monkeypatch)
    assert "pixel limit" in refused(header_only)
    # Our limit holds even with PIL's bomb guard switched off elsewhere in the process.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert refused(header_only) == "image is 100000 x 100000 pixels, more than the 50000000-pixel limit"


def test_own_pixel_limit_runs_before_load():
    # Below PIL's threshold, only our check stands; without pixel data a load would say "truncated".
    message = refused(png_file(2000, 2000, 8, 2, raw=None), ImageLimits(max_pixels=1_000_000))
    assert message == "image is 2000 x 2000 pixels, more than the 1000000-pixel limit"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns at open; we refuse
def test_pil_warning_threshold_is_our_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert "more than the 1000-pixel limit" in refused(png_file(40, 40, 8, 2, raw=None))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_files(fmt):
    data = encode(Image.effect_noise((128, 128), 64).convert("RGB"), fmt)
    message = refused(data[: len(data) // 2])
    # A WEBP cut in half already fails while its header is read, before the format is known.
    assert message in {
        f"image could not be decoded (truncated or malformed {f} data)" for f in (fmt, "image")
    }


def test_truncated_images_stay_refused_if_someone_flips_the_switch(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.effect_noise((64, 64), 64).convert("RGB"), "PNG")
    assert "truncated or malformed PNG" in refused(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_checksum():
    data = bytearray(encode(Image.new("RGB", (8, 8), RED), "PNG"))
    data[-20] ^= 0xFF  # inside IDAT
    assert "malformed PNG" in refused(bytes(data))


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO", "PPM"])
def test_formats_outside_the_allowlist(fmt):
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    assert refused(data).startswith("image format is not supported (accepted: GIF, JPEG, PNG, WEBP)")


def test_allowlist_is_configurable():
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    assert "accepted: JPEG" in refused(png, ImageLimits(allowed_formats=frozenset({"JPEG"})))
    with pytest.raises(ValueError):
        ImageLimits(allowed_formats=frozenset({"JPG"}))


def test_random_bytes_empty_and_oversized():
    assert "format is not supported" in refused(os.urandom(4096))
    # Cut inside its header: the message says it may be cut, not only that PNG is refused.
    assert "truncated or corrupt" in refused(encode(Image.new("RGB", (8, 8), RED), "PNG")[:12])
    assert refused(b"") == "image is empty"
    assert "1000-byte limit" in refused(b"\x00" * 1001, ImageLimits(max_bytes=1000))


def test_messages_echo_no_addresses_paths_or_bytes(monkeypatch):
    png = encode(Image.new("RGB", (64, 64), RED), "PNG")
    bad_inputs = [
        os.urandom(512),
        png[:100],
        b"\x89PNG\r\n\x1a\n" + b"\xff" * 64,
        png_file(10**5, 10**5, 8, 2, None),
    ]
    bad_inputs += [
        encode(Image.new("RGB", (8, 8)), "BMP"),
        b"GIF89a" + b"\x00" * 20,
        b"\xff\xd8\xff" + b"\x00" * 50,
    ]
    for data in bad_inputs:
        message = refused(data)
        assert "0x" not in message and "/" not in message and "<" not in message, message
        assert "BytesIO" not in message and "\\x" not in message, message


# --- cache ---------------------------------------------------------------------------------------


@pytest.fixture
def decode_calls(monkeypatch) -> list[bytes]:
    calls: list[bytes] = []
    real = images.decode_image

    def counting(data: bytes, limits: ImageLimits) -> Image.Image:
        calls.append(data)
        time.sleep(0.05)  # widen the window for concurrent misses
        return real(data, limits)

    monkeypatch.setattr(images, "decode_image", counting)
    return calls


def test_cache_decodes_identical_bytes_once(decode_calls):
    cache = DecodedImageCache()
    red, blue = (encode(Image.new("RGB", (8, 8), c), "PNG") for c in (RED, BLUE))
    first = cache.get_or_decode(red, LIMITS)
    assert cache.get_or_decode(bytes(red), LIMITS) is first
    assert len(decode_calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    cache.get_or_decode(red, ImageLimits(max_side=4))  # other limits, other result
    cache.get_or_decode(blue, LIMITS)
    assert len(decode_calls) == 3 and len(cache) == 3


def test_cache_concurrent_misses_decode_once(decode_calls):
    cache = DecodedImageCache()
    data = encode(Image.new("RGB", (8, 8), RED), "PNG")
    results: list[Image.Image] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_decode(data, LIMITS))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(decode_calls) == 1 and len(results) == 8 and all(r is results[0] for r in results)


def test_cache_is_bounded_lru_and_does_not_keep_failures(decode_calls):
    cache = DecodedImageCache(max_entries=2)
    a, b, c = (encode(Image.new("RGB", (8, 8), (i, 0, 0)), "PNG") for i in range(3))
    cache.get_or_decode(a, LIMITS)
    cache.get_or_decode(b, LIMITS)
    cache.get_or_decode(a, LIMITS)  # a is now the most recent
    cache.get_or_decode(c, LIMITS)  # evicts b
    cache.get_or_decode(a, LIMITS)
    assert len(cache) == 2 and len(decode_calls) == 3
    cache.get_or_decode(b, LIMITS)
    assert len(decode_calls) == 4
    for _ in range(2):
        with pytest.raises(InvalidImageError):
            cache.get_or_decode(b"not an image", LIMITS)
    assert len(decode_calls) == 6


def test_cache_byte_budget():
    cache = DecodedImageCache(max_total_bytes=3 * 64 * 64 * 2)  # room for two 64x64 RGB images
    for i in range(3):
        cache.get_or_decode(encode(Image.new("RGB", (64, 64), (i, 0, 0)), "PNG"), LIMITS)
    assert len(cache) == 2


@pytest.mark.parametrize(
    "longest_edge, patch, sizes, untouched",
    [
        (64, 8, [(200, 20), (20, 200), (65, 1), (1000, 5), (129, 16), (1, 1)], [(100, 40), (64, 17)]),
        # LightOnOCR's own numbers; 3388x33 scales to 14.999... and floors to 14 in floating point
        (1540, 14, [(3000, 20), (3079, 15), (3388, 33), (33, 3388), (6776, 66), (15000, 75)], [(2000, 600)]),
    ],
)
def test_a_thin_image_is_stretched_just_enough_for_a_pixtral_patch_merger(
    longest_edge, patch, sizes, untouched
):
    """Pixtral's image processor scales to `longest_edge` and rounds each side up to whole
    patches; a merger of 2x2 patches needs two a side. LightOnOCR's processor rounds to single
    patches (a 200x20 line on the tiny checkpoint was a 500); Mistral 3's passes it merged
    patches, so its grids always take the merger and nothing is stretched."""
    from types import SimpleNamespace

    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from models.image_processing import process_fitted

    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": longest_edge}, patch_size={"height": patch, "width": patch}
    )
    fit = images.merger_fit(
        SimpleNamespace(spatial_merge_size=2), SimpleNamespace(image_processor=image_processor)
    )
    assert fit is not None

    def lighton(batch_images):
        return image_processor(images=batch_images, return_tensors="pt"), []

    def mistral3(batch_images):
        merged = {"height": 2 * patch, "width": 2 * patch}
        return image_processor(images=batch_images, patch_size=merged, return_tensors="pt"), []

    for size in sizes + untouched:
        image = Image.new("RGB", size)
        batch, warnings, [fitted] = process_fitted(fit, [image], lighton, ["messages[0].content[0]"])
        assert min(batch["image_sizes"][0].tolist()) >= 2 * patch, (size, fitted.size)
        assert (fitted is image) == (size in untouched or min(size) > 2 * patch and max(size) <= longest_edge)
        # One warning per image, from the size decoded to the size the model got.
        assert len(warnings) == (fitted is not image)
        if warnings:
            assert (
                f"({size[0]}x{size[1]} after decoding) was stretched to {fitted.width}x{fitted.height}"
                in warnings[0]
            )
        if min(size) > 2 * patch:
            _, warnings, [as_sent] = process_fitted(fit, [image], mistral3, ["messages[0].content[0]"])
            assert as_sent is image and not warnings, size
    assert (
        images.merger_fit(
            SimpleNamespace(spatial_merge_size=1), SimpleNamespace(image_processor=image_processor)
        )
        is None
    )
