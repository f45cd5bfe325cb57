"""OS-level names for the server's own threads.

Python names a `threading.Thread` for itself only; the kernel keeps calling it after the process
(`python`), so `top -H`, `ps -L` and `/proc/<pid>/task/*/comm` cannot tell a replica from the
event loop. Naming the replica thread at its start fixes that, and the OpenMP workers torch starts
from it inherit the name: a replica's CPU time (its thread and its kernels' workers) reads apart
from the HTTP side's (the event loop, granian's threads), which `bench.contention` relies on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15
_LINUX_NAME_BYTES = 15  # the kernel's limit, without the terminating zero


def name_os_thread(name: str) -> bool:
    """Give the calling thread `name` (cut to 15 bytes) at the OS level; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        encoded = name.encode("utf-8", "replace")[:_LINUX_NAME_BYTES]
        return libc.prctl(_PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
