"""lm-evaluation-harness against the real server: `local-completions` log-likelihood (multiple
choice, which needs echo + logprobs of the prompt tokens) and `local-chat-completions` generation,
on tiny tasks read from local files (tests/integration/lm_eval_tasks; nothing is downloaded)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from models.tiny import BUILD_VERSION
from tests.integration.conftest import Launcher, Server

TASKS = Path(__file__).parent / "lm_eval_tasks"

pytestmark = pytest.mark.slow


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text_server: Server):
    """lm_eval, offline, reading the task files from their folder, with the server's key."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", text_server.api_key)
    monkeypatch.chdir(TASKS)  # the tasks' data_files are relative to it
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    return lm_eval, TaskManager(include_path=str(TASKS))


def _tokenizer_folder(server_launcher: Launcher) -> str:
    """The folder the server built `builtin:tiny` into: lm_eval tokenizes with it, offline."""
    folder = server_launcher.cache_dir / "builtin" / f"tiny-v{BUILD_VERSION}"
    assert (folder / "tokenizer_config.json").is_file(), folder
    return str(folder)


def _model_args(server: Server, path: str, **extra: str) -> str:
    args = {
        "base_url": f"{server.base_url}{path}",
        "model": server.model_name,
        "num_concurrent": "1",
        **extra,
    }
    return ",".join(f"{key}={value}" for key, value in args.items())


def test_local_completions_loglikelihood(harness, text_server: Server, server_launcher: Launcher) -> None:
    lm_eval, tasks = harness
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=_model_args(
            text_server,
            "/v1/completions",
            tokenizer_backend="huggingface",
            tokenizer=_tokenizer_folder(server_launcher),
        ),
        tasks=["docoserve_tiny_mc"],
        task_manager=tasks,
        limit=4,
        log_samples=True,
    )
    metrics = results["results"]["docoserve_tiny_mc"]
    acc = metrics["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and acc * 4 == round(acc * 4)
    samples = results["samples"]["docoserve_tiny_mc"]
    assert len(samples) == 4
    for sample in samples:
        # Each choice was scored: a finite, negative sum of its tokens' logprobs.
        scores = [response[0] for response in sample["filtered_resps"]]
        assert scores and all(math.isfinite(s) and s < 0 for s in scores)
        assert len(set(scores)) == len(scores)


def test_local_chat_completions_generation(harness, text_server: Server) -> None:
    lm_eval, tasks = harness
    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=_model_args(text_server, "/v1/chat/completions"),
        tasks=["docoserve_tiny_gen"],
        task_manager=tasks,
        apply_chat_template=True,
        limit=2,
        log_samples=True,
    )
    metrics = results["results"]["docoserve_tiny_gen"]
    assert metrics["exact_match,none"] in (0.0, 0.5, 1.0)
    samples = results["samples"]["docoserve_tiny_gen"]
    assert len(samples) == 2
    assert all(isinstance(sample["resps"][0][0], str) for sample in samples)
