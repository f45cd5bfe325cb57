"""Container entrypoint: CLI flags -> environment -> validated Settings -> granian (one worker).

Precedence is CLI > environment > default: each flag given is written into the environment under
its variable name, then `Settings.from_env` validates the merged result before anything starts. The
granian worker inherits that environment and builds the same Settings inside `create_app()`.

Imports only `app.settings` and the standard library; granian is imported just before serving so
`--help` and `--print-config` stay fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import NamedTuple, NoReturn

from app.settings import ENV_NAMES, Settings, SettingsError

ROOT = Path(__file__).resolve().parent
APP_TARGET = "app.main:create_app"

# Spec "Advanced runtime" defaults; set before torch/transformers are imported by the worker.
RUNTIME_ENV_DEFAULTS = {
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_ENABLE_HF_TRANSFER": "1",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}


class Flag(NamedTuple):
    options: tuple[str, ...]
    field: str  # Settings field; its canonical env var is where the value is written
    help: str
    is_bool: bool = False


FLAGS: tuple[Flag, ...] = (
    # GPU selection and devices
    Flag(("--gpu-ids",), "gpu_ids", "Comma-separated CUDA device ids, one replica each; beats --gpu-count"),
    Flag(("--gpu-count",), "gpu_count", "Use the first N visible GPUs (unset: 1 if any GPU is visible)"),
    Flag(("--device",), "device", "auto | cuda | cpu; auto uses CUDA when available"),
    Flag(("--cpu-replicas",), "cpu_replicas", "Model replicas when running on CPU (1..16)"),
    Flag(("--cpu-packed-linears",), "cpu_packed_linears", "oneDNN pre-packed linear weights on CPU", True),
    # Model
    Flag(
        ("--model-path", "--model-id"),
        "model_path",
        "Local folder, Hugging Face repo id, or builtin:<name>; --model-id is a backward-compatible alias",
    ),
    Flag(("--model-name",), "model_name", "Model name clients must send; shown by /v1/models and the docs"),
    Flag(("--revision",), "model_revision", "Hub branch, tag or commit to pin"),
    Flag(("--trust-remote-code",), "trust_remote_code", "Allow custom modeling code from the repo", True),
    Flag(
        ("--cache-dir",),
        "cache_dir",
        "Model download cache; sets HF_HUB_CACHE (when unset: HF_HUB_CACHE, then HF_HOME/hub)",
    ),
    Flag(
        ("--transformers-path",),
        "transformers_path",
        "pip install -U this path, URL or wheel of transformers before starting",
    ),
    # Attention kernels and compute
    Flag(("--attn-impl",), "attn_impl", "flash_attention_2 | sdpa | eager; falls back to sdpa unless strict"),
    Flag(("--attn-strict",), "attn_strict", "Fail startup instead of falling back to another kernel", True),
    Flag(("--dtype",), "dtype", "bf16 | fp16 | fp32 (CPU always runs fp32)"),
    # Batching, limits, backpressure
    Flag(("--max-batch-size",), "max_batch_size", "Most requests decoded together per replica (1..1024)"),
    Flag(("--batch-timeout-ms",), "batch_timeout_ms", "Wait for more newcomers before a prefill (0..1000)"),
    Flag(("--max-prefill-tokens",), "max_prefill_tokens", "Prompt tokens prefilled per scheduler step (0 = auto: 128 CPU, 2048 GPU; else >=16)"),
    Flag(("--max-input-tokens",), "max_input_tokens", "Maximum prompt tokens; env alias MAX_CONTEXT_TOKENS"),
    Flag(("--default-max-tokens",), "default_max_tokens", "Default and cap for new tokens per request"),
    Flag(("--kv-cache-max-gib",), "kv_cache_max_gib", "Paged KV pool per replica in GiB; 0 = auto from free memory"),
    Flag(("--kv-cache-gpu-fraction",), "kv_cache_gpu_fraction", "Auto KV pool on GPU: share of the memory free after loading"),
    Flag(("--kv-block-size",), "kv_block_size", "Tokens per KV block; 0 = auto (16, or 256 with FlashAttention)"),
    Flag(
        ("--enable-prefix-caching",),
        "enable_prefix_caching",
        "Reuse the KV blocks of shared prompt prefixes; --no-enable-prefix-caching turns it off",
        True,
    ),
    Flag(("--max-queue-size",), "max_queue_size", "Waiting requests per replica before 503 backpressure"),
    # Generation defaults
    Flag(("--default-sampling",), "default_do_sample", "Sample by default; false = greedy", True),
    Flag(("--default-temperature",), "default_temperature", "Default temperature (0..2)"),
    Flag(("--default-top-p",), "default_top_p", "Default nucleus p (0 < p <= 1)"),
    Flag(("--default-seed",), "default_seed", "Default sampling seed; 'none' for a random seed"),
    Flag(("--default-top-k",), "default_top_k", "Default top-k; 0 = off"),
    Flag(("--default-min-p",), "default_min_p", "Default min-p (0..1); 0 = off"),
    Flag(("--default-repetition-penalty",), "default_repetition_penalty", "Default repetition penalty (> 0)"),
    # Server process
    Flag(("--host",), "host", "Address to bind"),
    Flag(("--port",), "port", "Port to bind (1..65535)"),
    Flag(("--log-level",), "log_level", "critical | error | warning | info | debug | trace"),
    Flag(("--progress",), "progress_logs", "Startup heartbeat and per-request metrics logs", True),
    Flag(("--fast-usage",), "fast_usage", "Report usage from engine token counts (no re-tokenization)", True),
    Flag(("--redact-source",), "redact_source", "Hide model path/revision/cache and download progress", True),
    Flag(("--debug",), "debug", "Debug logging and tracebacks; implies --log-level debug unless given", True),
    Flag(("--api-key",), "api_key", "Bearer key for /v1/* and docs; prefer the env var from a secret"),
    # Images
    Flag(("--max-images-per-request",), "max_images_per_request", "Images per request (0 = text only)"),
    Flag(("--max-image-size",), "max_image_size", "Longest image side in pixels; larger images are resized"),
)


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="entrypoint.py",
        description="Start the OpenAI-compatible inference server. Precedence: CLI flag > env var > default.",
        epilog=_epilog(defaults),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for flag in FLAGS:
        env = ENV_NAMES[flag.field][0]
        help_text = f"{flag.help} [env {env}; default: {_show_default(getattr(defaults, flag.field))}]"
        kwargs: dict = {"dest": flag.field, "metavar": "BOOL" if flag.is_bool else env, "help": help_text}
        if flag.is_bool:
            # `--debug` alone means true; `--debug false` is accepted like the spec's examples.
            kwargs.update(nargs="?", const="true")
        parser.add_argument(*flag.options, **kwargs)

    fa2 = parser.add_mutually_exclusive_group()
    fa2.add_argument(
        "--enable-fa2",
        action="store_true",
        help="Shortcut for --attn-impl flash_attention_2 (wins over --attn-impl; sets ATTN_IMPL)",
    )
    fa2.add_argument(
        "--disable-fa2",
        action="store_true",
        help="Shortcut for --attn-impl sdpa (wins over --attn-impl; sets ATTN_IMPL)",
    )
    parser.add_argument(
        "--no-enable-prefix-caching",
        action="store_true",
        help="Turn prefix caching off (sets ENABLE_PREFIX_CACHING=false; wins over --enable-prefix-caching)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="Print the resolved settings as JSON (secrets removed, source redacted if enabled) and exit",
    )
    return parser


def _show_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "empty"
    return str(value)


def _epilog(defaults: Settings) -> str:
    flagged = {flag.field for flag in FLAGS}
    lines = ["environment-only settings:"]
    for field, names in ENV_NAMES.items():
        if field not in flagged:
            lines.append(f"  {' or '.join(names)}  (default: {_show_default(getattr(defaults, field))})")
    lines.append("env aliases:")
    for field, names in ENV_NAMES.items():
        if field in flagged and len(names) > 1:
            lines.append(f"  {' / '.join(names[1:])} for {names[0]}")
    lines.append("runtime env defaults (set only when absent):")
    lines.extend(f"  {name}={value}" for name, value in RUNTIME_ENV_DEFAULTS.items())
    lines.append("empty values count as unset; booleans accept 1/0, true/false, yes/no, on/off.")
    return "\n".join(lines)


def apply_cli_to_env(args: argparse.Namespace, environ: MutableMapping[str, str]) -> None:
    for flag in FLAGS:
        value = getattr(args, flag.field)
        if value is not None:
            environ[ENV_NAMES[flag.field][0]] = value
    if args.no_enable_prefix_caching:
        environ["ENABLE_PREFIX_CACHING"] = "false"
    if args.enable_fa2:
        environ["ATTN_IMPL"] = "flash_attention_2"
    elif args.disable_fa2:
        environ["ATTN_IMPL"] = "sdpa"


def _flag_for_env(name: str) -> str | None:
    for flag in FLAGS:
        if ENV_NAMES[flag.field][0] == name:
            return flag.options[0]
    return None


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"entrypoint: {message}", file=sys.stderr)
    sys.exit(code)


def load_settings() -> Settings:
    try:
        return Settings.from_env(os.environ)
    except SettingsError as err:
        flag = _flag_for_env(err.name)
        option = f"{flag} / {err.name}" if flag else err.name
        _fail(f"invalid {option}: {err.message}")


def prepare_runtime_env(settings: Settings) -> None:
    for name, value in RUNTIME_ENV_DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            if name == "HF_HUB_ENABLE_HF_TRANSFER":
                # huggingface_hub >= 1.0 replaced hf_transfer with Xet's high-performance mode and
                # warns about the old variable unless this one is set too.
                os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
    # Settings already resolved CACHE_DIR > HF_HUB_CACHE > HF_HOME/hub, so this never moves a cache
    # the operator chose; it makes the HF libraries agree with the resolved directory.
    os.environ["HF_HUB_CACHE"] = settings.cache_dir
    os.environ.setdefault("HF_HOME", settings.cache_dir)
    if settings.hf_token:
        # Either token variable is accepted; HF libraries look at HF_TOKEN first.
        os.environ.setdefault("HF_TOKEN", settings.hf_token)
    if settings.redact_source:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if settings.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "debug")
        os.environ.setdefault("HF_HUB_VERBOSITY", "debug")


def install_transformers(spec: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-U", spec], check=False)
    if result.returncode != 0:
        _fail(f"pip install of --transformers-path failed (exit {result.returncode})", 1)
    # A fresh interpreter reports what was just installed, not what this process may have cached.
    probe = subprocess.run(
        [sys.executable, "-c", "import transformers as t; print(t.__version__); print(t.__file__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        _fail(f"transformers does not import after install: {last}", 1)
    version, location = probe.stdout.split()[:2]
    print(f"[entrypoint] transformers {version} from {location}", flush=True)
    print(f"[entrypoint] Using transformers {version} from {Path(location).parent}", flush=True)


def serve(settings: Settings) -> None:
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    # granian has no "trace" level; the app still sees LOG_LEVEL=trace for its own loggers.
    level = "debug" if settings.log_level == "trace" else settings.log_level
    server = Server(
        APP_TARGET,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=1,  # one process holds the model replicas; more workers would load the model twice
        working_dir=ROOT,
        log_level=LogLevels(level),
        log_access=settings.debug,
        # Backstop only: the app drains within SHUTDOWN_GRACE_S; a worker stuck past that is killed.
        workers_kill_timeout=max(1, math.ceil(settings.shutdown_grace_s) + 10),
    )
    print(f"[entrypoint] serving {APP_TARGET} on {settings.host}:{settings.port} (1 worker)", flush=True)
    server.serve()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    apply_cli_to_env(args, os.environ)
    settings = load_settings()
    if args.api_key is not None:
        print(
            "entrypoint: warning: --api-key is visible in the process list and pod spec; "
            "prefer API_KEY from a secret",
            file=sys.stderr,
        )
    if args.print_config:
        print(json.dumps(settings.redacted_dict(), sort_keys=True))
        return
    prepare_runtime_env(settings)
    if settings.transformers_path:
        install_transformers(settings.transformers_path)
    serve(settings)


if __name__ == "__main__":
    main()
