"""`/v1/models` and `/health` wire types."""

from __future__ import annotations

from typing import Any

import msgspec


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "docoserve"
    object: str = "model"
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class HealthResponse(msgspec.Struct):
    status: str
    model: str
    ready: bool
    uptime_s: float
    replicas: list[dict[str, Any]]
    # Where the model came from, unless REDACT_SOURCE hides it (the seed redacts these three).
    source: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    tool_call_parser: str | None = None  # known once the model has loaded
