"""Load a Hugging Face model (text or vision-language) for serving.

`load_model` turns a `LoadSpec` into a `LoadedModel`: it resolves the source (local folder, hub id
or `builtin:*`), decides text vs vision-language from the config, picks the dtype and the attention
implementation with fallbacks (flash_attention_2 -> sdpa -> eager), and runs one warmup forward pass
so that a broken model fails at startup instead of on the first request. Every choice is kept as a
human-readable line in `LoadedModel.decisions` and logged.

No process-global torch state is touched: several replicas load in parallel threads.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from models import model_facts
from models.devices import placement_devices, weight_placement
from models.download import bound_hub_requests, download_progress, hub_folder, still_loading
from models.load_choices import (  # noqa: F401 - strict_attention_problem is the entrypoint's
    ATTN_IMPLS,
    DTYPE_NAMES,
    DTYPES,
    attention_unavailable,
    pick_dtype,
    strict_attention_problem,
)
from models.processors import images_only_processor
from models.tiny import BUILTIN_MODELS, ensure_builtin

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


class ModelLoadError(Exception):
    """The model cannot be loaded as configured; the message is one line, safe to log."""


@dataclass(frozen=True)
class LoadSpec:
    source: str  # local dir, hub id, or "builtin:tiny" / "builtin:tiny-vlm"
    revision: str | None = None
    trust_remote_code: bool = True
    token: str | None = None
    cache_dir: str | None = None  # hub cache (HF_HUB_CACHE) and builtin build dir
    dtype: str = "bf16"  # "bf16" | "fp16" | "fp32"
    attn_impl: str = "flash_attention_2"  # | "sdpa" | "eager"
    attn_strict: bool = False
    device: str = "cpu"  # "cpu", "cuda:N", or GPUs joined by "+" for one replica over several
    redact_source: bool = True  # logs never show the path/hub id when true
    progress: bool = False  # the seed's `[startup][device] ...` step lines (PROGRESS_LOGS)
    chat_template: str | None = None  # CHAT_TEMPLATE: replaces the checkpoint's (or supplies one)


def startup_step(spec: LoadSpec, text: str) -> None:
    """One of the seed's per-device startup lines, when PROGRESS_LOGS asks for them."""
    if spec.progress:
        logger.info("[startup][%s] %s", spec.device, text)


@dataclass
class LoadedModel:
    model: PreTrainedModel  # eval(), requires_grad off, on `device`
    tokenizer: PreTrainedTokenizerBase
    processor: ProcessorMixin | None  # vision-language models only
    is_vision: bool
    dtype: torch.dtype  # what was actually used
    attn_impl: str  # what was actually used
    device: torch.device
    max_context: int
    eos_token_ids: frozenset[int]
    chat_template: str | None
    image_token_id: int | None
    decisions: tuple[str, ...]
    devices: tuple[torch.device, ...] = ()  # every device holding weights; `device` is the first
    # The checkpoint's named "tool_use" template, for conversations with tools (None: there is none,
    # or --chat-template replaced the checkpoint's templates).
    tool_chat_template: str | None = None


def logit_count(model: PreTrainedModel) -> int:
    """How many logits the head produces per position (sampling tensors are this wide)."""
    embeddings = model.get_output_embeddings()
    if embeddings is not None and hasattr(embeddings, "weight"):
        return int(embeddings.weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)


def token_id_limit(loaded: LoadedModel) -> int:
    """The one valid token-id range a client may use (prompt ids, `logit_bias`, stop ids):
    `0..limit-1`, where the tokenizer can spell the id, the embedding table has a row for it and
    the head a logit. An id past the embedding table fails inside the model (on CUDA a device-side
    assert that poisons the replica), so anything outside is the client's error."""
    sizes = [len(loaded.tokenizer), logit_count(loaded.model)]
    try:
        inputs = loaded.model.get_input_embeddings()
    except NotImplementedError:  # remote-code models without the accessor
        inputs = None
    if inputs is not None and hasattr(inputs, "weight"):
        sizes.append(int(inputs.weight.shape[0]))
    return min(sizes)


def resolve_source(spec: LoadSpec) -> str:
    """A `builtin:<name>` source becomes the folder it is built into; anything else is unchanged."""
    if not spec.source.startswith(BUILTIN_PREFIX):
        return spec.source
    name = spec.source[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(
            f"unknown builtin model {name!r}; valid names: {', '.join(sorted(BUILTIN_MODELS))}"
        )
    try:
        return str(ensure_builtin(name, _builtin_cache_dir(spec)))
    except OSError as exc:
        raise ModelLoadError(f"could not build builtin model {name!r}: {exc}") from exc


def load_model(spec: LoadSpec) -> LoadedModel:
    """Load, place and warm up the model; raises ModelLoadError with a one-line reason. A hub id
    may be downloaded first: its progress is logged every few seconds (`models.download`) unless
    the source is redacted (`REDACT_SOURCE` hides download progress too)."""
    bound_hub_requests()
    with still_loading(spec.device):
        if spec.source.startswith(BUILTIN_PREFIX) or _looks_local(spec.source) or spec.redact_source:
            return _load_model(spec)
        with download_progress(hub_folder(spec.source, spec.cache_dir), spec.device):
            return _load_model(spec)


def _library_logs_to_root() -> None:
    """transformers prints through a handler of its own, in its own format ("[transformers] ..."):
    send its records to the process's handlers instead, so that every line has the server's
    format (JSON with LOG_FORMAT=json) and passes its source redaction."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def _load_model(spec: LoadSpec) -> LoadedModel:
    _library_logs_to_root()
    decisions: list[str] = []

    def decide(line: str, *, level: int = logging.INFO) -> None:
        decisions.append(line)
        logger.log(level, "model load: %s", line)

    display = _display(spec)
    logger.info("Loading model %s on %s", display, spec.device)
    requested_dtype = _parse_dtype(spec.dtype)
    if spec.attn_impl not in ATTN_IMPLS:
        raise ModelLoadError(
            f"invalid attention implementation {spec.attn_impl!r}; expected one of {ATTN_IMPLS}"
        )
    devices = tuple(_parse_device(name) for name in placement_devices(spec.device))
    device = devices[0]

    path = resolve_source(spec)
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise ModelLoadError(f"model folder {display} does not exist or is not a directory")
    if spec.revision and Path(path).expanduser().is_dir():
        # A revision picks a commit of a hub repository; a folder has only what is in it.
        decide("MODEL_REVISION ignored: the model is a local folder, not a hub id", level=logging.WARNING)
    hub_kwargs = dict(
        revision=spec.revision,
        token=spec.token,
        trust_remote_code=spec.trust_remote_code,
        cache_dir=spec.cache_dir,
    )
    with _errors_as_load_error("load model config", spec, path):
        config = AutoConfig.from_pretrained(path, **hub_kwargs)

    is_vision, why = _detect_vision(config)
    decide(f"kind={'vision-language' if is_vision else 'text'} ({why})")
    startup_step(spec, "Loading tokenizer…")
    tokenizer, processor = _load_tokenizer(path, is_vision, hub_kwargs, spec, config, decide)
    startup_step(spec, "Tokenizer ready")

    dtype, dtype_reason = pick_dtype(requested_dtype, device)
    decide(f"dtype={DTYPE_NAMES[dtype]} ({dtype_reason})")

    model_class = AutoModelForImageTextToText if is_vision else AutoModelForCausalLM

    def load(impl: str) -> PreTrainedModel:
        # On a GPU the weights stream straight to the device (a 70 GB model must not need 70 GB of
        # host RAM first); on CPU there is nowhere else to put them.
        try:
            model, loading = model_class.from_pretrained(
                path,
                config=copy.deepcopy(config),
                dtype=dtype,
                attn_implementation=impl,
                output_loading_info=True,
                **weight_placement(devices),
                **hub_kwargs,
            )
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            raise ModelLoadError(
                f"{_display(spec)} is not a model this server can generate with: transformers has no "
                f"{model_class.__name__} for its {type(config).__name__}"
            ) from None
        if (unfit := model_facts.weights_not_loaded(model, loading)) is not None:
            raise ModelLoadError(f"{_display(spec)}: {unfit}")
        if len(devices) == 1:
            model = model.to(device)
        model = model.eval().requires_grad_(False)
        startup_step(spec, "torch.compile=off")
        startup_step(spec, "Warmup…")
        _warmup(model, tokenizer, device)
        return model

    model, attn_impl = _load_with_attention_fallback(load, dtype, device, spec, path, decide)

    max_context, context_reason = model_facts.max_context(config, tokenizer)
    decide(f"max_context={max_context} ({context_reason})")
    eos_token_ids = model_facts.eos_token_ids(model, tokenizer)
    if not eos_token_ids:
        decide(
            "eos_token_ids=none (generation stops only on max_tokens or stop strings)", level=logging.WARNING
        )
    chat_template = spec.chat_template or model_facts.chat_template(tokenizer, processor)
    if spec.chat_template:
        decide("chat_template=from --chat-template")
    elif chat_template is None:
        decide(
            "chat_template=none (chat uses the model's own prompt format where known, else is refused: "
            "supply one with --chat-template)",
            level=logging.WARNING,
        )

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        is_vision=is_vision,
        dtype=dtype,
        attn_impl=attn_impl,
        device=device,
        max_context=max_context,
        eos_token_ids=eos_token_ids,
        chat_template=chat_template,
        tool_chat_template=None
        if spec.chat_template
        else model_facts.chat_template(tokenizer, processor, "tool_use"),
        image_token_id=model_facts.image_token_id(config, processor, tokenizer) if is_vision else None,
        decisions=tuple(decisions),
        devices=devices,
    )


# --- spec parsing ------------------------------------------------------------------------------


def _parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"invalid dtype {name!r}; expected one of {tuple(DTYPES)}")
    return DTYPES[name]


def _parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"invalid device {name!r}; expected 'cpu' or 'cuda:N'") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ModelLoadError(f"unsupported device {name!r}; expected 'cpu' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available")
    device = torch.device("cuda", device.index or 0)
    if device.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
        )
    return device


def _builtin_cache_dir(spec: LoadSpec) -> str:
    if spec.cache_dir:
        return spec.cache_dir
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _display(spec: LoadSpec) -> str:
    if spec.source.startswith(BUILTIN_PREFIX) or not spec.redact_source:
        return repr(spec.source)
    return "<redacted>"


def _looks_local(source: str) -> bool:
    # Hub ids are "name" or "org/name"; anything absolute, relative-marked or on disk is a folder.
    return os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)


@contextmanager
def _errors_as_load_error(what: str, spec: LoadSpec, path: str) -> Iterator[None]:
    """Turns any exception from transformers or the hub into a one-line ModelLoadError, path scrubbed."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not {what} for {_display(spec)}: {_scrub(exc, spec, path)}") from exc


def _scrub(exc: BaseException, spec: LoadSpec, path: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if spec.redact_source:
        for secret in sorted({spec.source, path}, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "<redacted>")
    if spec.token:
        text = text.replace(spec.token, "<token>")
    return text[:300]


# --- what kind of model ------------------------------------------------------------------------


def _detect_vision(config: PreTrainedConfig) -> tuple[bool, str]:
    if getattr(config, "vision_config", None) is not None:
        return True, "config has vision_config"
    model_type = getattr(config, "model_type", "")
    if (
        model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return True, f"model_type {model_type!r} is image-text-to-text"
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" not in auto_map and {
        "AutoModelForImageTextToText",
        "AutoModelForVision2Seq",
    } & set(auto_map):
        return True, "remote code registers an image-text-to-text model"
    return False, "no vision config"


def _load_tokenizer(
    path: str,
    is_vision: bool,
    hub_kwargs: dict[str, Any],
    spec: LoadSpec,
    config: PreTrainedConfig,
    decide: Callable[..., None],
) -> tuple[PreTrainedTokenizerBase, ProcessorMixin | None]:
    if not is_vision:
        with _errors_as_load_error("load tokenizer", spec, path):
            return AutoTokenizer.from_pretrained(path, **hub_kwargs), None
    with _errors_as_load_error("load processor", spec, path):
        try:
            processor = AutoProcessor.from_pretrained(path, **hub_kwargs)
        except Exception:
            processor = images_only_processor(path, config, hub_kwargs)
            if processor is None:
                raise
            decide(
                f"processor={type(processor).__name__} for images only (torchvision is not installed)",
                level=logging.WARNING,
            )
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"processor for {_display(spec)} lacks a tokenizer or an image processor")
    return tokenizer, processor


# --- dtype and attention -----------------------------------------------------------------------


def _load_with_attention_fallback(
    load: Callable[[str], PreTrainedModel],
    dtype: torch.dtype,
    device: torch.device,
    spec: LoadSpec,
    path: str,
    decide: Callable[..., None],
) -> tuple[PreTrainedModel, str]:
    """Try `load(impl)` down the chain from the requested implementation; strict mode tries only that one."""
    requested = spec.attn_impl
    candidates = (requested,) if spec.attn_strict else ATTN_IMPLS[ATTN_IMPLS.index(requested) :]
    failures: list[str] = []
    raised: list[str] = []  # what the loads that ran raised (not the kernels ruled out beforehand)
    for position, impl in enumerate(candidates):
        reason = attention_unavailable(impl, device, dtype)
        if reason is None:
            logger.info("Loading model (attn=%s, dtype=%s, device=%s)", impl, DTYPE_NAMES[dtype], device)
            startup_step(spec, f"Loading model (attn={impl}, dtype={DTYPE_NAMES[dtype]})")
            try:
                model = load(impl)
            except ModelLoadError:
                raise  # the model itself, not the attention kernel: no other one would load it
            except Exception as exc:  # noqa: BLE001 - a kernel may fail at load or at first forward
                if _checkpoint_fault(exc):
                    # Missing, truncated or corrupt weight files: every kernel would read them again
                    # (minutes each for a large model) and fail alike.
                    raise ModelLoadError(
                        f"the checkpoint's weights could not be read: {type(exc).__name__}: "
                        f"{_scrub(exc, spec, path)}"
                    ) from None
                reason = f"{type(exc).__name__}: {_scrub(exc, spec, path)}"
                raised.append(reason)
                _release_memory(device)
            else:
                actual = getattr(model.config, "_attn_implementation", None) or impl
                if actual == requested:
                    decide(f"attention={actual} (requested)")
                else:
                    why = "; ".join(failures) or "chosen by transformers"
                    decide(f"attention={actual} ({requested} requested; {why})", level=logging.WARNING)
                return model, actual
        if spec.attn_strict:
            raise ModelLoadError(f"attention {impl} unavailable and ATTN_STRICT is set ({reason})")
        failures.append(f"{impl}: {reason}")
        logger.warning("Attention %s unavailable (%s); falling back", impl, reason)
        if position + 1 < len(candidates):
            startup_step(spec, f"Falling back to {candidates[position + 1]} attention")
    if len(raised) > 1 and len(set(raised)) == 1:  # not the kernel's doing: the model, or its code
        raise ModelLoadError(f"the model fails alike with every attention implementation tried: {raised[0]}")
    raise ModelLoadError(
        f"could not load {_display(spec)} with any attention implementation: {'; '.join(failures)}"
    )


def _checkpoint_fault(exc: Exception) -> bool:
    """Whether loading failed on the weight files themselves (no kernel would read them better):
    none found (OSError), a damaged safetensors file, or tensors of other shapes than the config's."""
    return (
        isinstance(exc, OSError)
        or type(exc).__name__ == "SafetensorError"
        or (isinstance(exc, RuntimeError) and "size mismatch" in str(exc))
    )


def _release_memory(device: torch.device) -> None:
    # Free a failed attempt's weights before the next attempt allocates its own.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warmup(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> None:
    """One short text-only forward pass; raises when the model cannot run or yields non-finite logits."""
    ids = tokenizer.encode("Hello, world!", add_special_tokens=False)[:8] or [0]
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, seq]
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("warmup produced non-finite logits")
