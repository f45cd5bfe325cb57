"""Runs llama.cpp's `convert_hf_to_gguf.py` (python bench/llamacpp_convert.py SOURCE MODEL_DIR OUT).

The converter identifies a BPE tokenizer's pre-tokenizer by hashing how a known text tokenizes,
and a vocabulary of our own has no known hash. The bench tokenizer splits text with Qwen2's
expression (models/tiny.py), so a tokenizer that uses exactly that expression is declared as
Qwen2's; any other unknown one is refused by the converter as before.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def main() -> None:
    source, model_dir, out = sys.argv[1:4]
    sys.path[:0] = [source, str(Path(source) / "gguf-py")]
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def pre_tokenizer(self, tokenizer):
        pre = tokenizer.backend_tokenizer.pre_tokenizer
        state = json.loads(pre.__getstate__()) if pre is not None else {}
        splits = [p for p in state.get("pretokenizers", [state]) if p.get("type") == "Split"]
        if any(p.get("pattern", {}).get("Regex") == QWEN2_SPLIT for p in splits):
            return "qwen2"
        return original(self, tokenizer)

    base.TextModel.get_vocab_base_pre = pre_tokenizer
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", out]
    runpy.run_path(str(Path(source) / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
