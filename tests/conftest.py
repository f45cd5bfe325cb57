"""Shared fixtures: tiny random-weight models, built once per test session into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

# The suite runs under `python -O` (make test) to prove no server check relies on `assert`;
# pytest keeps the asserts of test modules and conftests, and these helpers' ones with them.
pytest.register_assert_rewrite(
    "tests.integration.helpers",
    "tests.unit.batch_driver",
    "tests.unit.engine_driver",
    "tests.unit.scheduler_harness",
    "tests.unit.configs",
    "tests.unit.vlm_builders",
    "tests.unit.vlm_builder_parts",
    "tests.unit.vlm_builders_qwen",
)


@pytest.fixture(scope="session")
def tiny_text_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import build_text_model

    return build_text_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import build_vlm_model

    return build_vlm_model(tmp_path_factory.mktemp("models") / "tiny-vlm")
