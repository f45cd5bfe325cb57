"""Running a model's processor on a prompt's text and decoded images: in the list shape it takes,
with a retry for images too small for it, and a 400 that names the image when it cannot take them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from models.errors import InvalidRequestError
from models.images import DecodedImageCache, ImageLimits, MergerFit, enlarged_to, stretch_warnings
from models.template_messages import short_error

log = logging.getLogger(__name__)

# The side an image is enlarged to when its processor failed on it and a side was shorter.
RETRY_MIN_SIDE = 32


def process_images(
    processor, text: str, images: list, *, special: bool, one_list: bool, params: Sequence[str]
) -> tuple[dict, list[str]]:
    """The processor's outputs for `text` and `images`, and warnings for the client. `one_list`:
    the processor takes a prompt's images as one list whatever its kind (PaliGemma's). `params`:
    the request field of each image, for errors."""
    try:
        return _run(processor, text, images, special, one_list), []
    except Exception as exc:
        log.debug("processor failed", exc_info=True)
        failure = exc
    # Some processors divide by an image's scaled height (Idefics2's splitting fails on a
    # 1-pixel-high line or a tracking pixel): such images are answered enlarged, and said so.
    small = [i for i, image in enumerate(images) if min(image.size) < RETRY_MIN_SIDE]
    if small:
        try:
            batch = _run(
                processor, text, [enlarged_to(im, RETRY_MIN_SIDE) for im in images], special, one_list
            )
        except Exception:
            log.debug("processor failed on the enlarged images too", exc_info=True)
        else:
            return batch, [
                f"{len(small)} image(s) with a side under {RETRY_MIN_SIDE} pixels were enlarged to "
                f"at least {RETRY_MIN_SIDE} pixels a side: this model's image processor could not take them"
            ]
    # The processor's own words are often transformers' internals (a SizeDict repr, a bare
    # "division by zero"): the client gets a plain account first, and them clipped.
    log.info("image processor failed: %s", short_error(failure))
    blamed = small if small else range(len(images))
    param = params[blamed[0]] if len(blamed) == 1 and blamed[0] < len(params) else "messages"
    sizes = ", ".join(f"{w}x{h}" for w, h in (image.size for image in images))
    raise InvalidRequestError(
        f"the images could not be prepared for this model: its image processor failed on them (sizes "
        f"after decoding: {sizes}; an extreme size or aspect ratio is a common cause); the processor "
        f"said: {short_error(failure)[:160]}",
        param=param,
    ) from None


def _run(processor, text: str, images: list, special: bool, one_list: bool):
    if one_list or not _nests_images(processor):
        return _call(processor, text, [images] if one_list else images, special)
    # A prompt's images as one list, as transformers' apply_chat_template hands them:
    # LLaVA-OneVision reads a flat list as one image per prompt and tiles each at full
    # resolution, where a prompt of several images takes each at base resolution only. A few
    # processors refuse nested lists (GOT-OCR2 outside its multi-page mode): flat for them.
    try:
        return _call(processor, text, [images], special)
    except Exception as nested:
        try:
            return _call(processor, text, images, special)
        except Exception:
            raise nested from None


def _call(processor, text: str, images: list, special: bool):
    try:
        return processor(text=[text], images=images, return_tensors="pt", add_special_tokens=special)
    except TypeError as exc:
        # Some remote-code processors take no tokenizer options at all (Phi-3-vision's, for one).
        if "add_special_tokens" not in str(exc):
            raise
        return processor(text=[text], images=images, return_tensors="pt")


def _nests_images(processor) -> bool:
    """transformers' own processors take images nested per prompt; remote-code ones keep the flat
    list their model cards pass (Phi-3-vision's reads every item as an image)."""
    return any(cls.__module__.startswith("transformers.models.") for cls in type(processor).__mro__)


def process_fitted(
    merger: MergerFit | None,
    images: list,
    process: Callable[[list], tuple[dict, list[str]]],
    params: Sequence[str],
) -> tuple[dict, list[str], list]:
    """`process(images)` for a model with a patch merger: small images enlarged first, and images
    whose processed grid came out too thin for the merger stretched and processed again (a 400
    naming the image if even that fails). The outputs, the warnings (stretches first) and the
    images as processed."""
    if merger is None:
        return *process(images), images
    used = merger.fit_small(images)
    batch, warnings = process(used)
    thin = merger.too_thin(batch)
    if thin:
        used = merger.stretch(used, thin)
        batch, warnings = process(used)
        still = merger.too_thin(batch)
        if still:
            raise InvalidRequestError(
                "an image is too thin for this model's patch merger even stretched; send it with a "
                "less extreme aspect ratio",
                param=params[still[0]] if still[0] < len(params) else "messages",
            )
    return batch, [*stretch_warnings(images, used), *warnings], used


def decode_images(
    cache: DecodedImageCache,
    images: Sequence[bytes],
    params: Sequence[str],
    max_sides: Sequence[int | None],
    limits: ImageLimits,
) -> list:
    """Each image decoded (through the cache) within `limits`, a request's own smaller side limit
    where it set one (`detail: low`); a failure names the image's field."""
    decoded = []
    for index, data in enumerate(images):
        side = max_sides[index] if index < len(max_sides) else None
        own = replace(limits, max_side=side) if side is not None and side < limits.max_side else limits
        try:
            decoded.append(cache.get_or_decode(data, own))
        except InvalidRequestError as exc:
            exc.param = params[index] if index < len(params) else exc.param
            raise
    return decoded
