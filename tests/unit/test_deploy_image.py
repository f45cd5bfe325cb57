"""The Dockerfile, read offline: the image's default model cache is the spec's path (and the
Hugging Face variables still move it at run time), and the image's user owns the venv and the
cache but not the code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.unit.deploy_files import COMPOSE, ROOT, load_docs


def _dockerfile_instructions() -> list[str]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    return [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.startswith("#")]


SPEC_CACHE_DIR = "/root/.cache/usinc/models"


def _image_config(**env: str) -> dict:
    """--print-config under the image's HOME, nothing else from this machine's environment."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "entrypoint.py"), "--print-config", "--redact-source", "false"],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), "HOME": "/root", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_images_default_cache_is_the_specs_and_the_hf_variables_still_move_it():
    ops = _dockerfile_instructions()
    env = " ".join(op for op in ops if op.startswith("ENV "))
    assert "HOME=/root " in env + " "
    # Set through HOME, not CACHE_DIR/HF_*: those would outrank what an operator sets at run time.
    assert not re.search(r"\b(CACHE_DIR|HF_HUB_CACHE|HF_HOME)=", env)
    assert f'VOLUME ["{SPEC_CACHE_DIR}"]' in ops
    (compose,) = load_docs(COMPOSE)
    assert any(v.split(":")[1] == SPEC_CACHE_DIR for v in compose["services"]["llm"]["volumes"])
    assert _image_config()["cache_dir"] == SPEC_CACHE_DIR
    assert _image_config(HF_HOME="/hf")["cache_dir"] == "/hf/hub"
    assert _image_config(HF_HOME="/hf", HF_HUB_CACHE="/hub")["cache_dir"] == "/hub"
    assert _image_config(HF_HUB_CACHE="/hub", CACHE_DIR="/models-cache")["cache_dir"] == "/models-cache"


def test_the_image_user_owns_the_venv_and_the_cache_but_not_the_code():
    """--transformers-path runs pip install -U into the venv as uid 10001; the cache volume starts
    out writable by it; /root is traversable to reach it; root keeps the code."""
    ops = _dockerfile_instructions()
    setup = next(op for op in ops if "useradd" in op)
    owned = re.search(r"install -d -o 10001 -g 10001 -m 0755 ([^&]+)", setup).group(1).split()
    assert {"/opt/venv", SPEC_CACHE_DIR} <= set(owned)
    assert "chmod 0711 /root" in setup and "--home-dir /root" in setup
    user = ops.index("USER 10001:10001")
    assert [op for op in ops if op.startswith("USER ")] == ["USER 10001:10001"]
    assert ops.index(setup) < user
    pip_runs = [i for i, op in enumerate(ops) if op.startswith("RUN") and ("pip " in op or "-m venv" in op)]
    assert pip_runs and min(pip_runs) > user, "pip runs as root: the venv would not be 10001's"
    assert not any(op.startswith("COPY --chown") for op in ops), "the code must stay root's"
