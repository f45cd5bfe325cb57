"""One model replica: a loaded model on one device plus the runner that executes its step plans.

`build_replica` loads the model, sizes the paged KV pool from the memory budget, then chooses the
runner by trying the fast path on real prompts (text, and an image for vision-language models)
against the model's own forward: models that agree take the paged fast path, everything else the
generic one. Both execute the same plans. The log says which, why, and how big the pool is.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import torch

from models import lean_decode
from models.cpu_kernels import SharedInputs, pack_linears
from models.cpu_norms import fuse_rms_norms
from models.cpu_rotary import fuse_rotary
from models.cross_attention import side_tokens
from models.detokenize import IncrementalDetokenizer
from models.devices import DeviceScope, kv_cache_budget
from models.flash_paged import FLASH_BLOCK_MULTIPLE, flash_available
from models.generation import Generation
from models.generic import GenericRunner
from models.generic_batch import batching_problem
from models.grammar import GrammarCompiler
from models.kv_cache import kv_bytes_per_token
from models.loader import LoadedModel, LoadSpec, ModelLoadError, load_model, logit_count, startup_step
from models.params import PromptInput, SamplingParams, choice_seed
from models.plan import SequenceInputs
from models.prompt import PreparedPrompt, PromptBuilder
from models.rope import rescales_with_length
from models.runner import PagedRunner
from models.sampling import RowSampler
from models.self_test import DECODE_TOKENS, ProbePrompt, run_self_test

log = logging.getLogger(__name__)

_SELF_TEST_TEXT = "The quick brown fox jumps over the lazy dog; 12345 pack my box with five dozen jugs."
# Measured on this project's 2-core CI machine (docs/BENCHMARKS.md): on CPU the gather copies
# whole blocks, and 16 was the best of 16/32/64. GPUs use vLLM's default, except that
# FlashAttention's paged kernels need multiples of 256.
CPU_BLOCK_SIZE = 16
GPU_BLOCK_SIZE = 16
MIN_POOL_TOKENS = 256
# The self-test's long prompt: at least this long, and at most (CPU, GPU) this long however large
# the config's windows and thresholds, so that startup stays quick.
SELF_TEST_MIN_TOKENS = 48
SELF_TEST_MAX_TOKENS = (1024, 4096)


@dataclass(frozen=True)
class ReplicaConfig:
    """Built from the server's Settings (`app.lifespan.scheduler_config`), which hold the defaults."""

    max_batch_size: int
    max_input_tokens: int
    max_new_tokens: int
    pack_cpu_linears: bool  # CPU kernels: packed linears, fused norms and rotary (fast path only)
    kv_cache_budget_bytes: int | None  # the pool; None: auto from free memory
    kv_cache_gpu_fraction: float  # auto on GPU: this share of the memory free after loading
    kv_block_size: int | None  # None: auto (CPU_BLOCK_SIZE, GPU_BLOCK_SIZE, 256 with FlashAttention)
    enable_prefix_caching: bool
    force_generic: bool = False  # tests can pin the generic path
    # "auto": CUDA graphs for decode steps on a GPU, none on CPU; "off" (--enforce-eager);
    # "static": the graphs' padded buffers without capture, which CPU tests use to check them.
    decode_graphs: str = "auto"


class ModelReplica:
    def __init__(
        self,
        loaded: LoadedModel,
        runner,
        path_reason: str,
        max_seq_len: int,
        *,
        num_blocks: int,
        block_size: int,
        prefix_caching: bool,
    ):
        self.loaded = loaded
        self.runner = runner
        self.path_reason = path_reason
        self.max_seq_len = max_seq_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching and runner.prefix_caching
        self.vocab_size = logit_count(loaded.model)
        self.grammars = GrammarCompiler(
            loaded.tokenizer, vocab_size=self.vocab_size, eos_token_ids=loaded.eos_token_ids
        )

    @property
    def path(self) -> str:
        return self.runner.kind

    @property
    def attention(self) -> str:
        """The attention that runs: on the fast path the paged attention's kernel, whatever the
        layers were loaded with (ATTN_IMPL=eager still loads eager layers, which the fast path
        replaces; `kernels` in /health has the detail); on the generic path the loaded one."""
        if isinstance(self.runner, PagedRunner):
            return "flash_attention_2" if self.runner.use_flash else "sdpa"
        return self.loaded.attn_impl

    @property
    def kv_pool_bytes(self) -> int:
        return self.runner.cache.nbytes if isinstance(self.runner, PagedRunner) else 0

    def generations(
        self, prepared: PreparedPrompt, params: SamplingParams, *, n: int = 1
    ) -> list[Generation]:
        """The output state of each of a request's n choices, each drawing from its own seed
        (`choice_seed`): choices differ, and a seeded request is reproducible."""
        out = []
        for index in range(n):
            seed = None if params.seed is None else choice_seed(params.seed, index)
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
                self.loaded.tokenizer,
                prepared.token_ids,
                skip_special_tokens=params.skip_special_tokens,
                keep_special_tokens=params.keep_special_tokens,
            )
            out.append(Generation(sampler, detok, max_tokens=params.max_tokens))
        return out

    def sequence_inputs(self, prepared: PreparedPrompt) -> SequenceInputs | None:
        side = getattr(self.runner, "cross", None) is not None
        return sequence_inputs(
            prepared, self.loaded.device, self.loaded.dtype, side_config=side and self.loaded.model.config
        )


def build_replica(spec: LoadSpec, config: ReplicaConfig) -> ModelReplica:
    loaded = load_model(spec)
    device, dtype = loaded.device, loaded.dtype
    max_seq_len = min(loaded.max_context, config.max_input_tokens + config.max_new_tokens)
    use_flash = flash_available(device, dtype) and loaded.attn_impl == "flash_attention_2"
    block_size = config.kv_block_size or (
        (FLASH_BLOCK_MULTIPLE if use_flash else GPU_BLOCK_SIZE) if device.type == "cuda" else CPU_BLOCK_SIZE
    )
    if use_flash and block_size % FLASH_BLOCK_MULTIPLE:
        log.warning(
            "KV block size %d is not a multiple of %d: attention over the pool uses SDPA, not FlashAttention",
            block_size,
            FLASH_BLOCK_MULTIPLE,
        )
        use_flash = False
    num_blocks, sizing = _pool_blocks(loaded, config, max_seq_len, block_size)
    if config.force_generic:
        replica = _generic(loaded, "pinned by configuration", max_seq_len, num_blocks, block_size)
        startup_step(spec, "Ready.")
        return replica
    graphs = config.decode_graphs
    if graphs == "auto":
        # One capture cannot span the streams of several GPUs: a replica over several runs eagerly.
        graphs = "capture" if device.type == "cuda" and len(loaded.devices) <= 1 else "off"
    runner = PagedRunner(
        loaded.model,
        num_blocks=num_blocks,
        block_size=block_size,
        device=device,
        use_flash=use_flash,
        decode_graphs=graphs,
        max_batch=config.max_batch_size,
        max_seq_len=max_seq_len,
    )
    packing = config.pack_cpu_linears and device.type == "cpu"
    with SharedInputs(loaded.model) if packing else contextlib.nullcontext() as shared:
        reason = _self_test(runner, loaded)
        if reason is not None and runner.in_place_decode:
            # The compiled decode attention is an optimisation: a model it does not reproduce
            # keeps the fast path with gather + SDPA rather than falling to the generic one.
            runner.in_place_decode = False
            kernel_reason, reason = reason, _self_test(runner, loaded)
            if reason is None:
                log.warning(
                    "self-test failed with the compiled decode attention (%s); it is off for this model",
                    kernel_reason,
                )
    if reason is not None:
        runner.restore_attention()
        del runner
        _release_memory(device)
        replica = _generic(
            loaded, f"fast path self-test failed: {reason}", max_seq_len, num_blocks, block_size
        )
        startup_step(spec, "Ready.")
        return replica
    if packing:
        log.info(
            pack_linears(loaded.model, batch_hint=min(16, config.max_batch_size), shared=shared.groups())
        )
        log.info(fuse_rms_norms(loaded.model))
        log.info(fuse_rotary(loaded.model))
        reason = _self_test(runner, loaded)
        if reason is not None:  # the CPU kernels are an optimisation: never serve wrong numbers for them
            raise RuntimeError(
                f"self-test failed after installing the CPU kernels ({reason}); set CPU_PACKED_LINEARS=false"
            )
        log.info(lean_decode.install(runner))
    startup_step(spec, "Ready.")
    log.info(
        "execution path: fast (paged KV pool: %d blocks of %d tokens = %.2f GiB, %s; attention: %s; CUDA graphs: %s; prefix caching %s)",
        num_blocks,
        block_size,
        runner.cache.nbytes / 2**30,
        sizing,
        runner.backend,
        runner.graphs_status,
        "on" if config.enable_prefix_caching else "off",
    )
    return ModelReplica(
        loaded,
        runner,
        "self-test matched the model's own forward",
        max_seq_len,
        num_blocks=num_blocks,
        block_size=block_size,
        prefix_caching=config.enable_prefix_caching,
    )


def _pool_blocks(
    loaded: LoadedModel, config: ReplicaConfig, max_seq_len: int, block_size: int
) -> tuple[int, str]:
    """How many KV blocks the memory budget buys, and a phrase saying where the budget came from.
    The automatic size never exceeds what a full batch of full-length sequences could use."""
    per_token = kv_bytes_per_token(loaded.model.config.get_text_config(decoder=True), loaded.dtype)
    per_block = per_token * block_size
    blocks_per_sequence = -(-max_seq_len // block_size)
    minimum = -(-MIN_POOL_TOKENS // block_size)
    if config.kv_cache_budget_bytes:
        num_blocks, sizing = config.kv_cache_budget_bytes // per_block, "KV_CACHE_MAX_GIB"
    else:
        budget = kv_cache_budget(
            loaded.devices or (loaded.device,), gpu_fraction=config.kv_cache_gpu_fraction
        )
        # Never below the minimum: a small batch of short sequences (MAX_BATCH_SIZE=1, the spec's
        # low-latency setting, with a short context) would otherwise ask for less than it.
        wanted = max(minimum, config.max_batch_size * blocks_per_sequence)
        num_blocks = min(budget // per_block, wanted)
        sizing = "auto from free memory"
    if num_blocks < minimum:
        remedy = "raise KV_CACHE_MAX_GIB" if config.kv_cache_budget_bytes else "free memory on the device"
        raise ModelLoadError(
            f"the KV cache budget ({sizing}) holds {num_blocks * block_size} tokens; at least "
            f"{MIN_POOL_TOKENS} are needed ({per_token} bytes per token): {remedy}"
        )
    if num_blocks < blocks_per_sequence:
        log.warning(
            "the KV pool holds %d tokens, fewer than the %d a sequence may reach: longer requests are refused",
            num_blocks * block_size,
            max_seq_len,
        )
    return int(num_blocks), sizing


def _generic(
    loaded: LoadedModel, reason: str, max_seq_len: int, num_blocks: int, block_size: int
) -> ModelReplica:
    log.warning(
        "execution path: generic (each sequence through generate(), stepped together); reason: %s", reason
    )
    pad = loaded.tokenizer.pad_token_id
    if pad is None and loaded.eos_token_ids:
        pad = min(loaded.eos_token_ids)
    scope = DeviceScope(str(loaded.device))
    token_ids = PromptBuilder.for_model(loaded).tokenize(_SELF_TEST_TEXT)
    with scope(), torch.inference_mode():
        # The generic path is the model's own generate(): where that fails on a short text prompt,
        # every request would fail, so the replica does not come up (the server reports degraded
        # with the cause) instead of reporting ready.
        text_failure = _generate_failure(loaded, token_ids[:16], pad)
        if text_failure is not None:
            raise ModelLoadError(
                f"the model's own generate() fails on a short text prompt ({text_failure}); after: {reason}"
            )
        problem = batching_problem(loaded.model, loaded.model.forward, token_ids)
        image_failure = _image_generate_failure(loaded, pad)
        if image_failure is not None:
            # Every image request would fail with a 500 while /health said ready (a processor
            # that writes more placeholders than the model makes image features, for one).
            raise ModelLoadError(
                f"the model's own generate() fails on an image prompt its processor prepared "
                f"({image_failure}); after: {reason}"
            )
    if problem is None and rescales_with_length(loaded.model):
        # The startup check's short prompts never pass the original length, where it would show.
        problem = "dynamic NTK RoPE scales with the longest sequence of a merged forward"
    if problem is not None:
        log.warning("generic path: decode steps computed one sequence per forward (%s)", problem)
    runner = GenericRunner(
        loaded.model, device=loaded.device, pad_token_id=pad, scope=scope, batch_decode=problem is None
    )
    with scope(), torch.inference_mode():
        bypassed = runner.check_lockstep(token_ids[:16])
    if bypassed is not None:
        # Janus's generate() drops the logits processor the runner steps it with: every request
        # failed (after a minute's stall, before stop() woke the thread) while /health said ready.
        runner.restore_forward()
        raise ModelLoadError(
            f"the model's generate() does not step through the server's hooks ({bypassed}); after: {reason}"
        )
    return ModelReplica(
        loaded,
        runner,
        reason,
        max_seq_len,
        num_blocks=num_blocks,
        block_size=block_size,
        prefix_caching=False,
    )


def _image_generate_failure(loaded: LoadedModel, pad: int | None) -> str | None:
    """For a vision model that chats: why its generate() fails on a small image prompt built as
    requests build theirs, or None (also when no such prompt can be built: requests will say)."""
    builder = PromptBuilder.for_model(loaded)
    if not (builder.is_vision and builder.can_chat):
        return None
    try:
        prepared = builder.prepare(
            PromptInput(
                messages=({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},),
                images=(_synthetic_png(64, 48),),
            )
        )
    except Exception:
        log.debug("no image prompt for the generic path's check", exc_info=True)
        return None
    return _generate_failure(
        loaded, prepared.token_ids, pad, _to_device(prepared.mm_inputs, loaded.device, loaded.dtype)
    )


def _generate_failure(
    loaded: LoadedModel, token_ids, pad: int | None, mm_inputs: dict | None = None
) -> str | None:
    """Why the model's own generate() fails on a short greedy run from `token_ids`, or None."""
    ids = torch.tensor([list(token_ids)], device=loaded.device)
    try:
        loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=pad,
            **(mm_inputs or {}),
        )
    except Exception as exc:
        log.debug("the model's own generate() failed", exc_info=True)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _self_test(runner: PagedRunner, loaded: LoadedModel) -> str | None:
    builder = PromptBuilder.for_model(loaded)
    try:
        prompts = [_long_probe(runner, loaded, builder)]
        if builder.can_chat:
            chat = builder.prepare(PromptInput(messages=({"role": "user", "content": _SELF_TEST_TEXT},)))
            prompts.append(_probe_prompt(chat, loaded))
        # Images come only in chat messages: a model that cannot chat is never sent one.
        if builder.is_vision and builder.can_chat:
            for size in ((64, 48), (40, 72)):
                prepared = builder.prepare(
                    PromptInput(
                        messages=(
                            {
                                "role": "user",
                                "content": [{"type": "image"}, {"type": "text", "text": _SELF_TEST_TEXT}],
                            },
                        ),
                        images=(_synthetic_png(*size),),
                    )
                )
                prompts.append(_probe_prompt(prepared, loaded))
    except Exception as exc:  # the generic path will surface the same problem per request
        log.debug("self-test could not build its prompts", exc_info=True)
        return f"self-test prompt preparation failed: {type(exc).__name__}: {exc}"
    return run_self_test(runner, prompts, dtype=loaded.dtype)


def _long_probe(runner: PagedRunner, loaded: LoadedModel, builder: PromptBuilder) -> ProbePrompt:
    """Raw text longer than every window, attention chunk and LongRoPE threshold of the config,
    within what startup can afford, the model's context and a third of the pool."""
    text_config = loaded.model.config.get_text_config(decoder=True)
    reach = [rule.window or rule.chunk or 0 for rule in runner.rules.values()]
    reach += [int(getattr(text_config, "sliding_window", None) or 0)]
    if runner.long_rope_after is not None:
        reach.append(runner.long_rope_after)
    target = max(SELF_TEST_MIN_TOKENS, max(reach) + 16)
    cap = min(
        SELF_TEST_MAX_TOKENS[loaded.device.type == "cuda"],
        loaded.max_context - DECODE_TOKENS - 1,
        runner.num_blocks * runner.block_size // 4 - DECODE_TOKENS,
    )
    length = min(target, cap)
    if (
        runner.long_rope_after is not None
        and runner.long_rope_after - DECODE_TOKENS <= length <= runner.long_rope_after
    ):
        length = runner.long_rope_after - DECODE_TOKENS - 1  # the probe's decode must not cross it
    if length < target:
        log.warning(
            "the self-test's long prompt is %d tokens, short of the %d the config's windows and scaling "
            "thresholds call for: longer contexts are served as probed at %d",
            length,
            target,
            length,
        )
    unit = builder.tokenize(" " + _SELF_TEST_TEXT)
    ids = (unit * (length // max(1, len(unit)) + 1))[:length]
    return _probe_prompt(builder.prepare(PromptInput(token_ids=tuple(ids))), loaded)


def _probe_prompt(prepared: PreparedPrompt, loaded: LoadedModel) -> ProbePrompt:
    return ProbePrompt(
        list(prepared.token_ids),
        inputs=sequence_inputs(prepared, loaded.device, loaded.dtype, side_config=loaded.model.config),
        model_inputs=_to_device(prepared.mm_inputs, loaded.device, loaded.dtype),
        unsplit=prepared.unsplit_span,
        has_images=prepared.num_images > 0,
    )


def sequence_inputs(
    prepared: PreparedPrompt, device: torch.device, dtype: torch.dtype, *, side_config=None
) -> SequenceInputs | None:
    """What the runner needs of the prompt besides its tokens: image inputs on the replica's
    device in its dtype, M-RoPE positions, the spans that attend both ways, and (with the model's
    config as `side_config`, on a fast path with cross-attention) the side slots of its images."""
    mm = _to_device(prepared.mm_inputs, device, dtype)
    if mm is None and prepared.mrope is None and not prepared.bidirectional:
        return None
    positions, delta = prepared.mrope if prepared.mrope is not None else (None, 0)
    return SequenceInputs(
        mm_inputs=mm,
        mrope_positions=positions,
        mrope_delta=delta,
        bidirectional=prepared.bidirectional,
        side_tokens=side_tokens(side_config, mm) if side_config else 0,
    )


def _synthetic_png(width: int, height: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata(
        [((x * 4) % 256, (y * 5) % 256, (x * y) % 256) for y in range(height) for x in range(width)]
    )
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


def _release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
