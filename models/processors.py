"""Vision-language processors for images only, for machines without torchvision.

transformers cannot build a processor that has a video processor unless torchvision is installed
(not even to process images), and the torchvision wheel the package index holds for the pinned
torch (0.28.0) does not import with this project's CPU torch build ("operator torchvision::nms does
not exist", checked 2026-12-03). The server takes no video: the image and text halves suffice. So
the processor is built without its video half, and where its module imports a helper of the
torchvision image processor's (Pixtral), the PIL image processor's identical helper stands in.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import types
from typing import Any

from transformers import PreTrainedConfig, ProcessorMixin

logger = logging.getLogger(__name__)


def images_only_processor_class(processor_class: type) -> type:
    """`processor_class` without its video processor. transformers cannot build a processor that has
    a video half without torchvision (not even for images: its class check needs the video base
    class); the server takes no video, so the image and text halves are all it needs."""
    attributes = [name for name in processor_class.get_attributes() if name != "video_processor"]
    namespace = {
        "get_attributes": classmethod(lambda cls: list(attributes)),
        "video_processor": None,
        "__module__": __name__,
    }
    init = processor_class.__init__
    code = init.__code__
    positional = code.co_varnames[: code.co_argcount]
    defaults = init.__defaults__ or ()
    first_default = len(positional) - len(defaults)
    if "video_processor" in positional and positional.index("video_processor") < first_default:
        # SmolVLM takes its video processor as a required argument. Give it a default of None on
        # a copy of the same function: transformers routes saved options by the code object's
        # argument names, so a wrapper with (*args, **kwargs) would silently drop them.
        missing = first_default - positional.index("video_processor")
        copy_ = types.FunctionType(
            code, init.__globals__, init.__name__, (None,) * missing + defaults, init.__closure__
        )
        copy_.__kwdefaults__ = init.__kwdefaults__
        namespace["__init__"] = copy_
    arguments = list(positional[1:])  # without self
    if "video_processor" in arguments:
        slot = arguments.index("video_processor")
        if any(arguments.index(name) > slot for name in attributes if name in arguments):
            namespace["_video_slot"] = slot
    return type(processor_class.__name__, (processor_class, _WithoutVideoKeyword), namespace)


class _WithoutVideoKeyword(ProcessorMixin):
    """Sits between a processor class and ProcessorMixin in the images-only class's MRO: Gemma 4's
    __init__ hands `video_processor=None` on to ProcessorMixin by keyword, which refuses a keyword
    that is not one of the (now video-less) attributes.

    Where __init__ takes the video processor before the other halves (LLaVA-NeXT-Video,
    InstructBLIP-Video, PerceptionLM: `(video_processor, image_processor, tokenizer)`),
    transformers passes the halves positionally in attribute order, so without the video one the
    image processor landed in its slot and the tokenizer was None: a None is put in the slot on
    the way in, and taken out again on the way to ProcessorMixin."""

    _video_slot: int | None = None  # __init__'s positional index of video_processor, when it comes first

    @classmethod
    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        slot = cls._video_slot
        if slot is not None and len(args) >= slot:
            args = [*args[:slot], None, *args[slot:]]
        return super().from_args_and_dict(args, processor_dict, **kwargs)

    def __init__(self, *args, **kwargs):
        if kwargs.get("video_processor", False) is None:
            del kwargs["video_processor"]
        slot = self._video_slot
        if slot is not None and len(args) > slot and args[slot] is None:
            args = args[:slot] + args[slot + 1 :]
        super().__init__(*args, **kwargs)


# Processors whose module imports a helper from the torchvision image processor's module, the PIL
# twin of which defines the same helper: class -> (its module, the torchvision module, the PIL
# twin, the helpers). PixtralProcessor (Mistral 3, Pixtral) imports its resize rule so: without a
# stand-in its module cannot be imported, and transformers hands out a placeholder instead.
_TORCHVISION_HELPERS = {
    "PixtralProcessor": (
        "transformers.models.pixtral.processing_pixtral",
        "transformers.models.pixtral.image_processing_pixtral",
        "transformers.models.pixtral.image_processing_pil_pixtral",
        ("get_resize_output_image_size",),
    ),
}


def processor_class(name: str) -> type | None:
    """The processor class `name` as transformers resolves it, or, for those above, imported from
    its own module after a module holding the PIL twin's helpers is put where the torchvision one
    is looked for (only ever without torchvision: the real module could not be imported anyway)."""
    from transformers.models.auto.processing_auto import processor_class_from_name

    entry = _TORCHVISION_HELPERS.get(name)
    if entry is None:
        return processor_class_from_name(name)
    module, torchvision_module, twin, helpers = entry
    if torchvision_module not in sys.modules:
        source = importlib.import_module(twin)
        stand_in = types.ModuleType(torchvision_module, f"{twin}'s helpers (models.processors)")
        for helper in helpers:
            setattr(stand_in, helper, getattr(source, helper))
        sys.modules[torchvision_module] = stand_in
    return getattr(importlib.import_module(module), name)


def images_only_processor(
    path: str, config: PreTrainedConfig, hub_kwargs: dict[str, Any]
) -> ProcessorMixin | None:
    """The checkpoint's processor loaded for images only, when torchvision is missing: without its
    video processor where it has one (Qwen2-VL, Qwen2.5-VL, InternVL, LLaVA-OneVision, Gemma 4,
    ...), with the PIL twins' helpers where its module imports the torchvision image processor's
    (Pixtral); None otherwise."""
    if importlib.util.find_spec("torchvision") is not None:
        return None
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    # The class the checkpoint names comes first, as AutoProcessor would take it (pixtral-12b is a
    # `llava` model with a PixtralProcessor), then the model type's, as before.
    names = [
        _saved_processor_class(path, hub_kwargs),
        PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None)),
    ]
    try:
        found = next(filter(None, (_processor_subclass(name) for name in names)), None)
        if found is None:
            return None
        if "video_processor" in found.get_attributes():
            found = images_only_processor_class(found)
        return found.from_pretrained(path, **hub_kwargs)
    except Exception:  # the original error is the one worth reporting
        logger.debug("images-only processor fallback failed", exc_info=True)
        return None


def _processor_subclass(name: str | None) -> type | None:
    """The processor class `name` resolves to, or None (no name, unknown, a placeholder)."""
    if not isinstance(name, str):
        return None
    try:
        found = processor_class(name)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) and issubclass(found, ProcessorMixin) else None


def _saved_processor_class(path: str, hub_kwargs: dict[str, Any]) -> str | None:
    """The `processor_class` the checkpoint's processor or tokenizer config names, if any."""
    from transformers.utils import cached_file

    where = {key: hub_kwargs[key] for key in ("revision", "token", "cache_dir") if key in hub_kwargs}
    for filename in ("processor_config.json", "tokenizer_config.json"):
        try:
            resolved = cached_file(
                path,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **where,
            )
            if resolved:
                with open(resolved, encoding="utf-8") as file:
                    name = json.load(file).get("processor_class")
                if isinstance(name, str) and name:
                    return name
        except (OSError, ValueError, AttributeError):  # unreadable: the model type's processor, as before
            continue
    return None
