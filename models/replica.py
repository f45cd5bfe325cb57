"""One model replica: a loaded model on one device plus the runner that steps it.

`build_replica` loads the model, then chooses the execution path by trying the fast path on a
real prompt (text, and an image for vision-language models) against the model's own forward:
models that agree take the fast path, everything else the generic one. The log says which and why.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import torch

from models.cpu_kernels import pack_linears
from models.detokenize import IncrementalDetokenizer
from models.devices import kv_cache_budget
from models.generic import GenericRunner
from models.grammar import GrammarCompiler
from models.loader import LoadedModel, LoadSpec, load_model
from models.params import PromptInput, SamplingParams
from models.prompt import PreparedPrompt, PromptBuilder
from models.runner import SlotRunner
from models.sampling import RowSampler
from models.sequence import Sequence

log = logging.getLogger(__name__)

_SELF_TEST_TEXT = "The quick brown fox jumps over the lazy dog; 12345 pack my box with five dozen jugs."


@dataclass(frozen=True)
class ReplicaConfig:
    max_batch_size: int = 32
    max_input_tokens: int = 16384
    max_new_tokens: int = 128
    force_generic: bool = False  # tests and operators can pin the generic path
    pack_cpu_linears: bool = True  # oneDNN pre-packed weights on CPU (fast path only)
    kv_cache_budget_bytes: int | None = None  # None: 90% of free GPU memory / half the available RAM


class ModelReplica:
    def __init__(self, loaded: LoadedModel, runner: SlotRunner | GenericRunner, path_reason: str, max_seq_len: int):
        self.loaded = loaded
        self.runner = runner
        self.path_reason = path_reason
        self.max_seq_len = max_seq_len
        self.vocab_size = _vocab_size(loaded)
        self.grammars = GrammarCompiler(loaded.tokenizer, vocab_size=self.vocab_size, eos_token_ids=loaded.eos_token_ids)

    @property
    def path(self) -> str:
        return self.runner.kind

    def new_sequences(
        self, prepared: PreparedPrompt, params: SamplingParams, *, n: int = 1, owner=None
    ) -> list[Sequence]:
        """The n sequences of one request; choice i draws from seed + i so choices differ but a
        seeded request is reproducible."""
        mm = _to_device(prepared.mm_inputs, self.loaded.device, self.loaded.dtype)
        seqs = []
        for index in range(n):
            seed = None if params.seed is None else (params.seed + index) % 2**64
            sampler = RowSampler(
                params,
                vocab_size=self.vocab_size,
                device=self.loaded.device,
                prompt_ids=prepared.token_ids,
                eos_token_ids=self.loaded.eos_token_ids,
                seed=seed,
            )
            if params.grammar is not None:
                # Compiled and validated before admission (Scheduler.submit); here it is a cache hit.
                sampler.constraint = self.grammars.constraint(params.grammar)
            detok = IncrementalDetokenizer(
                self.loaded.tokenizer, prepared.token_ids, skip_special_tokens=params.skip_special_tokens
            )
            seqs.append(
                Sequence(list(prepared.token_ids), sampler, detok, max_tokens=params.max_tokens, mm_inputs=mm, owner=owner, index=index)
            )
        return seqs


def build_replica(spec: LoadSpec, config: ReplicaConfig) -> ModelReplica:
    loaded = load_model(spec)
    max_seq_len = min(loaded.max_context, config.max_input_tokens + config.max_new_tokens)
    if config.force_generic:
        return _generic(loaded, "pinned by configuration", max_seq_len)
    budget = config.kv_cache_budget_bytes or kv_cache_budget(loaded.device)
    runner = SlotRunner(
        loaded.model, num_slots=config.max_batch_size, max_seq_len=max_seq_len, device=loaded.device, cache_budget_bytes=budget
    )
    reason = _self_test(runner, loaded)
    if reason is not None:
        runner.restore_attention()
        return _generic(loaded, f"fast path self-test failed: {reason}", max_seq_len)
    if config.pack_cpu_linears and loaded.device.type == "cpu":
        log.info(pack_linears(loaded.model, batch_hint=min(16, config.max_batch_size)))
        reason = _self_test(runner, loaded)
        if reason is not None:  # packing is an optimisation: never serve wrong numbers for it
            raise RuntimeError(f"self-test failed after packing CPU linears ({reason}); set CPU_PACKED_LINEARS=false")
    log.info(
        "execution path: fast (per-slot KV cache, %d slots, up to %d tokens each, cache budget %.1f GiB)",
        config.max_batch_size, max_seq_len, budget / 2**30,
    )
    return ModelReplica(loaded, runner, "self-test matched the model's own forward", max_seq_len)


def _generic(loaded: LoadedModel, reason: str, max_seq_len: int) -> ModelReplica:
    log.warning("execution path: generic (one sequence at a time via generate()); reason: %s", reason)
    pad = loaded.tokenizer.pad_token_id
    if pad is None and loaded.eos_token_ids:
        pad = min(loaded.eos_token_ids)
    runner = GenericRunner(loaded.model, device=loaded.device, pad_token_id=pad)
    return ModelReplica(loaded, runner, reason, max_seq_len)


def _self_test(runner: SlotRunner, loaded: LoadedModel) -> str | None:
    builder = PromptBuilder.for_model(loaded)
    ids = builder.tokenize(_SELF_TEST_TEXT)
    reason = runner.self_test(ids, None, dtype=loaded.dtype)
    if reason is not None or not builder.is_vision:
        return reason
    try:
        prepared = builder.prepare(
            PromptInput(
                messages=({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SELF_TEST_TEXT}]},),
                images=(_synthetic_png(),),
            )
        )
    except Exception as exc:  # the generic path will surface the same problem per request
        log.debug("image self-test could not build a prompt", exc_info=True)
        return f"image prompt preparation failed: {exc}"
    mm = _to_device(prepared.mm_inputs, loaded.device, loaded.dtype)
    # The image prompt joins while the text prompt decodes, as it would in a busy batch.
    return runner.self_test(ids, (prepared.token_ids, mm), dtype=loaded.dtype)


def _synthetic_png() -> bytes:
    from PIL import Image

    image = Image.new("RGB", (64, 48))
    image.putdata([((x * 4) % 256, (y * 5) % 256, (x * y) % 256) for y in range(48) for x in range(64)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _to_device(mm: dict | None, device: torch.device, dtype: torch.dtype) -> dict | None:
    if not mm:
        return None
    moved = {}
    for key, value in mm.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def _vocab_size(loaded: LoadedModel) -> int:
    embeddings = loaded.model.get_output_embeddings()
    if embeddings is not None and hasattr(embeddings, "weight"):
        return int(embeddings.weight.shape[0])
    return int(loaded.model.config.get_text_config(decoder=True).vocab_size)
