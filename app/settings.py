"""Server settings: one frozen object, parsed and validated once from the environment.

This is the only module that reads environment variables. `entrypoint.py` writes its CLI flags into
the environment under the names below (CLI > env > default), and the app calls
`Settings.from_env()` once at startup and passes the result down.

Rules worth knowing:
- An empty value is the same as an unset variable.
- Booleans accept 1/0, true/false, yes/no, on/off (any case).
- Aliases: MODEL_ID for MODEL_PATH, MAX_CONTEXT_TOKENS for MAX_INPUT_TOKENS, HUGGING_FACE_HUB_TOKEN
  for HF_TOKEN. The first name listed wins when both are set.
- GPU_IDS overrides GPU_COUNT; both are kept so the device layer can say what it ignored.
- DEBUG=true implies LOG_LEVEL=debug unless LOG_LEVEL is set explicitly.
- CACHE_DIR falls back to HF_HUB_CACHE, then HF_HOME/hub, so the HF variables the spec documents
  keep working; the entrypoint then points HF_HUB_CACHE at the result.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import msgspec

__all__ = ["ENV_NAMES", "Settings", "SettingsError"]

MiB = 1024 * 1024
DEFAULT_CACHE_DIR = os.path.expanduser("~/.cache/usinc/models")

AttnImpl = Literal["flash_attention_2", "sdpa", "eager"]
DType = Literal["bf16", "fp16", "fp32"]
Device = Literal["auto", "cuda", "cpu"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class SettingsError(ValueError):
    """A setting has an invalid value. `name` is the environment variable that carried it."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"invalid {name}: {message}")
        self.name = name
        self.message = message


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # Model
    model_path: str = "builtin:tiny-vlm"  # local folder, hub id, or builtin:<name> demo model
    model_name: str = "model"  # the name clients must send; also shown in /v1/models and the docs
    model_revision: str | None = None
    trust_remote_code: bool = True
    hf_token: str | None = None
    cache_dir: str = DEFAULT_CACHE_DIR
    transformers_path: str | None = None  # pip-installed by the entrypoint before the server starts

    # Attention / compute
    attn_impl: AttnImpl = "flash_attention_2"
    attn_strict: bool = False  # no fallback: startup fails if attn_impl is unavailable
    dtype: DType = "bf16"

    # Devices: gpu_ids, when set, wins over gpu_count; gpu_count None means 1 if any GPU is visible.
    gpu_ids: tuple[int, ...] | None = None
    gpu_count: int | None = None
    device: Device = "auto"
    cpu_replicas: int = 1  # replicas when running on CPU (lets routing be exercised without GPUs)
    cpu_packed_linears: bool = True  # oneDNN pre-packed linear weights on CPU (~1.7x faster decode)

    # Batching, limits, backpressure
    max_batch_size: int = 32
    batch_timeout_ms: float = 0.0
    # Prompt tokens prefilled per scheduler step, so running streams keep flowing; 0 = auto
    # (128 on CPU, where it halved median TTFT for -11% throughput; 2048 on GPUs).
    max_prefill_tokens: int = 0
    max_input_tokens: int = 16384
    default_max_tokens: int = 128
    max_queue_size: int = 256
    kv_cache_max_gib: float = 0.0  # the paged KV pool per replica; 0 = auto from free memory
    kv_cache_gpu_fraction: float = 0.9  # auto pool on GPU: this share of the memory free after loading
    kv_block_size: int = 0  # tokens per KV block; 0 = auto (16; 256 with FlashAttention's paged kernels)
    enable_prefix_caching: bool = True

    # Generation defaults (used when a request leaves the field out)
    default_do_sample: bool = True
    default_temperature: float = 0.8
    default_top_p: float = 0.9
    default_seed: int | None = 42
    default_top_k: int = 0  # 0 = off
    default_min_p: float = 0.0
    default_repetition_penalty: float = 1.0

    # Server process
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: LogLevel = "info"
    progress_logs: bool = False
    fast_usage: bool = True
    redact_source: bool = True
    debug: bool = False
    api_key: str | None = None
    max_request_body_bytes: int = 64 * MiB
    shutdown_grace_s: float = 30.0  # time in-flight requests get to finish after SIGTERM

    # Images
    max_images_per_request: int = 10
    max_image_size: int = 1024  # longest side in pixels; larger images are resized down
    max_image_bytes: int = 20 * MiB  # encoded bytes per image
    max_image_pixels: int = 50_000_000  # decoded width*height, checked from the header before decoding
    allow_remote_images: bool = True
    image_url_allowed_hosts: tuple[str, ...] = ()  # empty = any public host
    allow_private_image_urls: bool = False
    image_url_allowed_networks: tuple[str, ...] = ()  # CIDRs reachable although private (e.g. an internal store)
    image_fetch_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse and validate settings; raises SettingsError naming the offending variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for var in _VARS:
            found = _lookup(env, var.names)
            if found is None:
                continue
            name, raw = found
            try:
                values[var.field] = var.parse(raw)
            except ValueError as exc:
                raise SettingsError(name, str(exc)) from None

        if "cache_dir" not in values:
            values["cache_dir"] = _hf_cache_dir(env)
        if values.get("debug") and "log_level" not in values:
            values["log_level"] = "debug"
        return cls(**values)

    def redacted_dict(self) -> dict[str, Any]:
        """Settings safe to log or serve: secrets dropped, model source hidden when redact_source."""
        data = msgspec.structs.asdict(self)
        data["auth_enabled"] = data.pop("api_key") is not None
        data["hf_token_set"] = data.pop("hf_token") is not None
        if self.redact_source:
            for key in ("model_path", "model_revision", "cache_dir", "transformers_path"):
                if data[key] is not None:
                    data[key] = "<redacted>"
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data


# ---------------------------------------------------------------------------------------------
# Parsers: each takes the stripped raw string and returns the value or raises ValueError(message).
# Messages start with the offending value so the caller can prefix the variable name.


def _show(raw: str) -> str:
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


_INT_RE = re.compile(r"[+-]?\d+")


def _parse_int(raw: str) -> int:
    if not _INT_RE.fullmatch(raw):
        raise ValueError(f"{_show(raw)} (expected an integer)")
    return int(raw)


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _parse_int(raw)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{_show(raw)} (expected {_range(lo, hi)})")
        return value

    return parse


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{_show(raw)} (expected a number)") from None
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        if not math.isfinite(value) or too_low or (hi is not None and value > hi):
            raise ValueError(f"{_show(raw)} (expected {_range(lo, hi, lo_open)})")
        return value

    return parse


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{lo} {'<' if lo_open else '<='} value <= {hi}"
    if lo is not None:
        return f"a number {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"a number <= {hi}"
    return "a finite number"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{_show(raw)} (expected true/false, 1/0, yes/no or on/off)")


def _choice(choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> Callable[[str], str]:
    aliases = aliases or {}

    def parse(raw: str) -> str:
        lowered = raw.lower()
        value = aliases.get(lowered, lowered)
        if value not in choices:
            raise ValueError(f"{_show(raw)} (choose {', '.join(choices)})")
        return value

    return parse


def _text(raw: str) -> str:
    return raw


def _api_key(raw: str) -> str | None:
    # "EMPTY" is the OpenAI-client convention for "no key"; auth stays off.
    return None if raw == "EMPTY" else raw


def _seed(raw: str) -> int | None:
    if raw.lower() in {"none", "random"}:
        return None
    value = _parse_int(raw)
    if not 0 <= value < 2**64:
        raise ValueError(f"{_show(raw)} (expected 0 <= seed < 2**64, or 'none' for a random seed)")
    return value


def _gpu_ids(raw: str) -> tuple[int, ...]:
    parts = [part.strip() for part in raw.split(",")]
    if any(not part.isdigit() for part in parts):
        raise ValueError(f"{_show(raw)} (expected comma-separated non-negative integers, e.g. 0,1)")
    ids = tuple(int(part) for part in parts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{_show(raw)} (duplicate GPU id)")
    return ids


def _hosts(raw: str) -> tuple[str, ...]:
    hosts = (part.strip().lower().rstrip(".") for part in raw.split(","))
    return tuple(dict.fromkeys(host for host in hosts if host))


def _prefill_budget(raw: str) -> int:
    value = _parse_int(raw)
    if value != 0 and value < 16:
        raise ValueError(f"{_show(raw)} is out of range (0 = auto, or >= 16)")
    return value


def _networks(raw: str) -> tuple[str, ...]:
    import ipaddress

    networks = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            networks.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{_show(part)} is not an IP network (e.g. 10.20.0.0/16)") from None
    return tuple(dict.fromkeys(networks))


class _Var(NamedTuple):
    field: str
    names: tuple[str, ...]  # the first name is canonical; the rest are accepted aliases
    parse: Callable[[str], Any]


_VARS: tuple[_Var, ...] = (
    _Var("model_path", ("MODEL_PATH", "MODEL_ID"), _text),
    _Var("model_name", ("MODEL_NAME",), _text),
    _Var("model_revision", ("MODEL_REVISION",), _text),
    _Var("trust_remote_code", ("TRUST_REMOTE_CODE",), _bool),
    _Var("hf_token", ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), _text),
    _Var("cache_dir", ("CACHE_DIR",), _text),
    _Var("transformers_path", ("TRANSFORMERS_INSTALL_PATH",), _text),
    _Var("attn_impl", ("ATTN_IMPL",), _choice(("flash_attention_2", "sdpa", "eager"))),
    _Var("attn_strict", ("ATTN_STRICT",), _bool),
    _Var(
        "dtype",
        ("DTYPE",),
        _choice(
            ("bf16", "fp16", "fp32"),
            {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"},
        ),
    ),
    _Var("gpu_ids", ("GPU_IDS",), _gpu_ids),
    _Var("gpu_count", ("GPU_COUNT",), _int(1)),
    _Var("device", ("DEVICE",), _choice(("auto", "cuda", "cpu"))),
    _Var("cpu_replicas", ("CPU_REPLICAS",), _int(1, 16)),
    _Var("cpu_packed_linears", ("CPU_PACKED_LINEARS",), _bool),
    _Var("max_batch_size", ("MAX_BATCH_SIZE",), _int(1, 1024)),
    _Var("batch_timeout_ms", ("BATCH_TIMEOUT_MS",), _float(0, 1000)),
    _Var("max_prefill_tokens", ("MAX_PREFILL_TOKENS",), _prefill_budget),
    _Var("max_input_tokens", ("MAX_INPUT_TOKENS", "MAX_CONTEXT_TOKENS"), _int(1)),
    _Var("default_max_tokens", ("MAX_NEW_TOKENS_DEFAULT",), _int(1)),
    _Var("kv_cache_max_gib", ("KV_CACHE_MAX_GIB",), _float(0, None)),
    _Var("kv_cache_gpu_fraction", ("KV_CACHE_GPU_FRACTION",), _float(0, 1, lo_open=True)),
    _Var("kv_block_size", ("KV_BLOCK_SIZE",), _int(0, 4096)),
    _Var("enable_prefix_caching", ("ENABLE_PREFIX_CACHING",), _bool),
    _Var("max_queue_size", ("MAX_QUEUE_SIZE",), _int(1)),
    _Var("default_do_sample", ("DO_SAMPLE_DEFAULT",), _bool),
    _Var("default_temperature", ("TEMPERATURE_DEFAULT",), _float(0, 2)),
    _Var("default_top_p", ("TOP_P_DEFAULT",), _float(0, 1, lo_open=True)),
    _Var("default_seed", ("SEED_DEFAULT",), _seed),
    _Var("default_top_k", ("TOP_K_DEFAULT",), _int(0)),
    _Var("default_min_p", ("MIN_P_DEFAULT",), _float(0, 1)),
    _Var("default_repetition_penalty", ("REPETITION_PENALTY_DEFAULT",), _float(0, None, lo_open=True)),
    _Var("host", ("HOST",), _text),
    _Var("port", ("PORT",), _int(1, 65535)),
    _Var(
        "log_level",
        ("LOG_LEVEL",),
        _choice(("critical", "error", "warning", "info", "debug", "trace"), {"warn": "warning"}),
    ),
    _Var("progress_logs", ("PROGRESS_LOGS",), _bool),
    _Var("fast_usage", ("FAST_USAGE",), _bool),
    _Var("redact_source", ("REDACT_SOURCE",), _bool),
    _Var("debug", ("DEBUG",), _bool),
    _Var("api_key", ("API_KEY",), _api_key),
    _Var("max_request_body_bytes", ("MAX_REQUEST_BODY_BYTES",), _int(1024)),
    _Var("shutdown_grace_s", ("SHUTDOWN_GRACE_S",), _float(0, 3600)),
    _Var("max_images_per_request", ("MAX_IMAGES_PER_REQUEST",), _int(0)),  # 0 = text only
    _Var("max_image_size", ("MAX_IMAGE_SIZE",), _int(16)),
    _Var("max_image_bytes", ("MAX_IMAGE_BYTES",), _int(1)),
    _Var("max_image_pixels", ("MAX_IMAGE_PIXELS",), _int(1)),
    _Var("allow_remote_images", ("ALLOW_REMOTE_IMAGES",), _bool),
    _Var("image_url_allowed_hosts", ("IMAGE_URL_ALLOWED_HOSTS",), _hosts),
    _Var("allow_private_image_urls", ("ALLOW_PRIVATE_IMAGE_URLS",), _bool),
    _Var("image_url_allowed_networks", ("IMAGE_URL_ALLOWED_NETWORKS",), _networks),
    _Var("image_fetch_timeout_s", ("IMAGE_FETCH_TIMEOUT_S",), _float(0, 300, lo_open=True)),
)

# Field name -> environment variable names (canonical first). The entrypoint builds its help from this.
ENV_NAMES: Mapping[str, tuple[str, ...]] = {var.field: var.names for var in _VARS}


def _lookup(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            return name, raw
    return None


def _hf_cache_dir(env: Mapping[str, str]) -> str:
    # Without CACHE_DIR, honour the HF variables the spec tells operators to set.
    hub_cache = env.get("HF_HUB_CACHE", "").strip()
    if hub_cache:
        return hub_cache
    hf_home = env.get("HF_HOME", "").strip()
    if hf_home:
        return os.path.join(hf_home, "hub")
    return DEFAULT_CACHE_DIR
