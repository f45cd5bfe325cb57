"""Progress of a model download from the hub, as periodic log lines.

huggingface_hub draws its own bars when stderr is a terminal (and the source may be shown); in a
container log, bars are carriage-return noise, so the entrypoint turns them off and this watcher
logs one line every `interval` seconds while the model's folder in the hub cache grows: bytes so
far and the rate. The lines never name the model; still, `REDACT_SOURCE` (on by default) silences
them, as it silences the bars: how much is downloaded, and how fast, says which model it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("docoserve.model")
INTERVAL_S = 10.0

# Bounds on each hub request's phases where huggingface_hub sets none: its model_info (which
# transformers' from_pretrained calls first) passes `timeout=None`, and a hub or proxy that
# accepted the connection and never answered kept the server loading forever, with no log line.
# A read bound is per socket read, not per file: downloads keep streaming. (The hub retries a
# file's metadata request five times, so a silent hub fails the load within about 3 minutes.)
HUB_TIMEOUTS_S = {"connect": 10.0, "read": 20.0, "write": 20.0, "pool": 20.0}
STILL_LOADING_S = 60.0
_hub_bounded = False


def hub_folder(repo_id: str, cache_dir: str | None) -> Path:
    """Where huggingface_hub keeps `repo_id` (its `models--org--name` layout)."""
    root = cache_dir or os.environ.get("HF_HUB_CACHE") or os.path.expanduser("~/.cache/huggingface/hub")
    return Path(root) / ("models--" + repo_id.replace("/", "--"))


def folder_bytes(folder: Path) -> int:
    """Bytes under `folder`, counting partial downloads; links (snapshots/) are not counted twice."""
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with contextlib.suppress(OSError):
                if not os.path.islink(path):
                    total += os.stat(path).st_size
    return total


def _human(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


@contextlib.contextmanager
def download_progress(folder: Path, label: str, *, interval: float = INTERVAL_S) -> Iterator[None]:
    """Log progress while `folder` grows, from a daemon thread, until the block exits."""

    def watch(stop: threading.Event) -> None:
        started, before = time.monotonic(), folder_bytes(folder)
        last = before
        while not stop.wait(interval):
            size = folder_bytes(folder)
            if size > last:
                rate = (size - before) / max(time.monotonic() - started, 1e-6)
                logger.info(
                    "[startup][%s] downloading the model: %s so far (%.1f MB/s)",
                    label,
                    _human(size),
                    rate / 1e6,
                )
            last = size

    with _in_background(watch, "download-progress", join_s=interval):
        yield


def bound_hub_requests() -> None:
    """Give every request huggingface_hub sends a bound on each phase it left unbounded (once per
    process; its shared client is built with this hook from then on)."""
    global _hub_bounded
    if _hub_bounded:
        return
    from huggingface_hub.utils import _http

    def bounded_client():
        client = _http.default_client_factory()
        client.event_hooks = {
            **client.event_hooks,
            "request": [*client.event_hooks["request"], _bound_timeouts],
        }
        return client

    _http.set_client_factory(bounded_client)
    _hub_bounded = True


def _bound_timeouts(request) -> None:
    # Capped too, not only filled in: the hub's retries of a file's metadata wait 60 s a try. An
    # operator's HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT (a slow mirror) raises the cap.
    asked = request.extensions.get("timeout") or {}
    raised = max(_seconds("HF_HUB_DOWNLOAD_TIMEOUT"), _seconds("HF_HUB_ETAG_TIMEOUT"))
    request.extensions["timeout"] = {
        phase: max(bound, raised) if asked.get(phase) is None else min(asked[phase], max(bound, raised))
        for phase, bound in HUB_TIMEOUTS_S.items()
    }


def _seconds(name: str) -> float:
    try:
        return float(os.environ.get(name) or 0)
    except ValueError:
        return 0.0


@contextlib.contextmanager
def still_loading(label: str, *, interval: float = STILL_LOADING_S) -> Iterator[None]:
    """A line every `interval` seconds while the block runs: a load that waits on a slow hub, a
    proxy or a large checkpoint otherwise logs nothing between "Loading model" and its end (the
    line names no model, so it is kept when the source is redacted)."""

    def beat(stop: threading.Event) -> None:
        started = time.monotonic()
        while not stop.wait(interval):
            logger.info(
                "[startup][%s] still loading the model (%.0f s so far)", label, time.monotonic() - started
            )

    with _in_background(beat, "still-loading"):
        yield


@contextlib.contextmanager
def _in_background(loop, name: str, *, join_s: float = 0.0) -> Iterator[None]:
    """`loop(stop)` on a daemon thread while the block runs; `stop` is set when it ends."""
    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(stop,), name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_s:
            thread.join(timeout=join_s)
