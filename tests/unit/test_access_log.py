"""The request id a caller sends is kept only when it cannot forge fields of the log line."""

from __future__ import annotations

import pytest

from app.access_log import request_id_from


@pytest.mark.parametrize("supplied", ["abc-123", "trace.id:42_x", "A" * 128])
def test_sane_ids_are_kept(supplied: str) -> None:
    assert request_id_from([(b"x-request-id", supplied.encode())]) == supplied


@pytest.mark.parametrize(
    "supplied", [b"", b"a b", b'x" status=200', b"id=forged", b"\xff\xfe", b"A" * 129, b"line\nbreak"]
)
def test_other_ids_are_replaced(supplied: bytes) -> None:
    replaced = request_id_from([(b"x-request-id", supplied)])
    assert replaced.startswith("req-") and len(replaced) == 36


def test_without_a_header_a_new_id() -> None:
    first, second = request_id_from([]), request_id_from([])
    assert first.startswith("req-") and first != second


def test_the_model_source_is_cut_out_of_every_line_when_redacted(tmp_path) -> None:
    """With --debug, transformers logs the files it opens; REDACT_SOURCE keeps the source out."""
    import io
    import logging

    from app.log_format import Redactor
    from app.main import source_secrets
    from app.settings import Settings

    settings = Settings(model_path="org/secret-model", model_revision="0123456789abcdef", cache_dir="/c/hub")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(Redactor(source_secrets(settings)))
    logger = logging.getLogger("transformers.test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("loading %s from cache at %s", "config.json", "/c/hub/models--org--secret-model/snap")
        logger.warning("revision 0123456789abcdef of org/secret-model; app.main stays")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "secret" not in text and "0123456789abcdef" not in text and "/c/hub" not in text
    assert "loading config.json from cache at <redacted>/<redacted>/snap" in text
    assert "app.main stays" in text
    assert source_secrets(Settings(model_path="builtin:tiny")) == []
    assert "main" not in source_secrets(Settings(model_path="/m/x", model_revision="main"))


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_tracebacks_and_stacks_are_redacted_too(log_format) -> None:
    """With DEBUG, transformers logs failures with exc_info: the traceback named the repo id and
    its cache folder while the message above it said <redacted>."""
    import io
    import logging

    from app.log_format import Redactor, formatter
    from app.main import source_secrets
    from app.settings import Settings

    settings = Settings(model_path="org/private-model", cache_dir="/c/hub")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(Redactor(source_secrets(settings)))
    logger = logging.getLogger("transformers.test_traceback_redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        try:
            raise OSError("org/private-model is not in /c/hub/models--org--private-model")
        except OSError:
            logger.debug("could not load org/private-model", exc_info=True)
            logger.warning("stack of org/private-model", stack_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "OSError" in text and "Traceback" in text
    assert "private-model" not in text and "/c/hub" not in text


@pytest.mark.parametrize(
    ("route", "status", "level"),
    [
        ("/health/ready", 503, "INFO"),  # a probe during loading: the answer it asked for
        ("/health", 503, "INFO"),
        ("/v1/chat/completions", 503, "WARNING"),  # backpressure: the client may retry
        ("/v1/chat/completions", 500, "ERROR"),
        ("/v1/chat/completions", 400, "INFO"),
    ],
)
def test_the_access_line_level_says_whether_the_server_failed(route, status, level, caplog) -> None:
    from app.access_log import log_line

    with caplog.at_level("INFO", logger="docoserve.requests"):
        log_line("GET", route, status, 0.001, "req-1", None)
    assert [record.levelname for record in caplog.records] == [level]


@pytest.mark.parametrize(
    ("flags", "logged"),
    [
        ({}, {"WARNING", "ERROR"}),  # the seed's default: per-request lines off, failures still shown
        ({"progress_logs": True}, {"INFO", "WARNING", "ERROR"}),
        # DEBUG turns PROGRESS_LOGS on when it is not set (Settings.from_env); set off, it stays off.
        ({"debug": True, "progress_logs": True}, {"INFO", "WARNING", "ERROR"}),
        ({"debug": True, "progress_logs": False}, {"WARNING", "ERROR"}),
    ],
)
def test_request_lines_follow_progress_logs(flags, logged) -> None:
    import logging

    from app.main import configure_logging
    from app.settings import Settings

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("docoserve.requests").level)
    try:
        configure_logging(Settings(model_path="builtin:tiny", **flags))
        requests = logging.getLogger("docoserve.requests")
        enabled = {
            name for name in ("INFO", "WARNING", "ERROR") if requests.isEnabledFor(getattr(logging, name))
        }
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        logging.getLogger("docoserve.requests").setLevel(saved[2])
    assert enabled == logged


def test_a_client_that_left_is_logged_499_not_the_200_on_the_wire(caplog) -> None:
    from app.access_log import log_line

    generation = {"endpoint": "chat", "id": "chatcmpl-1", "model": "m", "status": 499}
    with caplog.at_level("INFO", logger="docoserve.requests"):
        log_line("POST", "/v1/chat/completions", 200, 0.5, "req-1", generation)
    [record] = caplog.records
    assert record.getMessage().startswith("[req] chat 499 id=chatcmpl-1")
    assert record.fields["status"] == 499


def test_one_token_has_a_rate_over_its_generation_not_over_nothing() -> None:
    """tps was completion tokens over the time from the first token to the last: 1264225.0 for
    a one-token answer. The seed's rate is over the generation, from its first step."""
    import time
    from types import SimpleNamespace

    from app.services import generation_fields

    now = time.monotonic()
    stream = SimpleNamespace(
        first_token_at=now - 0.05,
        finished_at=now - 0.05 + 1e-6,
        scheduled_at=now - 0.1,
        completion_tokens=1,
        prompt_tokens=3,
        num_images=0,
        num_image_tokens=0,
        replica_name="cpu",
        finish_reasons=["length"],
    )
    fields = generation_fields("chat", "chatcmpl-1", now - 0.2, stream, None, model="m", sampling=False)
    assert 19 < fields["tps"] < 21 and 0.04 < fields["gen_s"] < 0.06  # 1 token in 0.05 s


def test_transformers_and_hub_records_go_through_the_redacting_handlers_once() -> None:
    """huggingface_hub's own stderr handler printed its retry warnings (repo id and revision in the
    URL) unredacted, as plain text in a JSON log, and twice; transformers' did the same for its
    records. A fresh process: configure_logging changes the process's logging."""
    import json
    import subprocess
    import sys

    script = """
import logging
from app.main import configure_logging
from app.settings import Settings
configure_logging(Settings(model_path="org/secret-model", model_revision="branch7", log_format="json"))
logging.getLogger("huggingface_hub.utils._http").warning(
    "retrying HEAD https://huggingface.co/org/secret-model/resolve/branch7/config.json")
logging.getLogger("transformers.modeling_utils").warning("weights of org/secret-model not used")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line JSON: none printed by a library's own handler
    messages = [record["message"] for record in records]
    assert len(messages) == 2, messages
    assert "secret-model" not in done.stderr and "branch7" not in done.stderr
    assert any("retrying HEAD" in m for m in messages) and any("weights of" in m for m in messages)


def test_refusals_for_load_are_one_line_per_route_while_per_request_lines_are_off() -> None:
    """A burst of 503s wrote a line each, on the event loop, when it was busiest."""
    import logging
    import time

    from app.access_log import RefusalSampler, log_line, request_log

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    kept, sampler = Keep(), RefusalSampler(every_s=0.3)
    configured = [f for f in request_log.filters if isinstance(f, RefusalSampler)]  # an app's
    for other in configured:
        request_log.removeFilter(other)
    request_log.addHandler(kept)
    request_log.addFilter(sampler)
    try:
        for i in range(5):
            log_line("POST", "/v1/chat/completions", 503, 0.001, f"req-{i}", None)
        log_line("POST", "/v1/completions", 503, 0.001, "req-other", None)
        log_line("POST", "/v1/chat/completions", 500, 0.001, "req-failed", None)
        time.sleep(0.35)
        log_line("POST", "/v1/chat/completions", 503, 0.001, "req-later", None)
    finally:
        request_log.removeFilter(sampler)
        request_log.removeHandler(kept)
        for other in configured:
            request_log.addFilter(other)
    assert [line.split("request_id=")[1].split()[0] for line in kept.lines] == [
        "req-0",
        "req-other",
        "req-failed",  # a failure is never sampled
        "req-later",
    ]
    assert (
        kept.lines[-1].endswith("(and 4 more 503s on /v1/chat/completions in 0 s)")
        or "and 4 more 503s" in kept.lines[-1]
    )
