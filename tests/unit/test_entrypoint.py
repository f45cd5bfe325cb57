"""entrypoint.py: CLI > env > default, help text, one-line validation errors, and the granian call.

Precedence and errors are checked end to end by running the script with --print-config; the
runtime environment and the granian call are checked in-process with fakes (no server starts).
"""

from __future__ import annotations

import http.server
import inspect
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import entrypoint
from app.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]

SPEC_FLAGS = [
    "--gpu-ids", "--gpu-count", "--model-path", "--model-id", "--model-name", "--attn-impl",
    "--enable-fa2", "--disable-fa2", "--dtype", "--max-batch-size", "--batch-timeout-ms",
    "--default-max-tokens", "--default-sampling", "--default-temperature", "--default-top-p",
    "--default-seed", "--host", "--port", "--log-level", "--progress", "--cache-dir", "--fast-usage",
    "--redact-source", "--debug", "--transformers-path",
]  # fmt: skip
OUR_FLAGS = [
    "--device", "--cpu-replicas", "--max-prefill-tokens", "--max-input-tokens", "--max-queue-size",
    "--default-top-k", "--default-min-p", "--default-repetition-penalty", "--api-key",
    "--max-images-per-request", "--max-image-size", "--trust-remote-code", "--revision", "--print-config",
    "--attn-strict",
]  # fmt: skip


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [sys.executable, str(ROOT / "entrypoint.py"), *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def config(*args: str, **env: str) -> dict:
    result = run("--print-config", "--redact-source", "false", *args, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_defaults() -> None:
    data = config()
    assert data["model_path"] == "builtin:tiny-vlm"
    assert (data["dtype"], data["attn_impl"]) == ("bf16", "flash_attention_2")
    assert (data["max_batch_size"], data["port"], data["log_level"]) == (32, 8000, "info")


def test_flag_beats_env() -> None:
    env = {"DTYPE": "fp16", "MAX_BATCH_SIZE": "8", "PORT": "9000"}
    data = config("--dtype", "fp32", "--max-batch-size", "4", "--port", "9001", **env)
    assert (data["dtype"], data["max_batch_size"], data["port"]) == ("fp32", 4, 9001)


def test_an_empty_flag_counts_as_unset_and_leaves_the_variable_in_force() -> None:
    """A templated `--api-key "$KEY"` with KEY empty served without authentication."""
    result = run("--print-config", "--api-key", "", "--port", " ", API_KEY="sk-env", PORT="9005")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["auth_enabled"] is True and data["port"] == 9005
    assert "--api-key is empty: ignored" in result.stderr
    assert "visible in the process list" not in result.stderr  # nothing of it was used


def test_env_beats_default() -> None:
    data = config(MAX_BATCH_SIZE="8", BATCH_TIMEOUT_MS="6", MODEL_NAME="omega")
    assert (data["max_batch_size"], data["batch_timeout_ms"], data["model_name"]) == (8, 6.0, "omega")


def test_every_flag_reaches_its_setting() -> None:
    args = [
        "--gpu-ids", "0,1", "--gpu-count", "2", "--device", "cpu", "--cpu-replicas", "2",
        "--model-path", "/m", "--model-name", "omega", "--revision", "v1", "--trust-remote-code", "false",
        "--cache-dir", "/cache", "--attn-impl", "eager", "--attn-strict", "--dtype", "fp16",
        "--max-batch-size", "8", "--batch-timeout-ms", "6", "--max-prefill-tokens", "64",
        "--max-input-tokens", "100", "--default-max-tokens", "50", "--max-queue-size", "9",
        "--default-sampling", "false", "--default-temperature", "0.5", "--default-top-p", "0.5",
        "--default-seed", "7", "--default-top-k", "5", "--default-min-p", "0.1",
        "--default-repetition-penalty", "1.2", "--host", "127.0.0.1", "--port", "9000",
        "--log-level", "warning", "--progress", "true", "--fast-usage", "false", "--debug", "true",
        "--max-images-per-request", "2", "--max-image-size", "256",
    ]  # fmt: skip
    data = config(*args)
    expected = {
        "gpu_ids": [0, 1], "gpu_count": 2, "device": "cpu", "cpu_replicas": 2, "model_path": "/m",
        "model_name": "omega", "model_revision": "v1", "trust_remote_code": False, "cache_dir": "/cache",
        "attn_impl": "eager", "attn_strict": True, "dtype": "fp16", "max_batch_size": 8,
        "batch_timeout_ms": 6.0, "max_prefill_tokens": 64, "max_input_tokens": 100, "default_max_tokens": 50,
        "max_queue_size": 9, "default_do_sample": False, "default_temperature": 0.5, "default_top_p": 0.5,
        "default_seed": 7, "default_top_k": 5, "default_min_p": 0.1, "default_repetition_penalty": 1.2,
        "host": "127.0.0.1", "port": 9000, "log_level": "warning", "progress_logs": True,
        "fast_usage": False, "debug": True, "max_images_per_request": 2, "max_image_size": 256,
    }  # fmt: skip
    assert {key: data[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--attn-impl", "eager", "--enable-fa2"], {}, "flash_attention_2"),
        (["--enable-fa2", "--attn-impl", "eager"], {}, "flash_attention_2"),
        (["--attn-impl", "eager", "--disable-fa2"], {}, "sdpa"),
        (["--disable-fa2"], {"ATTN_IMPL": "eager"}, "sdpa"),
        (["--attn-impl", "eager"], {"ATTN_IMPL": "sdpa"}, "eager"),
    ],
)
def test_fa2_shortcuts_beat_attn_impl(args: list[str], env: dict[str, str], expected: str) -> None:
    assert config(*args, **env)["attn_impl"] == expected


def test_enable_and_disable_fa2_together_is_an_error() -> None:
    assert run("--enable-fa2", "--disable-fa2", "--print-config").returncode == 2


def test_model_id_is_an_alias_of_model_path() -> None:
    assert config("--model-id", "org/model")["model_path"] == "org/model"
    assert config("--model-id", "org/cli", MODEL_PATH="org/env")["model_path"] == "org/cli"
    assert config(MODEL_ID="org/env-alias")["model_path"] == "org/env-alias"


def test_cli_beats_env_alias() -> None:
    assert config("--max-input-tokens", "10", MAX_CONTEXT_TOKENS="20")["max_input_tokens"] == 10


def test_bare_boolean_flags_mean_true() -> None:
    data = config("--debug", "--progress")
    assert data["debug"] is True and data["progress_logs"] is True
    assert data["log_level"] == "debug"  # DEBUG bumps the level when --log-level is not given


def test_boolean_flags_take_values() -> None:
    data = config("--progress", "false", "--fast-usage", "0", PROGRESS_LOGS="1")
    assert data["progress_logs"] is False and data["fast_usage"] is False


def test_explicit_log_level_beats_debug() -> None:
    assert config("--debug", "true", "--log-level", "warning")["log_level"] == "warning"


def test_print_config_redacts_by_default_and_never_shows_secrets() -> None:
    result = run("--print-config", "--model-path", "/secret/model", "--api-key", "sk-cli", HF_TOKEN="hf_env")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["model_path"] == "<redacted>"
    assert data["auth_enabled"] is True and data["hf_token_set"] is True
    for secret in ("/secret/model", "sk-cli", "hf_env"):
        assert secret not in result.stdout and secret not in result.stderr
    assert "--api-key" in result.stderr and "API_KEY" in result.stderr  # the visibility warning


def test_help_lists_every_flag_and_env_var() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in SPEC_FLAGS + OUR_FLAGS:
        assert flag in result.stdout, flag
    for names in ENV_NAMES.values():
        for name in names:
            assert name in result.stdout, name
    for name in entrypoint.RUNTIME_ENV_DEFAULTS:
        assert name in result.stdout, name


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--dtype", "fp8"], {}, "invalid --dtype / DTYPE: 'fp8' (choose bf16, fp16, fp32)"),
        (["--gpu-ids", "a,b"], {}, "--gpu-ids / GPU_IDS: 'a,b'"),
        (["--port", "0x"], {}, "--port / PORT: '0x'"),
        (["--max-batch-size", "0"], {}, "--max-batch-size / MAX_BATCH_SIZE: '0'"),
        (["--debug", "maybe"], {}, "--debug / DEBUG: 'maybe'"),
        (
            ["--tool-call-parser", "pythonic"],
            {},
            "--tool-call-parser / TOOL_CALL_PARSER: 'pythonic' (choose auto, hermes, llama3_json, mistral)",
        ),
        ([], {"DTYPE": "fp8"}, "--dtype / DTYPE: 'fp8'"),
        ([], {"MAX_CONTEXT_TOKENS": "x"}, "invalid MAX_CONTEXT_TOKENS: 'x'"),
        ([], {"SHUTDOWN_GRACE_S": "-1"}, "invalid SHUTDOWN_GRACE_S: '-1'"),
        (
            ["--chat-template", "/no/such.jinja"],
            {},
            "--chat-template / CHAT_TEMPLATE: '/no/such.jinja' is not a template (no '{' or '%') and not a readable file",
        ),
    ],
)
def test_invalid_values_exit_2_with_one_line(args: list[str], env: dict[str, str], needle: str) -> None:
    result = run(*args, "--print-config", **env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("entrypoint: invalid ")
    assert needle in lines[0]


def test_invalid_values_fail_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entrypoint.os, "environ", {})
    monkeypatch.setattr(entrypoint, "serve", lambda settings: pytest.fail("served"))
    with pytest.raises(SystemExit) as info:
        entrypoint.main(["--dtype", "fp8"])
    assert info.value.code == 2


# --------------------------------------------------------------------------------- in-process


def test_runtime_env_defaults_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"TOKENIZERS_PARALLELISM": "true", "CACHE_DIR": "/data/cache", "HUGGING_FACE_HUB_TOKEN": "hf_x"}
    monkeypatch.setattr(entrypoint.os, "environ", env)
    entrypoint.prepare_runtime_env(entrypoint.load_settings())
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TOKENIZERS_PARALLELISM"] == "true"  # operator's value is kept
    assert env["HF_HUB_ENABLE_HF_TRANSFER"] == "1" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["HF_HUB_CACHE"] == "/data/cache" and env["HF_HOME"] == "/data/cache"
    assert env["HF_TOKEN"] == "hf_x"
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # redact_source is on by default


def test_a_token_saved_by_hf_auth_login_survives_the_cache_redirect(tmp_path, monkeypatch) -> None:
    """CACHE_DIR moves HF_HOME; the token `hf auth login` wrote under the default home stays found."""
    home = tmp_path / "xdg" / "huggingface"
    home.mkdir(parents=True)
    (home / "token").write_text("hf_saved")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "CACHE_DIR": str(tmp_path / "cache")}
    monkeypatch.setattr(entrypoint.os, "environ", env)
    entrypoint.prepare_runtime_env(entrypoint.load_settings())
    assert env["HF_HOME"] == str(tmp_path / "cache")
    assert env["HF_TOKEN_PATH"] == str(home / "token")
    from huggingface_hub import get_token

    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", env["HF_TOKEN_PATH"])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert get_token() == "hf_saved"


def test_no_token_file_sets_no_token_path(tmp_path, monkeypatch) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path), "CACHE_DIR": str(tmp_path / "cache")}
    monkeypatch.setattr(entrypoint.os, "environ", env)
    entrypoint.prepare_runtime_env(entrypoint.load_settings())
    assert "HF_TOKEN_PATH" not in env


def test_progress_bars_only_on_a_terminal_without_redaction(monkeypatch) -> None:
    for tty, redact, bars_off in ((True, "false", False), (False, "false", True), (True, "true", True)):
        env = {"REDACT_SOURCE": redact}
        monkeypatch.setattr(entrypoint.os, "environ", env)
        monkeypatch.setattr(entrypoint.sys.stderr, "isatty", lambda tty=tty: tty)
        entrypoint.prepare_runtime_env(entrypoint.load_settings())
        assert ("HF_HUB_DISABLE_PROGRESS_BARS" in env) is bars_off, (tty, redact)


def test_operator_hf_home_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"HF_HOME": "/hf"}
    monkeypatch.setattr(entrypoint.os, "environ", env)
    entrypoint.prepare_runtime_env(entrypoint.load_settings())
    assert env["HF_HOME"] == "/hf" and env["HF_HUB_CACHE"] == "/hf/hub"


def test_serve_starts_granian_with_one_asgi_factory_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import granian.server

    calls: list[tuple[tuple, dict]] = []

    class FakeServer:
        def __init__(self, *args, **kwargs) -> None:
            calls.append((args, kwargs))

        def serve(self) -> None:
            pass

    real_signature = inspect.signature(granian.server.Server.__init__)
    monkeypatch.setattr(granian.server, "Server", FakeServer)
    monkeypatch.setattr(entrypoint.os, "environ", {})
    entrypoint.main(["--host", "127.0.0.1", "--port", "9100", "--log-level", "trace"])

    ((args, kwargs),) = calls
    real_signature.bind(None, *args, **kwargs)  # the real granian accepts these arguments
    assert args == ("app.main:create_app",)
    assert kwargs["factory"] is True and kwargs["workers"] == 1 and kwargs["interface"] == "asgi"
    assert (kwargs["address"], kwargs["port"]) == ("127.0.0.1", 9100)
    assert kwargs["log_level"] == "debug"  # granian has no trace level
    # Past SHUTDOWN_GRACE_S (30) for the drain's last writes, but a client that stopped reading
    # cannot keep the process 15 s past it (granian's kill was at grace + 15).
    assert 30 < kwargs["workers_kill_timeout"] <= 35


def test_transformers_path_installs_then_reports_fresh_version(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs):
        commands.append(cmd)
        if "pip" in cmd:
            return SimpleNamespace(returncode=0, stdout="", stderr="")
        return SimpleNamespace(returncode=0, stdout="9.9.9\n/site/transformers/__init__.py\n", stderr="")

    monkeypatch.setattr(entrypoint.subprocess, "run", fake_run)
    monkeypatch.setattr(entrypoint.os, "environ", {"TRANSFORMERS_INSTALL_PATH": "/wheels/t.whl"})
    monkeypatch.setattr(entrypoint, "serve", lambda settings: None)
    entrypoint.main([])

    assert commands[0] == [sys.executable, "-m", "pip", "install", "-U", "/wheels/t.whl"]
    assert commands[1][0] == sys.executable  # probe runs in a fresh interpreter
    assert "[entrypoint] transformers 9.9.9 from /site/transformers/__init__.py" in capsys.readouterr().out


def test_failed_transformers_install_stops_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entrypoint.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=1))
    monkeypatch.setattr(entrypoint.os, "environ", {})
    monkeypatch.setattr(entrypoint, "serve", lambda settings: pytest.fail("served"))
    with pytest.raises(SystemExit) as info:
        entrypoint.main(["--transformers-path", "git+https://example.invalid/t.git"])
    assert info.value.code == 1


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--gpu-count", "2"], "GPU_COUNT=2"),
        (["--gpu-ids", "0,1"], "GPU_IDS"),
        (["--device", "cuda"], "DEVICE=cuda"),
    ],
)
def test_gpus_asked_for_and_absent_fail_in_one_line(flags: list[str], named: str, monkeypatch) -> None:
    """Requested GPUs never silently become CPU (this machine has none)."""
    monkeypatch.setattr(entrypoint, "serve", lambda settings: pytest.fail("must not serve"))
    monkeypatch.setattr(entrypoint, "prepare_runtime_env", lambda settings: None)
    for name in ("GPU_COUNT", "GPU_IDS", "DEVICE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        entrypoint.main(flags)
    assert exit_info.value.code == 2


def test_gpus_asked_for_and_absent_message(capsys, monkeypatch) -> None:
    monkeypatch.setattr(entrypoint, "serve", lambda settings: pytest.fail("must not serve"))
    for name in ("GPU_COUNT", "GPU_IDS", "DEVICE"):  # main() writes flags into os.environ
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        entrypoint.main(["--gpu-count", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "entrypoint: GPU_COUNT=2 asks for GPUs but no CUDA device is visible; set DEVICE=cpu to serve on CPU"
    ]


def test_cpu_when_nothing_was_asked_for_says_so(capsys, monkeypatch) -> None:
    served = []
    monkeypatch.setattr(entrypoint, "serve", served.append)
    monkeypatch.setattr(entrypoint, "prepare_runtime_env", lambda settings: None)
    for name in ("GPU_COUNT", "GPU_IDS", "DEVICE"):
        monkeypatch.delenv(name, raising=False)
    entrypoint.main([])
    assert len(served) == 1
    assert "no CUDA device is visible: serving on CPU" in capsys.readouterr().err
    entrypoint.main(["--device", "cpu"])  # asked for: no warning
    assert "serving on CPU" not in capsys.readouterr().err


def test_strict_attention_the_machine_cannot_run_fails_before_serving(capsys, monkeypatch) -> None:
    """The spec's ATTN_STRICT: no fallback, startup fails (FlashAttention 2 needs a CUDA device);
    a kernel every machine has is left to the load, which reports a model that lacks it."""
    served = []
    monkeypatch.setattr(entrypoint, "serve", served.append)
    monkeypatch.setattr(entrypoint, "prepare_runtime_env", lambda settings: None)
    for name in ("ATTN_IMPL", "ATTN_STRICT", "DEVICE", "GPU_COUNT", "GPU_IDS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        entrypoint.main(["--attn-strict", "true", "--attn-impl", "flash_attention_2"])
    assert exit_info.value.code == 2 and not served
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "entrypoint: ATTN_STRICT is set and attention flash_attention_2 cannot run on cpu: needs a CUDA device"
    )
    entrypoint.main(["--attn-strict", "true", "--attn-impl", "eager"])
    assert len(served) == 1
    entrypoint.main(["--attn-strict", "false", "--attn-impl", "flash_attention_2"])  # falls back at load
    assert len(served) == 2


def test_a_port_someone_listens_on_fails_clearly(capsys) -> None:
    """granian binds with SO_REUSEPORT: a second server on a served port came up beside the first
    and the kernel split connections between them. The entrypoint refuses it before granian."""
    import socket

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as granian's own
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            entrypoint.check_port_free("0.0.0.0", port)
        assert exited.value.code == 98
        assert f"port {port} on 0.0.0.0 is already in use" in capsys.readouterr().err
    entrypoint.check_port_free("127.0.0.1", port)  # free again once it closed


def test_the_health_url_for_the_images_healthcheck_follows_the_flags(tmp_path, monkeypatch) -> None:
    """The image's HEALTHCHECK runs apart from the server and sees no flags: `--port 9000` left it
    probing 8000, and the container was reported unhealthy."""
    import re

    monkeypatch.setattr(entrypoint, "HEALTH_URL_FILE", tmp_path / "url")
    for host, url in [
        ("0.0.0.0", "http://127.0.0.1:9000/health"),
        ("10.1.2.3", "http://10.1.2.3:9000/health"),
        ("::1", "http://[::1]:9000/health"),
    ]:
        entrypoint.note_health_url(host, 9000)
        assert (tmp_path / "url").read_text().strip() == url
    healthcheck = re.search(r"HEALTHCHECK .*\n\s+CMD (\[.*\])", (ROOT / "Dockerfile").read_text()).group(1)
    script = json.loads(healthcheck)[2]
    # A server answering /health on a port only the noted file names; PORT points nowhere.
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.RequestHandlerClass.do_GET = lambda handler: (handler.send_response(200), handler.end_headers())
    threading.Thread(target=server.handle_request, daemon=True).start()
    (tmp_path / "docoserve-health-url").write_text(f"http://127.0.0.1:{server.server_port}/health\n")
    try:
        probe = subprocess.run(
            [sys.executable, "-c", script],
            # A cluster-wide proxy without NO_PROXY must not take the probe of our own port.
            env={
                "TMPDIR": str(tmp_path),
                "PORT": "1",
                "HTTP_PROXY": "http://127.0.0.1:1",
                "http_proxy": "http://127.0.0.1:1",
            },
            capture_output=True,
            timeout=30,
        )
    finally:
        server.server_close()
    assert probe.returncode == 0, probe.stderr
