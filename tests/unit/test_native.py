"""The C kernels' build: every source compiles cleanly, and a CPU without what a kernel needs
keeps the torch path."""

from __future__ import annotations

import subprocess

import pytest

from models import native

SOURCES = sorted(native.SOURCES.glob("*.c"))


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler here")
@pytest.mark.parametrize("source", SOURCES, ids=[source.stem for source in SOURCES])
def test_each_source_compiles_without_warnings(source, tmp_path):
    if source.stem == "panel_linear" and "avx512f" not in native.cpu_flags():
        pytest.skip("the panel kernel needs AVX-512F")
    result = subprocess.run(
        [
            native.compiler(),
            *native.FLAGS,
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(tmp_path / "k.so"),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_there_are_sources_to_build():
    assert {source.stem for source in SOURCES} >= {"paged_decode_attention", "panel_linear"}


def test_a_cpu_without_the_needed_flags_builds_nothing(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level("INFO", logger="models.native"):
            assert native.library("panel_linear", "the torch path", needs=("no-such-flag",)) is None
    finally:
        native.library.cache_clear()
    assert "CPU without no-such-flag" in caplog.text
    assert not (tmp_path / "usinc").exists()


def test_cpu_flags_are_read_from_proc_cpuinfo():
    if not native._cpu_lines():
        pytest.skip("no /proc/cpuinfo here")
    assert native.cpu_flags()  # x86 and arm both list some
