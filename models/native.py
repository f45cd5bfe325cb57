"""The project's C kernels (`models/csrc/*.c`), compiled at first use for the CPU they run on.

Each source is compiled with the C compiler on the machine (`$CC`, else `cc` or `gcc`) for its
own CPU (`-march=native`) into a cache keyed by the source, the flags, the compiler and the CPU's
model and flags, so a cache shared across machines never hands one CPU another's build. Work runs
on torch's own OpenMP threads: the libraries link `libgomp.so.1`, which resolves to the one torch
has already loaded, so no second thread pool competes for the cores. Without a compiler, without
the CPU features a kernel needs, when the build fails or when no cache directory can hold and
load the library (a `/tmp` mounted `noexec`, Docker's tmpfs default), `library()` returns None
and the caller keeps its torch path (logged once, saying which).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")


def _cpu_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return sorted({line for line in cpuinfo if line.startswith(("model name", "flags"))})
    except OSError:
        return []


def _cpu_identity() -> str:
    return "".join(_cpu_lines()) or os.uname().machine


def cpu_flags() -> set[str]:
    return {
        flag for line in _cpu_lines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()
    }


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "usinc" / "kernels"


def compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc")


def _build(compiler_path: str, source: Path, target: Path, flags: tuple[str, ...]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler_path, *FLAGS, *flags, "-o", str(built), str(source)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: processes building at once each install a whole file


@functools.cache
def library(
    name: str, without: str, needs: tuple[str, ...] = (), flags: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
    """`csrc/<name>.c` compiled and loaded, or None where it cannot be here; `without` says what
    runs instead (for the log), `needs` the CPU flags the source requires, `flags` its own
    compiler flags after the common ones."""
    missing = [flag for flag in needs if flag not in cpu_flags()]
    if missing:
        log.info("%s kernel: off (CPU without %s), %s", name, ", ".join(missing), without)
        return None
    compiler_path = compiler()
    if compiler_path is None:
        log.info("%s kernel: off (no C compiler), %s", name, without)
        return None
    source = SOURCES / f"{name}.c"
    key = hashlib.sha256(
        b"\0".join(
            [
                source.read_bytes(),
                " ".join(FLAGS + flags).encode(),
                compiler_path.encode(),
                _cpu_identity().encode(),
            ]
        )
    ).hexdigest()[:20]
    problems = []
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "usinc-kernels"):
        target = directory / f"{name}-{key}.so"
        try:
            built = not target.exists()
            if built:
                _build(compiler_path, source, target, flags)
            loaded = ctypes.CDLL(str(target))
            log.info("%s kernel: on (%s %s)", name, "built into" if built else "loaded from", target)
            return loaded
        except subprocess.CalledProcessError as error:
            log.warning("%s kernel: build failed, %s:\n%s", name, without, error.stderr)
            return None
        except (OSError, subprocess.TimeoutExpired) as error:
            # Not writable, or mounted noexec (Docker's tmpfs default): the next place, if any.
            problems.append(f"{directory}: {error}")
    log.warning("%s kernel: off, %s (%s)", name, without, "; ".join(problems))
    return None
