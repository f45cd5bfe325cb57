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
        ({"debug": True}, {"INFO", "WARNING", "ERROR"}),
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
