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
- DEBUG=true implies LOG_LEVEL=debug and PROGRESS_LOGS=1 unless either is set explicitly (the
  spec: in DEBUG mode progress logs stay on, and `--progress false` still turns them off).
- CACHE_DIR falls back to HF_HUB_CACHE, then HF_HOME/hub, so the HF variables the spec documents
  keep working; the entrypoint then points HF_HUB_CACHE at the result.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from app import setting_parsers as P

__all__ = ["ENV_NAMES", "SETTINGS", "Setting", "Settings", "SettingsError"]

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


class Setting(NamedTuple):
    """How one Settings field is set, declared beside it: environment variable names (the first
    is canonical, the rest are accepted aliases), the parser (type and range), one line of help,
    and the CLI flags (none: environment only). The CLI, `--print-config`, the environment reading
    and the README table are all derived from these declarations."""

    env: tuple[str, ...]
    parse: P.Parser
    help: str
    flags: tuple[str, ...] = ()


def _s(env: str | tuple[str, ...], parse: P.Parser, help: str, *flags: str) -> Setting:
    return Setting((env,) if isinstance(env, str) else env, parse, help, flags)


_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


# One declaration per setting, kept compact: the formatter would spread each over ten lines.
# fmt: off
class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # Model
    model_path: Annotated[str, _s(
        ("MODEL_PATH", "MODEL_ID"), P.text,
        "Local folder, Hugging Face repo id, or builtin:<name>; --model-id is a backward-compatible alias",
        "--model-path", "--model-id",
    )] = "builtin:tiny-vlm"
    model_name: Annotated[str, _s(
        "MODEL_NAME", P.text, "Model name clients must send; shown by /v1/models and the docs", "--model-name",
    )] = "model"
    model_revision: Annotated[str | None, _s("MODEL_REVISION", P.text, "Hub branch, tag or commit to pin", "--revision")] = None
    chat_template: Annotated[str | None, _s(
        "CHAT_TEMPLATE", P.chat_template,
        "Jinja chat template replacing the model's; without it, a model with neither a template nor a "
        "prompt format of its own refuses chat (400)",
        "--chat-template",
    )] = None
    trust_remote_code: Annotated[bool, _s(
        "TRUST_REMOTE_CODE", P.boolean, "Allow custom modeling code from the repo", "--trust-remote-code",
    )] = True
    hf_token: Annotated[str | None, _s(
        ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), P.text, "Hub token for private or gated models",
    )] = None
    cache_dir: Annotated[str, _s(
        "CACHE_DIR", P.text, "Model download cache; sets HF_HUB_CACHE (when unset: HF_HUB_CACHE, then HF_HOME/hub)",
        "--cache-dir",
    )] = DEFAULT_CACHE_DIR
    transformers_path: Annotated[str | None, _s(
        "TRANSFORMERS_INSTALL_PATH", P.text, "pip install -U this path, URL or wheel of transformers before starting",
        "--transformers-path",
    )] = None

    # Attention / compute
    attn_impl: Annotated[AttnImpl, _s(
        "ATTN_IMPL", P.choice("flash_attention_2", "sdpa", "eager"), "Attention kernel; falls back to sdpa unless strict",
        "--attn-impl",
    )] = "flash_attention_2"
    attn_strict: Annotated[bool, _s(
        "ATTN_STRICT", P.boolean, "Fail startup instead of falling back to another kernel", "--attn-strict",
    )] = False
    dtype: Annotated[DType, _s(
        "DTYPE", P.choice("bf16", "fp16", "fp32", aliases=_DTYPE_ALIASES), "Weights and activations (CPU always runs fp32)",
        "--dtype",
    )] = "bf16"

    # Devices: gpu_ids, when set, wins over gpu_count; gpu_count None means 1 if any GPU is visible.
    gpu_ids: Annotated[tuple[int, ...] | None, _s(
        "GPU_IDS", P.gpu_ids, "CUDA device ids, one replica each; beats --gpu-count", "--gpu-ids",
    )] = None
    gpu_count: Annotated[int | None, _s(
        "GPU_COUNT", P.integer(1), "Use the first N visible GPUs (unset: 1 if any GPU is visible)", "--gpu-count",
    )] = None
    device: Annotated[Device, _s(
        "DEVICE", P.choice("auto", "cuda", "cpu"), "auto: CUDA when visible, else CPU (with a warning); GPUs asked for by id or count and not visible fail startup", "--device",
    )] = "auto"
    gpus_per_replica: Annotated[int, _s(
        "GPUS_PER_REPLICA", P.integer(1, 64), "GPUs one model replica is spread over (layers split evenly, run in turn); replicas = selected GPUs / this",
        "--gpus-per-replica",
    )] = 1
    cpu_replicas: Annotated[int, _s(
        "CPU_REPLICAS", P.integer(1, 16), "Model replicas when running on CPU", "--cpu-replicas",
    )] = 1
    cpu_packed_linears: Annotated[bool, _s(
        "CPU_PACKED_LINEARS", P.boolean, "CPU kernels: packed linear weights, fused RMSNorm and rotary embedding, the lean decode step", "--cpu-packed-linears",
    )] = True

    # Batching, limits, backpressure
    max_batch_size: Annotated[int, _s(
        "MAX_BATCH_SIZE", P.integer(1, 1024), "Most sequences decoded together per replica", "--max-batch-size",
    )] = 32
    batch_timeout_ms: Annotated[float, _s(
        "BATCH_TIMEOUT_MS", P.number(0, 1000), "Wait for more newcomers before a prefill", "--batch-timeout-ms",
    )] = 0.0
    # 128 on CPU halved median TTFT for -11% throughput; GPUs take 2048 (docs/BENCHMARKS.md).
    max_prefill_tokens: Annotated[int, _s(
        "MAX_PREFILL_TOKENS", P.integer(16, zero="auto: 128 on CPU, 2048 on GPU"), "Prompt tokens prefilled per scheduler step",
        "--max-prefill-tokens",
    )] = 0
    # vLLM's --stream-interval: the openai SDK took about 0.27 ms of CPU per event it read (docs/BENCHMARKS.md).
    stream_interval: Annotated[int, _s(
        "STREAM_INTERVAL", P.integer(1, 1024),
        "Tokens a streamed choice gathers per event after its first (sent at once, as is its end); 1: every token",
        "--stream-interval",
    )] = 1
    max_input_tokens: Annotated[int, _s(
        ("MAX_INPUT_TOKENS", "MAX_CONTEXT_TOKENS"), P.integer(1), "Maximum prompt tokens; longer prompts are cut from the left",
        "--max-input-tokens",
    )] = 16384
    default_max_tokens: Annotated[int, _s(
        "MAX_NEW_TOKENS_DEFAULT", P.integer(1), "Default and cap for new tokens per request", "--default-max-tokens",
    )] = 128
    max_queue_size: Annotated[int, _s(
        "MAX_QUEUE_SIZE", P.integer(1), "Waiting sequences per replica (n per request) before 503 backpressure",
        "--max-queue-size",
    )] = 256
    max_prompts_per_request: Annotated[int, _s(
        "MAX_PROMPTS_PER_REQUEST", P.integer(1, 4096), "Prompts one /v1/completions request may carry",
    )] = 64
    kv_cache_max_gib: Annotated[float, _s(
        "KV_CACHE_MAX_GIB", P.number(0), "Paged KV pool per replica in GiB; 0 = auto from free memory", "--kv-cache-max-gib",
    )] = 0.0
    kv_cache_gpu_fraction: Annotated[float, _s(
        "KV_CACHE_GPU_FRACTION", P.number(0, 1, lo_open=True), "Auto KV pool on GPU: share of the memory free after loading",
        "--kv-cache-gpu-fraction",
    )] = 0.9
    kv_block_size: Annotated[int, _s(
        "KV_BLOCK_SIZE", P.integer(1, 4096, zero="auto: 16, or 256 with FlashAttention"), "Tokens per KV block",
        "--kv-block-size",
    )] = 0
    enable_prefix_caching: Annotated[bool, _s(
        "ENABLE_PREFIX_CACHING", P.boolean, "Reuse the KV blocks of shared prompt prefixes; --no-enable-prefix-caching turns it off",
        "--enable-prefix-caching",
    )] = True
    enforce_eager: Annotated[bool, _s(
        "ENFORCE_EAGER", P.boolean, "No CUDA graphs: every decode step launches its kernels one by one (GPU only; CPU never captures)",
        "--enforce-eager",
    )] = False

    # Generation defaults (used when a request leaves the field out)
    default_do_sample: Annotated[bool, _s(
        "DO_SAMPLE_DEFAULT", P.boolean, "Sample by default; false = greedy", "--default-sampling",
    )] = True
    default_temperature: Annotated[float, _s(
        "TEMPERATURE_DEFAULT", P.number(0, 2), "Default temperature", "--default-temperature",
    )] = 0.8
    default_top_p: Annotated[float, _s(
        "TOP_P_DEFAULT", P.number(0, 1, lo_open=True), "Default nucleus p", "--default-top-p",
    )] = 0.9
    default_seed: Annotated[int | None, _s("SEED_DEFAULT", P.seed, "Default sampling seed", "--default-seed")] = 42
    default_top_k: Annotated[int, _s("TOP_K_DEFAULT", P.integer(0), "Default top-k; 0 = off", "--default-top-k")] = 0
    default_min_p: Annotated[float, _s("MIN_P_DEFAULT", P.number(0, 1), "Default min-p; 0 = off", "--default-min-p")] = 0.0
    default_repetition_penalty: Annotated[float, _s(
        "REPETITION_PENALTY_DEFAULT", P.number(0, lo_open=True), "Default repetition penalty",
        "--default-repetition-penalty",
    )] = 1.0

    # Server process
    host: Annotated[str, _s("HOST", P.bind_address, "Address to bind", "--host")] = "0.0.0.0"
    port: Annotated[int, _s("PORT", P.integer(1, 65535), "Port to bind", "--port")] = 8000
    log_level: Annotated[LogLevel, _s(
        "LOG_LEVEL", P.choice("critical", "error", "warning", "info", "debug", "trace", aliases={"warn": "warning"}),
        "Log level", "--log-level",
    )] = "info"
    metrics_public: Annotated[bool, _s(
        "METRICS_PUBLIC", P.boolean, "Serve /metrics without the API key (by default it needs it when API_KEY is set)",
        "--metrics-public",
    )] = False
    log_format: Annotated[str, _s(
        "LOG_FORMAT", P.choice("plain", "json"), "Every log line as plain text, or as one JSON object", "--log-format",
    )] = "plain"
    progress_logs: Annotated[bool, _s(
        "PROGRESS_LOGS", P.boolean, "Startup heartbeat and [startup][device] step lines, and one log line per request (the seed's per-request metrics, with sampling parameters); off, only failed (5xx) and overloaded (503) requests are logged", "--progress",
    )] = False
    fast_usage: Annotated[bool, _s(
        "FAST_USAGE", P.boolean,
        "Accepted for the seed's compatibility and changes nothing: usage always comes from the engine's own "
        "token counts, exact and without re-tokenizing",
        "--fast-usage",
    )] = True
    redact_source: Annotated[bool, _s(
        "REDACT_SOURCE", P.boolean, "Hide model path/revision/cache and download progress", "--redact-source",
    )] = True
    debug: Annotated[bool, _s(
        "DEBUG", P.boolean, "Debug logging and tracebacks; implies --log-level debug and --progress true unless given",
        "--debug",
    )] = False
    api_key: Annotated[str | None, _s(
        "API_KEY", P.api_key, "Bearer key for /v1/* and docs; prefer the env var from a secret", "--api-key",
    )] = None
    max_request_body_bytes: Annotated[int, _s(
        "MAX_REQUEST_BODY_BYTES", P.integer(1024), "Largest request body; bigger bodies get 413",
    )] = 64 * MiB
    shutdown_grace_s: Annotated[float, _s(
        "SHUTDOWN_GRACE_S", P.number(0, 3600),
        "On SIGTERM, time in-flight requests get to finish; the rest then end with an error (503, or an error event)",
    )] = 30.0
    http_header_timeout_s: Annotated[float, _s(
        "HTTP_HEADER_TIMEOUT_S", P.number(1, 300),
        "A connection must send its request headers within this time (idle keep-alive connections too), else it is closed",
    )] = 10.0
    http_body_timeout_s: Annotated[float, _s(
        "HTTP_BODY_TIMEOUT_S", P.number(1, 3600),
        "A request body that makes no progress for this long gets 408 and its connection is closed; a response write the client leaves waiting this long drops the response",
    )] = 30.0
    http_max_connections: Annotated[int, _s(
        "HTTP_MAX_CONNECTIONS", P.integer(16, zero="auto: from the open-files limit"),
        "Connections served at once; more wait in the listen backlog",
    )] = 0

    # Tool calls
    tool_call_parser: Annotated[str, _s(
        "TOOL_CALL_PARSER", P.choice("auto", "hermes", "llama3_json", "mistral"),
        "Tool-call format (vLLM's names): auto = the one the model's chat template shows, Hermes when it shows none",
        "--tool-call-parser",
    )] = "auto"

    # Images
    max_images_per_request: Annotated[int, _s(
        "MAX_IMAGES_PER_REQUEST", P.integer(0), "Images per request (0 = text only)", "--max-images-per-request",
    )] = 10
    max_image_size: Annotated[int, _s(
        "MAX_IMAGE_SIZE", P.integer(16), "Longest image side in pixels; larger images are resized", "--max-image-size",
    )] = 1024
    max_image_bytes: Annotated[int, _s(
        "MAX_IMAGE_BYTES", P.integer(1), "Encoded bytes per image (data URL or download)",
    )] = 20 * MiB
    max_image_pixels: Annotated[int, _s(
        "MAX_IMAGE_PIXELS", P.integer(1), "Decoded pixels per image, checked before decoding",
    )] = 50_000_000
    allow_remote_images: Annotated[bool, _s(
        "ALLOW_REMOTE_IMAGES", P.boolean, "Fetch http(s) image URLs (false: only data URLs)",
    )] = True
    cors_allow_origins: Annotated[tuple[str, ...], _s(
        "CORS_ALLOW_ORIGINS", P.origins, "Browser origins allowed to call the API (CORS); empty = no CORS headers",
        "--cors-allow-origins",
    )] = ()
    image_url_allowed_hosts: Annotated[tuple[str, ...], _s(
        "IMAGE_URL_ALLOWED_HOSTS", P.hosts, "Host allowlist for image URLs; empty = any public host",
    )] = ()
    allow_private_image_urls: Annotated[bool, _s(
        "ALLOW_PRIVATE_IMAGE_URLS", P.boolean, "Turn the image fetcher's private-address check off (trusted networks only)",
    )] = False
    image_url_allowed_networks: Annotated[tuple[str, ...], _s(
        "IMAGE_URL_ALLOWED_NETWORKS", P.networks, "Networks the image fetcher may reach although private (an internal store)",
    )] = ()
    image_fetch_timeout_s: Annotated[float, _s(
        "IMAGE_FETCH_TIMEOUT_S", P.number(0, 300, lo_open=True), "Whole image fetch deadline (DNS, connect, redirects, body)",
    )] = 10.0

    # fmt: on
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse and validate settings; raises SettingsError naming the offending variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, setting in SETTINGS.items():
            found = _lookup(env, setting.env)
            if found is None:
                continue
            name, raw = found
            try:
                values[field] = setting.parse(raw)
            except ValueError as exc:
                raise SettingsError(name, str(exc)) from None

        if "cache_dir" not in values:
            values["cache_dir"] = _hf_cache_dir(env)
        if values.get("debug"):
            values.setdefault("log_level", "debug")
            values.setdefault("progress_logs", True)
        return cls(**values)

    def device_selection(self) -> dict[str, Any]:
        """The settings that pick the replicas' devices, as `models.devices.resolve_devices` takes
        them (the entrypoint checks them before serving; the lifespan builds replicas from them)."""
        return {
            "device": self.device,
            "gpu_ids": self.gpu_ids,
            "gpu_count": self.gpu_count,
            "cpu_replicas": self.cpu_replicas,
            "gpus_per_replica": self.gpus_per_replica,
        }

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


def _declared() -> dict[str, Setting]:
    hints = typing.get_type_hints(Settings, include_extras=True)
    return {
        field: meta
        for field, hint in hints.items()
        for meta in getattr(hint, "__metadata__", ())
        if isinstance(meta, Setting)
    }


# Field -> its declaration, in declaration order.
SETTINGS: Mapping[str, Setting] = _declared()
# Field name -> environment variable names (canonical first).
ENV_NAMES: Mapping[str, tuple[str, ...]] = {field: setting.env for field, setting in SETTINGS.items()}


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
