"""Container entrypoint: CLI flags -> environment -> validated Settings -> granian (one worker).

Precedence is CLI > environment > default: each flag given is written into the environment under
its variable name, then `Settings.from_env` validates the merged result before anything starts. The
granian worker inherits that environment and builds the same Settings inside `create_app()`.

Imports only `app.settings` and the standard library; granian is imported just before serving so
`--help` and `--print-config` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import NoReturn

from app.settings import SETTINGS, Settings, SettingsError

ROOT = Path(__file__).resolve().parent
APP_TARGET = "app.main:create_app"
_MAX_OPEN_FILES = 1 << 20
_RESERVED_FILES = 512
_MAX_CONNECTIONS = 65536
_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
_LAST_WRITES_S = (
    4.0  # after SHUTDOWN_GRACE_S, for the drained requests' last events (see workers_kill_timeout)
)

# Spec "Advanced runtime" defaults; set before torch/transformers are imported by the worker.
RUNTIME_ENV_DEFAULTS = {
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_ENABLE_HF_TRANSFER": "1",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="entrypoint.py",
        description="Start the OpenAI-compatible inference server. Precedence: CLI flag > env var > default.",
        epilog=_epilog(defaults),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for field, setting in SETTINGS.items():
        if not setting.flags:
            continue
        kwargs: dict = {
            "dest": field,
            "metavar": "BOOL" if setting.parse.is_bool else setting.env[0],
            "help": flag_help(field).replace("%", "%%"),  # argparse formats help with %
        }
        if setting.parse.is_bool:
            # `--debug` alone means true; `--debug false` is accepted like the spec's examples.
            kwargs.update(nargs="?", const="true")
        parser.add_argument(*setting.flags, **kwargs)

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


def flag_help(field: str) -> str:
    """The declaration's help, what the parser accepts, the env var and the default."""
    setting = SETTINGS[field]
    accepted = f" ({setting.parse.expected})" if setting.parse.expected else ""
    default = _show_default(getattr(Settings(), field))
    return f"{setting.help}{accepted} [env {setting.env[0]}; default: {default}]"


def _show_default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "empty"
    return str(value)


def _epilog(defaults: Settings) -> str:
    lines = ["environment-only settings:"]
    for field, setting in SETTINGS.items():
        if not setting.flags:
            default = _show_default(getattr(defaults, field))
            lines.append(f"  {' or '.join(setting.env)}  {setting.help} (default: {default})")
    lines.append("env aliases:")
    for setting in SETTINGS.values():
        if setting.flags and len(setting.env) > 1:
            lines.append(f"  {' / '.join(setting.env[1:])} for {setting.env[0]}")
    lines.append("runtime env defaults (set only when absent):")
    lines.extend(f"  {name}={value}" for name, value in RUNTIME_ENV_DEFAULTS.items())
    lines.append("empty values count as unset; booleans accept 1/0, true/false, yes/no, on/off.")
    return "\n".join(lines)


def apply_cli_to_env(args: argparse.Namespace, environ: MutableMapping[str, str]) -> None:
    for field, setting in SETTINGS.items():
        value = getattr(args, field, None) if setting.flags else None
        if isinstance(value, str) and not value.strip():
            # Empty counts as unset, for flags as for variables: a templated `--api-key "$KEY"`
            # with KEY empty wrote "" over API_KEY and served without authentication.
            _say(
                f"entrypoint: warning: {setting.flags[0]} is empty: ignored (an empty value counts as unset)",
                level="warning",
                stream=sys.stderr,
            )
            continue
        if value is not None:
            environ[setting.env[0]] = value
    if args.no_enable_prefix_caching:
        environ["ENABLE_PREFIX_CACHING"] = "false"
    if args.enable_fa2:
        environ["ATTN_IMPL"] = "flash_attention_2"
    elif args.disable_fa2:
        environ["ATTN_IMPL"] = "sdpa"


def _flag_for_env(name: str) -> str | None:
    for setting in SETTINGS.values():
        if setting.flags and setting.env[0] == name:
            return setting.flags[0]
    return None


def _say(line: str, *, level: str = "info", stream=None) -> None:
    """The entrypoint's own lines, in the format every other line of the process uses."""
    if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        record = {"ts": f"{stamp}Z", "level": level, "logger": "docoserve.entrypoint", "message": line}
        line = json.dumps(record)
    print(line, file=stream or sys.stdout, flush=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    _say(f"entrypoint: {message}", level="error", stream=sys.stderr)
    sys.exit(code)


def load_settings() -> Settings:
    try:
        return Settings.from_env(os.environ)
    except SettingsError as err:
        flag = _flag_for_env(err.name)
        option = f"{flag} / {err.name}" if flag else err.name
        _fail(f"invalid {option}: {err.message}")


def _default_hf_home() -> Path:
    """Where huggingface_hub keeps its home (and the login token) when HF_HOME is not set."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "huggingface"


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
    if "HF_HOME" not in os.environ and "HF_TOKEN_PATH" not in os.environ:
        # Moving HF_HOME would hide the token `hf auth login` saved under the default home.
        saved = _default_hf_home() / "token"
        if saved.is_file():
            os.environ["HF_TOKEN_PATH"] = str(saved)
    os.environ.setdefault("HF_HOME", settings.cache_dir)
    if settings.hf_token:
        # Either token variable is accepted; HF libraries look at HF_TOKEN first.
        os.environ.setdefault("HF_TOKEN", settings.hf_token)
    if settings.redact_source or not sys.stderr.isatty():
        # Bars name the files and, in a log file, are carriage-return noise: the loader logs
        # periodic download lines instead (models/download.py).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
    _say(f"[entrypoint] transformers {version} from {location}")
    _say(f"[entrypoint] Using transformers {version} from {Path(location).parent}")


def check_devices(settings: Settings) -> None:
    """Fail before serving when the devices asked for are not there (one line, exit code 2); say
    so when nothing was asked for and no GPU is visible."""
    from models.devices import cuda_device_count, resolve_devices

    try:
        devices = resolve_devices(**settings.device_selection())
    except ValueError as exc:
        _fail(str(exc))
    if settings.attn_strict:
        # The spec: strict mode has no fallback and startup fails. What the machine lacks is known
        # now; a model that does not support the kernel is found at load (the server then stays
        # up degraded, /health saying why, as for any load failure).
        from models.devices import placement_devices
        from models.loader import strict_attention_problem

        for device in (d for placement in devices for d in placement_devices(placement)):
            problem = strict_attention_problem(settings.attn_impl, device, settings.dtype)
            if problem:
                _fail(
                    f"ATTN_STRICT is set and attention {settings.attn_impl} cannot run on {device}: {problem}"
                )
    if settings.device == "auto" and devices[0] == "cpu" and cuda_device_count() == 0:
        _say(
            "entrypoint: warning: no CUDA device is visible: serving on CPU",
            level="warning",
            stream=sys.stderr,
        )


def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard one: every connection is a file descriptor,
    and a default soft limit of 1,024 is what a crowd of idle clients exhausts first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _MAX_OPEN_FILES
    target = min(target, _MAX_OPEN_FILES)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(settings: Settings, open_files: int) -> int:
    """Connections granian serves at once (its backpressure). By default as many as the open-files
    limit allows, less a margin for model files, sockets to image hosts and the replicas' own."""
    if settings.http_max_connections:
        return settings.http_max_connections
    return max(1024, min(open_files - _RESERVED_FILES, _MAX_CONNECTIONS))


def check_port_free(host: str, port: int) -> None:
    """granian listens with SO_REUSEPORT, so a second server started on a port already served
    came up beside the first and the kernel split connections between them (two models behind
    one address). Bound once without it: a port someone listens on fails here, clearly."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT is fine
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                _fail(f"port {port} on {host} is already in use (another server is listening there)", 98)
            # Anything else (an address this host lacks, ...) is granian's to report.


def serve(settings: Settings) -> None:
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    from app.log_format import granian_log_config

    # granian has no "trace" level; the app still sees LOG_LEVEL=trace for its own loggers.
    level = "debug" if settings.log_level == "trace" else settings.log_level
    connections = connection_limit(settings, raise_open_files_limit())
    check_port_free(settings.host, settings.port)
    server = Server(
        APP_TARGET,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=1,  # one process holds the model replicas; more workers would load the model twice
        working_dir=ROOT,
        log_level=LogLevels(level),
        log_dictconfig=granian_log_config(settings.log_format, level),
        # The app writes one line per request (app/access_log.py); granian's own access line
        # doubled it under DEBUG and printed the decoded path raw (a %0A forged a log line).
        log_access=False,
        # HTTP/1.1 only: with protocol detection (auto), a connection that never sends a byte is
        # never timed out, and 1,024 of them stopped every request, /health included. HTTP/1.1's
        # header timeout closes them, and keep-alive connections left idle, after HTTP_HEADER_TIMEOUT_S.
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.http_header_timeout_s * 1000)),
        backpressure=connections,
        backlog=_BACKLOG,
        # The app's SIGTERM drain reads asyncio's signal handlers (app/lifespan.py).
        loop=Loops.asyncio,
        # The app drains within SHUTDOWN_GRACE_S and ends what is left with an error event; its last
        # writes take well under a second. A connection whose client stopped reading never takes
        # them, and granian waits for it (closing it from the app does not free hyper's write), so
        # the worker is killed this soon after the grace, and the process exits within grace + 5 s
        # (measured: the exit follows the kill by ~0.7 s; a kill at grace + 5 exited at + 5.7).
        workers_kill_timeout=settings.shutdown_grace_s + _LAST_WRITES_S,
    )
    # granian respawns its workers on SIGHUP: the new worker loaded the model while the old one
    # still held it (twice the memory on a GPU) and the server answered nothing for the load.
    server.signal_handler_reload = _ignore_reload
    note_health_url(settings.host, settings.port)
    _say(
        f"[entrypoint] serving {APP_TARGET} on {settings.host}:{settings.port} (1 worker, up to {connections} connections)"
    )
    server.serve()


def _ignore_reload(*_: object) -> None:
    _say(
        "entrypoint: SIGHUP ignored: a reload would load the model twice; restart the server instead",
        level="warning",
    )


# Where the image's HEALTHCHECK finds the address the server listens on: it runs as a process of
# its own, which sees the image's environment but not the flags (`--port 9000` left it probing 8000).
HEALTH_URL_FILE = Path(os.environ.get("TMPDIR") or "/tmp") / "docoserve-health-url"


def note_health_url(host: str, port: int) -> None:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    with contextlib.suppress(OSError):  # a read-only /tmp: Kubernetes uses its own probes anyway
        HEALTH_URL_FILE.write_text(f"http://{host}:{port}/health\n")


def exec_if_command(argv: list[str]) -> None:
    """The docker-entrypoint convention: a first argument that is not a flag is a command to run
    instead of the server (`docker run IMAGE python3 -c "import flash_attn"`); flags stay ours."""
    if argv and argv[0] and not argv[0].startswith("-"):
        try:
            os.execvp(argv[0], argv)
        except OSError as err:
            _fail(f"cannot run {argv[0]!r}: {err.strerror}", 127)


def main(argv: list[str] | None = None) -> None:
    exec_if_command(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    apply_cli_to_env(args, os.environ)
    settings = load_settings()
    if args.api_key is not None and args.api_key.strip():
        _say(
            "entrypoint: warning: --api-key is visible in the process list and pod spec; prefer API_KEY from a secret",
            level="warning",
            stream=sys.stderr,
        )
    if args.print_config:
        print(json.dumps(settings.redacted_dict(), sort_keys=True))
        return
    check_devices(settings)
    prepare_runtime_env(settings)
    if settings.transformers_path:
        install_transformers(settings.transformers_path)
    serve(settings)


if __name__ == "__main__":
    main()
