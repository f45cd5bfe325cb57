"""llama.cpp's own server as a second peer: built from the package registry, the model converted
with llama.cpp's own converter.

    python -m bench.llamacpp install            # once: build llama-server (about 10-20 min on 2 cores)
    python -m bench.llamacpp convert [--model-path bench/models/bench-80m]   # HF folder -> F32 GGUF

llama.cpp's sources come from the `llama-cpp-python` source distribution (pinned below), which
vendors the whole of llama.cpp, its HTTP server and `convert_hf_to_gguf.py` included: the only
package index this project's machines reach serves it. Only the C++ `llama-server` is built (the
Python binding's server does not batch); `bench.compare --peer llamacpp` starts it with
continuous batching and one slot per concurrent client.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.build_model import DEFAULT_MODEL_DIR
from bench.server import ServerProcess, Target, free_port

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "bench" / ".llamacpp"
PACKAGE = "llama-cpp-python==0.3.36"
SENTENCEPIECE = "sentencepiece==0.2.1"  # the converter imports it before looking at the tokenizer
SERVER = HOME / "build" / "bin" / "llama-server"


def source_dir() -> Path:
    found = sorted(HOME.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not found:
        raise SystemExit("llama.cpp sources missing: run `python -m bench.llamacpp install`")
    return found[-1]


def install() -> Path:
    HOME.mkdir(parents=True, exist_ok=True)
    if SERVER.exists():
        return SERVER
    if not list(HOME.glob("llama_cpp_python-*/vendor/llama.cpp")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                PACKAGE,
                "-d",
                str(HOME),
            ],
            check=True,
        )
        archive = next(HOME.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(HOME, filter="data")
    source = source_dir()
    build = HOME / "build"
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON"]  # fmt: skip
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *options], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
    return SERVER


def gguf_path(model_dir: Path) -> Path:
    return HOME / f"{model_dir.name}-f32.gguf"


def convert(model_dir: Path) -> Path:
    """The HF checkpoint to an F32 GGUF (the same weights, unquantised) with llama.cpp's converter,
    run by this project's interpreter (it needs torch, transformers and numpy; its own gguf-py is
    in the sources; sentencepiece goes into a folder of its own) through bench/llamacpp_convert.py."""
    out = gguf_path(model_dir)
    if out.exists():
        return out
    deps = HOME / "pydeps"
    if not deps.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps), SENTENCEPIECE],
                       check=True)  # fmt: skip
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "llamacpp_convert.py"),
            str(source_dir()),
            str(model_dir),
            str(out),
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": str(deps)},
    )
    return out


def server_command(gguf: Path, port: int, *, slots: int, context: int) -> list[str]:
    """llama-server with continuous batching, `slots` parallel sequences sharing `context` tokens
    per slot, two threads (this machine's cores), on 127.0.0.1."""
    threads = str(min(2, os.cpu_count() or 2))
    return [str(SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", threads, "-tb", threads, "-np", str(slots), "-c", str(context * slots),
            "-cb", "--no-webui", "--alias", gguf.stem]  # fmt: skip


def llamacpp_server(
    model_path: Path, *, log_path: Path, ready_timeout_s: float = 300.0, slots: int = 16, context: int = 2048
) -> tuple[ServerProcess, Target]:
    """An unstarted ServerProcess for llama-server on the model converted to GGUF, and how to talk
    to it (it takes `ignore_eos` as we do)."""
    install()
    gguf = convert(Path(model_path))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = ServerProcess(
        server_command(gguf, port, slots=slots, context=context),
        health_url=f"{base}/health",
        log_path=log_path,
        cwd=ROOT,
        ready_timeout_s=ready_timeout_s,
    )
    return server, Target("llamacpp", f"{base}/v1", gguf.stem, f"{base}/health")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "convert", "clean"])
    parser.add_argument("--model-path", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)
    if args.action == "install":
        print(install())
    elif args.action == "convert":
        print(convert(args.model_path))
    else:
        shutil.rmtree(HOME, ignore_errors=True)


if __name__ == "__main__":
    main()
