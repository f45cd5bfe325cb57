"""Settings: defaults, parsing of every variable, aliases, validation errors, redaction."""

from __future__ import annotations

import json

import msgspec
import pytest

from app.settings import DEFAULT_CACHE_DIR, ENV_NAMES, Settings, SettingsError

MiB = 1024 * 1024

EXPECTED_DEFAULTS = {
    "model_path": "builtin:tiny-vlm",
    "model_name": "model",
    "model_revision": None,
    "chat_template": None,
    "trust_remote_code": True,
    "hf_token": None,
    "cache_dir": DEFAULT_CACHE_DIR,
    "transformers_path": None,
    "attn_impl": "flash_attention_2",
    "attn_strict": False,
    "dtype": "bf16",
    "gpu_ids": None,
    "gpu_count": None,
    "device": "auto",
    "gpus_per_replica": 1,
    "cpu_replicas": 1,
    "cpu_packed_linears": True,
    "max_batch_size": 32,
    "batch_timeout_ms": 0.0,
    "max_prefill_tokens": 0,
    "stream_interval": 1,
    "max_input_tokens": 16384,
    "default_max_tokens": 128,
    "max_queue_size": 256,
    "max_prompts_per_request": 64,
    "kv_cache_max_gib": 0.0,
    "kv_cache_gpu_fraction": 0.9,
    "kv_block_size": 0,
    "enable_prefix_caching": True,
    "enforce_eager": False,
    "default_do_sample": True,
    "default_temperature": 0.8,
    "default_top_p": 0.9,
    "default_seed": 42,
    "default_top_k": 0,
    "default_min_p": 0.0,
    "default_repetition_penalty": 1.0,
    "host": "0.0.0.0",
    "port": 8000,
    "log_level": "info",
    "progress_logs": False,
    "fast_usage": True,
    "redact_source": True,
    "debug": False,
    "api_key": None,
    "max_request_body_bytes": 64 * MiB,
    "shutdown_grace_s": 30.0,
    "http_header_timeout_s": 10.0,
    "http_body_timeout_s": 30.0,
    "http_max_connections": 0,
    "tool_call_parser": "auto",
    "max_images_per_request": 10,
    "max_image_size": 1024,
    "max_image_bytes": 20 * MiB,
    "max_image_pixels": 50_000_000,
    "allow_remote_images": True,
    "image_url_allowed_hosts": (),
    "cors_allow_origins": (),
    "log_format": "plain",
    "metrics_public": False,
    "allow_private_image_urls": False,
    "image_url_allowed_networks": (),
    "image_fetch_timeout_s": 10.0,
}

# env var -> (raw value, field, parsed value); one non-default value for every variable.
EVERY_VAR = {
    "MODEL_PATH": ("/models/omega", "model_path", "/models/omega"),
    "MODEL_NAME": ("omega", "model_name", "omega"),
    "MODEL_REVISION": ("v1.2", "model_revision", "v1.2"),
    "CHAT_TEMPLATE": ("{{ messages[0].content }}", "chat_template", "{{ messages[0].content }}"),
    "TRUST_REMOTE_CODE": ("0", "trust_remote_code", False),
    "HF_TOKEN": ("hf_abc", "hf_token", "hf_abc"),
    "CACHE_DIR": ("/data/cache", "cache_dir", "/data/cache"),
    "TRANSFORMERS_INSTALL_PATH": ("/wheels/t.whl", "transformers_path", "/wheels/t.whl"),
    "ATTN_IMPL": ("EAGER", "attn_impl", "eager"),
    "ATTN_STRICT": ("true", "attn_strict", True),
    "DTYPE": ("fp16", "dtype", "fp16"),
    "GPU_IDS": (" 0, 2 ", "gpu_ids", (0, 2)),
    "GPU_COUNT": ("4", "gpu_count", 4),
    "DEVICE": ("cpu", "device", "cpu"),
    "GPUS_PER_REPLICA": ("2", "gpus_per_replica", 2),
    "CPU_REPLICAS": ("3", "cpu_replicas", 3),
    "CPU_PACKED_LINEARS": ("off", "cpu_packed_linears", False),
    "MAX_BATCH_SIZE": ("8", "max_batch_size", 8),
    "BATCH_TIMEOUT_MS": ("6", "batch_timeout_ms", 6.0),
    "MAX_PREFILL_TOKENS": ("2048", "max_prefill_tokens", 2048),
    "STREAM_INTERVAL": ("4", "stream_interval", 4),
    "MAX_INPUT_TOKENS": ("4096", "max_input_tokens", 4096),
    "MAX_NEW_TOKENS_DEFAULT": ("256", "default_max_tokens", 256),
    "MAX_QUEUE_SIZE": ("16", "max_queue_size", 16),
    "KV_CACHE_MAX_GIB": ("12.5", "kv_cache_max_gib", 12.5),
    "KV_CACHE_GPU_FRACTION": ("0.8", "kv_cache_gpu_fraction", 0.8),
    "KV_BLOCK_SIZE": ("32", "kv_block_size", 32),
    "ENABLE_PREFIX_CACHING": ("off", "enable_prefix_caching", False),
    "ENFORCE_EAGER": ("true", "enforce_eager", True),
    "DO_SAMPLE_DEFAULT": ("off", "default_do_sample", False),
    "TEMPERATURE_DEFAULT": ("0.7", "default_temperature", 0.7),
    "TOP_P_DEFAULT": ("0.95", "default_top_p", 0.95),
    "SEED_DEFAULT": ("123", "default_seed", 123),
    "TOP_K_DEFAULT": ("50", "default_top_k", 50),
    "MIN_P_DEFAULT": ("0.05", "default_min_p", 0.05),
    "REPETITION_PENALTY_DEFAULT": ("1.1", "default_repetition_penalty", 1.1),
    "HOST": ("127.0.0.1", "host", "127.0.0.1"),
    "PORT": ("9000", "port", 9000),
    "LOG_LEVEL": ("WARNING", "log_level", "warning"),
    "PROGRESS_LOGS": ("1", "progress_logs", True),
    "FAST_USAGE": ("no", "fast_usage", False),
    "REDACT_SOURCE": ("false", "redact_source", False),
    "DEBUG": ("yes", "debug", True),
    "API_KEY": ("sk-test", "api_key", "sk-test"),
    "MAX_REQUEST_BODY_BYTES": ("1048576", "max_request_body_bytes", 1048576),
    "SHUTDOWN_GRACE_S": ("5.5", "shutdown_grace_s", 5.5),
    "MAX_PROMPTS_PER_REQUEST": ("8", "max_prompts_per_request", 8),
    "HTTP_HEADER_TIMEOUT_S": ("3", "http_header_timeout_s", 3.0),
    "HTTP_BODY_TIMEOUT_S": ("7.5", "http_body_timeout_s", 7.5),
    "HTTP_MAX_CONNECTIONS": ("4096", "http_max_connections", 4096),
    "TOOL_CALL_PARSER": ("Mistral", "tool_call_parser", "mistral"),
    "MAX_IMAGES_PER_REQUEST": ("0", "max_images_per_request", 0),
    "MAX_IMAGE_SIZE": ("512", "max_image_size", 512),
    "MAX_IMAGE_BYTES": ("1000", "max_image_bytes", 1000),
    "MAX_IMAGE_PIXELS": ("4000000", "max_image_pixels", 4_000_000),
    "ALLOW_REMOTE_IMAGES": ("0", "allow_remote_images", False),
    "IMAGE_URL_ALLOWED_HOSTS": ("A.test, ,b.test.", "image_url_allowed_hosts", ("a.test", "b.test")),
    "CORS_ALLOW_ORIGINS": ("https://a.test/, *", "cors_allow_origins", ("https://a.test", "*")),
    "LOG_FORMAT": ("json", "log_format", "json"),
    "METRICS_PUBLIC": ("true", "metrics_public", True),
    "ALLOW_PRIVATE_IMAGE_URLS": ("1", "allow_private_image_urls", True),
    "IMAGE_URL_ALLOWED_NETWORKS": (
        "10.20.0.0/16, 127.0.0.1",
        "image_url_allowed_networks",
        ("10.20.0.0/16", "127.0.0.1/32"),
    ),
    "IMAGE_FETCH_TIMEOUT_S": ("2.5", "image_fetch_timeout_s", 2.5),
}


def test_defaults_match_the_table() -> None:
    assert msgspec.structs.asdict(Settings.from_env({})) == EXPECTED_DEFAULTS
    assert Settings() == Settings.from_env({})


def test_every_field_has_an_env_var_and_every_var_is_tested() -> None:
    assert set(ENV_NAMES) == set(EXPECTED_DEFAULTS) == {f.name for f in msgspec.structs.fields(Settings)}
    assert {names[0] for names in ENV_NAMES.values()} == set(EVERY_VAR)


@pytest.mark.parametrize("name", sorted(EVERY_VAR))
def test_every_env_var_parses(name: str) -> None:
    raw, field, expected = EVERY_VAR[name]
    settings = Settings.from_env({name: raw})
    assert getattr(settings, field) == expected


def test_all_vars_together() -> None:
    settings = Settings.from_env({name: raw for name, (raw, _, _) in EVERY_VAR.items()})
    for _, field, expected in EVERY_VAR.values():
        assert getattr(settings, field) == expected


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_empty_string_is_unset() -> None:
    settings = Settings.from_env({"PORT": "", "DTYPE": "  ", "GPU_IDS": "", "API_KEY": ""})
    assert (settings.port, settings.dtype, settings.gpu_ids, settings.api_key) == (8000, "bf16", None, None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(v, True) for v in ("1", "true", "TRUE", "yes", "On")] + [(v, False) for v in ("0", "false", "OFF")],
)
def test_boolean_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_env({"PROGRESS_LOGS": raw}).progress_logs is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("bfloat16", "bf16"), ("BF16", "bf16"), ("float16", "fp16"), ("half", "fp16"), ("float32", "fp32")],
)
def test_dtype_aliases_are_normalised(raw: str, expected: str) -> None:
    assert Settings.from_env({"DTYPE": raw}).dtype == expected


def test_env_aliases() -> None:
    aliased = Settings.from_env(
        {"MODEL_ID": "org/m", "MAX_CONTEXT_TOKENS": "100", "HUGGING_FACE_HUB_TOKEN": "hf_old"}
    )
    assert (aliased.model_path, aliased.max_input_tokens, aliased.hf_token) == ("org/m", 100, "hf_old")


def test_canonical_name_beats_alias() -> None:
    both = Settings.from_env(
        {
            "MODEL_PATH": "a",
            "MODEL_ID": "b",
            "MAX_INPUT_TOKENS": "1",
            "MAX_CONTEXT_TOKENS": "2",
            "HF_TOKEN": "new",
            "HUGGING_FACE_HUB_TOKEN": "old",
        }
    )
    assert (both.model_path, both.max_input_tokens, both.hf_token) == ("a", 1, "new")


def test_error_names_the_alias_that_carried_the_value() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"MAX_CONTEXT_TOKENS": "lots"})
    assert info.value.name == "MAX_CONTEXT_TOKENS"


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("DTYPE", "fp8"),
        ("ATTN_IMPL", "flash"),
        ("DEVICE", "tpu"),
        ("LOG_LEVEL", "loud"),
        ("GPU_IDS", "a,b"),
        ("GPU_IDS", "0,,1"),
        ("GPU_IDS", "-1"),
        ("GPU_IDS", "0,0"),
        ("GPU_COUNT", "0"),
        ("CPU_REPLICAS", "17"),
        ("PORT", "0x"),
        ("PORT", "0"),
        ("PORT", "65536"),
        ("PORT", "8_000"),
        ("MAX_BATCH_SIZE", "0"),
        ("MAX_BATCH_SIZE", "1025"),
        ("BATCH_TIMEOUT_MS", "-1"),
        ("BATCH_TIMEOUT_MS", "nan"),
        ("MAX_PREFILL_TOKENS", "8"),
        ("STREAM_INTERVAL", "0"),
        ("STREAM_INTERVAL", "1025"),
        ("MAX_INPUT_TOKENS", "0"),
        ("MAX_NEW_TOKENS_DEFAULT", "1.5"),
        ("MAX_QUEUE_SIZE", "0"),
        ("TEMPERATURE_DEFAULT", "2.5"),
        ("TEMPERATURE_DEFAULT", "inf"),
        ("TOP_P_DEFAULT", "0"),
        ("TOP_P_DEFAULT", "1.01"),
        ("SEED_DEFAULT", "-1"),
        ("SEED_DEFAULT", "abc"),
        ("TOP_K_DEFAULT", "-1"),
        ("MIN_P_DEFAULT", "1.5"),
        ("REPETITION_PENALTY_DEFAULT", "0"),
        ("DEBUG", "maybe"),
        ("TRUST_REMOTE_CODE", "2"),
        ("MAX_REQUEST_BODY_BYTES", "10"),
        ("SHUTDOWN_GRACE_S", "-1"),
        ("TOOL_CALL_PARSER", "pythonic"),
        ("MAX_IMAGES_PER_REQUEST", "-1"),
        ("MAX_IMAGE_SIZE", "8"),
        ("MAX_IMAGE_BYTES", "0"),
        ("MAX_IMAGE_PIXELS", "0"),
        ("IMAGE_FETCH_TIMEOUT_S", "0"),
        ("CORS_ALLOW_ORIGINS", "chat.example.com"),
        # Entries that would never match a host: found at startup, not when the app is built.
        ("IMAGE_URL_ALLOWED_HOSTS", "*"),
        ("IMAGE_URL_ALLOWED_HOSTS", "https://cdn.example.com"),
        ("IMAGE_URL_ALLOWED_HOSTS", "cdn.example.com:443"),
        ("IMAGE_URL_ALLOWED_HOSTS", "cdn.example.com/images"),
        ("IMAGE_URL_ALLOWED_HOSTS", "bad*host"),
        ("HOST", "999.1.1.1"),
        ("HOST", "no-such-host.invalid"),
        ("LOG_FORMAT", "xml"),
        ("CHAT_TEMPLATE", "/no/such/template.jinja"),
        ("CHAT_TEMPLATE", "{% for m in messages %}"),
    ],
)
def test_invalid_values_raise_settings_error_naming_the_var(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: raw})
    err = info.value
    assert err.name == name
    assert name in str(err) and repr(raw) in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("raw", "bound"), [("localhost", "127.0.0.1"), ("[::1]", "::1"), ("0.0.0.0", "0.0.0.0")]
)
def test_host_names_resolve_to_the_address_granian_binds(raw: str, bound: str) -> None:
    # granian takes IP literals only; uvicorn (the seed's server) took `localhost` too.
    assert Settings.from_env({"HOST": raw}).host == bound


def test_an_ipv6_address_is_an_allowed_image_host_with_or_without_brackets() -> None:
    from app.media import ImageFetchPolicy

    hosts = Settings.from_env({"IMAGE_URL_ALLOWED_HOSTS": "::1,[2001:db8::1]"}).image_url_allowed_hosts
    policy = ImageFetchPolicy(allowed_hosts=hosts)
    assert policy.host_allowed("::1") and policy.host_allowed("2001:db8::1")
    assert not policy.host_allowed("2001:db8::2")


def test_error_message_lists_choices() -> None:
    with pytest.raises(SettingsError, match=r"invalid DTYPE: 'fp8' \(choose bf16, fp16, fp32\)"):
        Settings.from_env({"DTYPE": "fp8"})


def test_long_or_multiline_values_stay_on_one_line() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"PORT": "1\n2" + "9" * 200})
    assert "\n" not in str(info.value) and len(str(info.value)) < 120


@pytest.mark.parametrize("raw", ["EMPTY", "", "  "])
def test_empty_api_key_disables_auth(raw: str) -> None:
    assert Settings.from_env({"API_KEY": raw}).api_key is None


def test_api_key_whitespace_is_stripped() -> None:
    # Keys mounted from files often end with a newline.
    assert Settings.from_env({"API_KEY": "sk-1\n"}).api_key == "sk-1"


def test_seed_none_means_random() -> None:
    assert Settings.from_env({"SEED_DEFAULT": "none"}).default_seed is None
    assert Settings.from_env({"SEED_DEFAULT": "0"}).default_seed == 0


def test_gpu_ids_and_gpu_count_are_both_kept() -> None:
    settings = Settings.from_env({"GPU_IDS": "1,0", "GPU_COUNT": "4"})
    assert settings.gpu_ids == (1, 0) and settings.gpu_count == 4


def test_debug_implies_debug_log_level() -> None:
    assert Settings.from_env({"DEBUG": "1"}).log_level == "debug"


def test_debug_turns_progress_logs_on_unless_they_are_set() -> None:
    assert Settings.from_env({"DEBUG": "1"}).progress_logs is True
    assert Settings.from_env({"DEBUG": "1", "PROGRESS_LOGS": "false"}).progress_logs is False
    assert Settings.from_env({}).progress_logs is False


def test_explicit_log_level_beats_debug() -> None:
    assert Settings.from_env({"DEBUG": "1", "LOG_LEVEL": "warning"}).log_level == "warning"


def test_log_level_warn_alias() -> None:
    assert Settings.from_env({"LOG_LEVEL": "warn"}).log_level == "warning"


def test_cache_dir_falls_back_to_hf_variables() -> None:
    assert Settings.from_env({"HF_HUB_CACHE": "/hub"}).cache_dir == "/hub"
    assert Settings.from_env({"HF_HOME": "/hf"}).cache_dir == "/hf/hub"
    assert Settings.from_env({"HF_HOME": "/hf", "HF_HUB_CACHE": "/hub"}).cache_dir == "/hub"
    assert Settings.from_env({"CACHE_DIR": "/c", "HF_HUB_CACHE": "/hub"}).cache_dir == "/c"


def test_redacted_dict_hides_secrets_and_source() -> None:
    settings = Settings.from_env(
        {
            "API_KEY": "sk-secret",
            "HF_TOKEN": "hf_secret",
            "MODEL_PATH": "/models/private-model",
            "MODEL_REVISION": "abc123",
            "CACHE_DIR": "/private/cache",
            "GPU_IDS": "0,1",
        }
    )
    data = settings.redacted_dict()
    text = json.dumps(data)
    for secret in ("sk-secret", "hf_secret", "private-model", "abc123", "/private/cache"):
        assert secret not in text
    assert "api_key" not in data and "hf_token" not in data
    assert data["auth_enabled"] is True and data["hf_token_set"] is True
    assert data["model_path"] == "<redacted>" and data["gpu_ids"] == [0, 1]
    assert data["model_name"] == "model"


def test_redacted_dict_shows_source_when_redaction_is_off() -> None:
    env = {"MODEL_PATH": "/models/m", "REDACT_SOURCE": "0", "API_KEY": "k"}
    data = Settings.from_env(env).redacted_dict()
    assert data["model_path"] == "/models/m" and data["model_revision"] is None
    assert "api_key" not in data and "k" not in data.values()


def test_redacted_dict_of_defaults() -> None:
    data = Settings().redacted_dict()
    assert data["auth_enabled"] is False and data["hf_token_set"] is False
    assert data["model_revision"] is None and data["image_url_allowed_hosts"] == []
    json.dumps(data)


def test_metrics_guard_opens_only_with_metrics_public() -> None:
    from types import SimpleNamespace

    from litestar.datastructures import Headers
    from litestar.exceptions import NotAuthorizedException

    from app.auth import require_api_key_for_metrics

    def connection(public: bool, header: str = "") -> SimpleNamespace:
        state = SimpleNamespace(metrics_public=public, api_key_bytes=b"secret")
        headers = Headers([(b"authorization", header.encode())] if header else [])
        return SimpleNamespace(app=SimpleNamespace(state=state), headers=headers)

    require_api_key_for_metrics(connection(True), None)  # open
    require_api_key_for_metrics(connection(False, "Bearer secret"), None)
    with pytest.raises(NotAuthorizedException):
        require_api_key_for_metrics(connection(False), None)


def test_chat_template_from_a_file_is_its_content(tmp_path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}\n")
    assert Settings.from_env({"CHAT_TEMPLATE": str(path)}).chat_template == path.read_text()


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "is an empty file"),
        ("{% if x %}", "is not a valid Jinja template"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
)
def test_a_chat_template_file_that_cannot_serve_is_refused(tmp_path, content, needle) -> None:
    path = tmp_path / "t.jinja"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env({"CHAT_TEMPLATE": str(path)})
