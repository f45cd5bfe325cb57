"""Shared fixtures: tiny random-weight models, built once per test session into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_text_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import build_text_model

    return build_text_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import build_vlm_model

    return build_vlm_model(tmp_path_factory.mktemp("models") / "tiny-vlm")
