"""SIGTERM or SIGINT that reach granian's worker while it is still importing the app.

The worker is forked from granian's main process and inherits its Python signal handlers, which
set a flag on the main process's copy of the server: a signal that came then (a pod deleted a
second after it started) changed nothing, the worker came up and served, and granian killed it
at its kill timeout (SHUTDOWN_GRACE_S + 5 s later). Imported first by `app.main`, this module
remembers such a signal until the lifespan's drain hook (`app.lifespan`) can act on it.
Only in granian's worker process: anywhere else (tests, tools) the signals keep their handlers.
"""

from __future__ import annotations

import multiprocessing
import signal

_GRANIAN_WORKER = "granian-worker"  # the name granian gives its worker processes
_received: list[int] = []


def _remember(signum: int, frame: object) -> None:
    _received.append(signum)


def install() -> None:
    if multiprocessing.current_process().name != _GRANIAN_WORKER:
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember)


def received() -> int | None:
    """The first stop signal that arrived before the event loop took the signals over."""
    return _received[0] if _received else None


install()
