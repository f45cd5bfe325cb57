"""Encoded image bytes -> a validated RGB `PIL.Image`, bounded before any pixel is decoded.

CPU work: the scheduler calls this from a worker thread, never on the event loop. Everything that
can go wrong with client-supplied bytes becomes an `InvalidImageError` with a fixed, client-safe
message; PIL's own messages (which carry object addresses and sometimes paths) go to the debug log.

Decided limits:
- Only the formats in `allowed_formats` are even tried (`Image.open(formats=...)`), so the other
  plugins never parse client bytes; the format checked is the one PIL detected, not a claimed one.
  Camera JPEGs that carry several pictures (MPO) count as JPEG.
- width*height is checked from the header, before `load()`, against `min(max_pixels,
  Image.MAX_IMAGE_PIXELS)`: PIL's bomb *warning* threshold becomes our error without touching the
  process-global warnings filter (`warnings.catch_warnings` is not thread-safe), and setting
  `MAX_IMAGE_PIXELS = None` elsewhere cannot switch our limit off.
- Aspect ratios beyond `max_aspect_ratio` (200:1, Qwen2-VL's `smart_resize` limit, the strictest
  common processor) are refused from the header; within it, resizing keeps >= 1 px per side.
- `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False: a truncated file is an error, not a grey tail.

Also here: the smallest sides a Pixtral patch merger can take (`MergerFit`, `enlarged_to`) and the
digest of processed image inputs that keys their blocks in the prefix cache.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageFile, ImageOps

from models.errors import InvalidImageError

logger = logging.getLogger(__name__)

_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112
# Pillow reports a multi-picture camera JPEG as "MPO"; its first picture is a plain JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000  # decoded width*height, checked from the header before decoding
    max_side: int = 1024  # longest side after decoding; larger images are resized keeping aspect
    allowed_formats: frozenset[str] = frozenset({"JPEG", "PNG", "GIF", "WEBP"})
    max_aspect_ratio: float = 200.0  # longest/shortest side; float("inf") disables

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.max_side < 1 or self.max_aspect_ratio < 1:
            raise ValueError("image limits must be positive (aspect ratio >= 1)")
        Image.init()
        unknown = sorted(f for f in self.allowed_formats if f not in Image.OPEN)
        if unknown or not self.allowed_formats:
            raise ValueError(f"unknown or empty image formats: {unknown}")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode `data` into an RGB image whose longest side is at most `limits.max_side`."""
    if not data:
        raise InvalidImageError("image is empty")
    if len(data) > limits.max_bytes:
        raise InvalidImageError(f"image is larger than the {limits.max_bytes}-byte limit")
    _refuse_truncated_images()
    fmt = "image"
    try:
        with Image.open(io.BytesIO(data), formats=sorted(limits.allowed_formats)) as img:
            fmt = _check_format(img.format, limits)
            _check_size(img.size, limits)
            if fmt == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image will be shrunk anyway.
                img.draft(None, _fitted_size(img.size, limits.max_side))
            img.load()  # full decode inside the try: truncation and corruption surface here
            rgb = _to_rgb(_apply_exif_orientation(img))
            return _fit(rgb, limits.max_side)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError:
        raise InvalidImageError(f"image exceeds the {_pixel_limit(limits)}-pixel limit") from None
    except Image.UnidentifiedImageError:
        accepted = ", ".join(sorted(limits.allowed_formats))
        raise InvalidImageError(
            f"image format is not supported (accepted: {accepted}), or the image is truncated or corrupt"
        ) from None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError...
        logger.debug("decoding %s failed", fmt, exc_info=True)
        raise InvalidImageError(f"image could not be decoded (truncated or malformed {fmt} data)") from None


def _refuse_truncated_images() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some library flipped the process-wide switch; undo it rather than accept half images.
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set; resetting it to False")
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _check_format(detected: str | None, limits: ImageLimits) -> str:
    fmt = _FORMAT_ALIASES.get(detected or "", detected or "")
    if fmt not in limits.allowed_formats:
        accepted = ", ".join(sorted(limits.allowed_formats))
        raise InvalidImageError(f"image format is not supported (accepted: {accepted})")
    return fmt


def _pixel_limit(limits: ImageLimits) -> int:
    pil_limit = Image.MAX_IMAGE_PIXELS
    return min(limits.max_pixels, pil_limit) if pil_limit else limits.max_pixels


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidImageError("image has no pixels")
    if width * height > _pixel_limit(limits):
        raise InvalidImageError(
            f"image is {width} x {height} pixels, more than the {_pixel_limit(limits)}-pixel limit"
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise InvalidImageError(
            f"image is {width} x {height} pixels; its aspect ratio exceeds {limits.max_aspect_ratio:g}:1"
        )


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the pixels as stored, as browsers do
        logger.debug("ignoring unreadable EXIF orientation", exc_info=True)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES:
        # convert("L") would clip 16-bit samples at 255 (a white image); scale them instead.
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in _ALPHA_MODES:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    # Always a new image: the caller's cache must never share the opened file's core.
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def _fitted_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    longest = max(width, height)
    if longest <= max_side:
        return size
    scale = max_side / longest
    # The short side rounded up: rounded, a 1900 x 10 image became 1024 x 5, past the 200:1
    # aspect ratio the server (and Qwen2-VL's processor) accepts, and the processor refused it.
    if width >= height:
        return max_side, max(1, math.ceil(height * scale))
    return max(1, math.ceil(width * scale)), max_side


def _fit(img: Image.Image, max_side: int) -> Image.Image:
    target = _fitted_size(img.size, max_side)
    if target == img.size:
        return img
    return img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


class DecodedImageCache:
    """A small thread-safe LRU of decoded images keyed by sha256(data) and the limits used.

    The same picture sent by many requests at once is decoded once: concurrent misses for one
    key wait on a per-key lock. Failures are not cached. Returned images are shared between
    callers: treat them as read-only (PIL operations return new images).
    """

    def __init__(self, max_entries: int = 32, max_total_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_total_bytes = max_total_bytes
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[bytes, ImageLimits], Image.Image] = OrderedDict()
        self._total_bytes = 0
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[bytes, ImageLimits], threading.Lock] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get_or_decode(self, data: bytes, limits: ImageLimits) -> Image.Image:
        key = (hashlib.sha256(data).digest(), limits)
        with self._lock:
            image = self._lookup(key)
            if image is not None:
                return image
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                image = self._lookup(key)
                if image is not None:
                    return image
                self.misses += 1
            try:
                image = decode_image(data, limits)
            except BaseException:
                with self._lock:
                    self._key_locks.pop(key, None)
                raise
            with self._lock:  # store and retire the key lock together: no window for a re-decode
                self._store(key, image)
                self._key_locks.pop(key, None)
            return image

    def _lookup(self, key: tuple[bytes, ImageLimits]) -> Image.Image | None:
        image = self._items.get(key)
        if image is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return image

    def _store(self, key: tuple[bytes, ImageLimits], image: Image.Image) -> None:
        size = _image_bytes(image)
        if size > self.max_total_bytes or key in self._items:
            return
        self._items[key] = image
        self._total_bytes += size
        while len(self._items) > self.max_entries or self._total_bytes > self.max_total_bytes:
            _, evicted = self._items.popitem(last=False)
            self._total_bytes -= _image_bytes(evicted)


def _image_bytes(image: Image.Image) -> int:
    width, height = image.size
    return width * height * len(image.getbands())


@dataclass(frozen=True)
class MergerFit:
    """What a Pixtral-processed image needs for a patch merger (spatial_merge_size x
    spatial_merge_size patches into one token), which breaks in transformers' own code on a grid
    under that many patches a side (a 500 for the request). `min_side`: pixels a side before the
    processor, which keeps small images small (Mistral 3 failed on a 1x1 pixel). Long thin images:
    a processor that scales to `longest_edge` and rounds each side up to whole patches, not merged
    ones (LightOnOCR's, unlike Mistral 3's), can leave a grid one patch high; such images are found
    in the processor's own output sizes and stretched just enough (`stretch`)."""

    min_side: int
    merged_patch: int  # pixels a side of the processed grid the merger needs
    scaled_side: int  # pixels a side must keep after the processor's scaling
    longest_edge: int | None

    def fit_small(self, images: list) -> list:
        return [enlarged_to(image, self.min_side) for image in images]

    def too_thin(self, processed: Mapping[str, Any]) -> list[int]:
        """Indices of the images whose processed grid (`image_sizes`, height and width) is under
        the merger's two patches a side."""
        sizes = processed.get("image_sizes")
        if sizes is None or not hasattr(sizes, "tolist"):
            return []
        return [i for i, size in enumerate(sizes.tolist()) if min(size) < self.merged_patch]

    def stretch(self, images: list, indices: list[int]) -> list:
        """The images at `indices` with their short side stretched so that the processor's
        scaling to `longest_edge` (floor(side / (long side / longest_edge)), in floating point)
        leaves more than `scaled_side` pixels: one pixel over the exact bound absorbs the
        rounding, which at exact multiples landed one below."""
        stretched = list(images)
        for i in indices:
            long = max(images[i].size)
            edge = self.longest_edge if self.longest_edge and long > self.longest_edge else long
            stretched[i] = enlarged_to(images[i], math.ceil(self.scaled_side * long / edge) + 1)
        return stretched


def stretch_warnings(sent: list, used: list) -> list[str]:
    """One warning per image the model got in another size than decoded."""
    return [
        f"image {i + 1} ({a.width}x{a.height} after decoding) was stretched to {b.width}x{b.height}: "
        "this model's patch merger cannot take a thinner image"
        for i, (a, b) in enumerate(zip(sent, used, strict=True))
        if a.size != b.size
    ]


def merger_fit(config, processor) -> MergerFit | None:
    merge = getattr(config, "spatial_merge_size", None)
    image_processor = getattr(processor, "image_processor", None)
    if not isinstance(merge, int) or merge < 2 or not type(image_processor).__name__.startswith("Pixtral"):
        return None
    patch = _largest_side(getattr(image_processor, "patch_size", None))
    if not isinstance(patch, int) or patch <= 0:
        return None
    size = getattr(image_processor, "size", None)
    longest = size.get("longest_edge") if isinstance(size, Mapping) else getattr(size, "longest_edge", None)
    return MergerFit(
        min_side=patch * merge + 1,
        merged_patch=patch * merge,
        scaled_side=(merge - 1) * patch + 1,
        longest_edge=longest if isinstance(longest, int) and longest > 0 else None,
    )


def _largest_side(size):
    if isinstance(size, Mapping):
        return max(size.get("height") or 0, size.get("width") or 0)
    if size is not None and not isinstance(size, int):  # transformers' SizeDict
        return max(getattr(size, "height", None) or 0, getattr(size, "width", None) or 0)
    return size


def enlarged_to(image, side: int):
    width, height = image.size
    if width >= side and height >= side:
        return image
    return image.resize((max(width, side), max(height, side)), Image.Resampling.BICUBIC)


def image_inputs_digest(inputs: Mapping[str, Any], num_tokens: int | None = None) -> bytes:
    """What the model sees of the images (pixel values, sizes, grids), hashed: equal digests mean
    equal image inputs, so their keys and values can be shared.

    Integer tensors with one entry per prompt token (`mm_token_type_ids` of Qwen2-VL and GLM-4V,
    Gemma 3's `token_type_ids`, Mllama's `cross_attention_mask`) are left out: they follow from the token ids, which the cache keys
    hold already, and hashing them made the digest change with every word after the image, so no
    later turn of a chat found the blocks from its image on."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        value = inputs[name]
        if (
            num_tokens is not None
            and hasattr(value, "detach")
            and value.ndim >= 2
            and tuple(value.shape[:2]) == (1, num_tokens)
            and not value.is_floating_point()
        ):
            continue
        digest.update(name.encode())
        if hasattr(value, "detach"):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.digest()
