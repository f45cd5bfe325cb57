"""Log formats: every line of the process in one format, plain (default) or JSON (LOG_FORMAT=json).

JSON lines carry `ts`, `level`, `logger` and `message`, plus the structured `fields` a record
brings (the per-request line, `app.access_log`), each as its own key, so a log pipeline needs no
parsing. granian's own lines (startup, workers) use the same formatters (`granian_log_config`).
"""

from __future__ import annotations

import logging
import time

import msgspec

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_encoder = msgspec.json.Encoder()
_TRACEBACKS = logging.Formatter()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update((k, v) for k, v in fields.items() if k not in line)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # a Redactor may have set it, redacted
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _encoder.encode(line).decode()


class Redactor(logging.Filter):
    """Replaces the model's source (path, hub id, its cache folder name, revision, cache dir) in
    every record a handler emits: with `--debug`, transformers and huggingface_hub log the files
    they open, which name the model `REDACT_SOURCE` hides."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first: a path that contains the hub id is replaced whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        # A traceback names the files and repo ids its frames held (DEBUG prints them): formatted
        # here, redacted, and kept where formatters look for it first.
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        return True

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        return text


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(PLAIN)


def granian_log_config(log_format: str, level: str) -> dict:
    """granian's logging dictConfig with our formatter, so its lines match ours."""
    fmt = {"()": "app.log_format.JsonFormatter"} if log_format == "json" else {"format": PLAIN}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": fmt},
        "handlers": {"console": handler},
        "loggers": {
            "_granian": {"handlers": ["console"], "level": level.upper(), "propagate": False},
            "granian.access": {"handlers": ["console"], "level": level.upper(), "propagate": False},
        },
    }
