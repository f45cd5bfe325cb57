"""Download progress lines: logged while the model's hub folder grows, never naming the model."""

from __future__ import annotations

import logging
import os
import re
import time

import pytest

from models.download import download_progress, folder_bytes, hub_folder


def test_hub_folder_follows_the_hub_cache_layout(tmp_path):
    assert hub_folder("org/name", str(tmp_path)) == tmp_path / "models--org--name"


def test_folder_bytes_counts_partial_files_once(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "a.incomplete").write_bytes(b"x" * 100)
    (tmp_path / "snap").mkdir()
    os.symlink(blobs / "a.incomplete", tmp_path / "snap" / "link")
    assert folder_bytes(tmp_path) == 100
    assert folder_bytes(tmp_path / "missing") == 0


def test_progress_is_logged_while_the_folder_grows(tmp_path, caplog):
    folder = tmp_path / "models--secret-org--secret-model"
    folder.mkdir()
    with caplog.at_level(logging.INFO, logger="docoserve.model"):
        with download_progress(folder, "cuda:0", interval=0.05):
            for index in range(4):
                (folder / f"part{index}").write_bytes(b"x" * 1_000_000)
                time.sleep(0.12)
    lines = [r.getMessage() for r in caplog.records if "downloading the model" in r.getMessage()]
    assert lines, caplog.text
    pattern = re.compile(
        r"\[startup\]\[cuda:0\] downloading the model: (\d+\.\d) MiB so far \(\d+\.\d MB/s\)"
    )
    sizes = [float(pattern.fullmatch(line).group(1)) for line in lines]
    assert sizes == sorted(sizes) and 0 < sizes[-1] <= 3.9
    assert all("secret" not in line for line in lines)


def test_a_hub_that_never_answers_fails_the_request_in_bounded_time(monkeypatch):
    """transformers' from_pretrained first asks the hub for the model's info with no timeout: a
    hub (or proxy) that accepted the connection and never answered held startup forever."""
    import socket
    import threading
    import time

    from huggingface_hub import HfApi

    from models import download

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    monkeypatch.setitem(download.HUB_TIMEOUTS_S, "read", 1.0)
    download.bound_hub_requests()
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match="(?i)timed? ?out"):
            HfApi(endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}").model_info("org/model")
    finally:
        listener.close()
    assert time.monotonic() - started < 10
    assert accepted, "the request reached the silent hub"


def test_a_long_load_says_it_is_still_loading_without_naming_the_model(caplog):
    from models.download import still_loading

    with caplog.at_level(logging.INFO, logger="docoserve.model"), still_loading("cpu", interval=0.05):
        time.sleep(0.3)
    beats = [r.getMessage() for r in caplog.records if "still loading" in r.getMessage()]
    assert len(beats) >= 2 and all(
        line.startswith("[startup][cpu] still loading the model") for line in beats
    )


def test_an_operators_hub_timeout_raises_the_bound(monkeypatch):
    """A mirror that takes 25 s to start a file (HF_HUB_DOWNLOAD_TIMEOUT=60) was cut at 20 s."""
    import httpx

    from models import download

    request = httpx.Request(
        "GET", "http://127.0.0.1/x", extensions={"timeout": {"connect": None, "read": 60.0}}
    )
    download._bound_timeouts(request)
    assert request.extensions["timeout"]["read"] == download.HUB_TIMEOUTS_S["read"]
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "60")
    request = httpx.Request(
        "GET", "http://127.0.0.1/x", extensions={"timeout": {"connect": None, "read": 60.0}}
    )
    download._bound_timeouts(request)
    assert request.extensions["timeout"]["read"] == 60.0
