"""The engine on CUDA (`make gpu-check`; deselected from `make test`, which has no GPU).

Tolerances: in fp32 the CUDA-graph path must give exactly the eager path's greedy tokens (and,
for every architecture of the CPU suite, exactly generate()'s); in
bf16 (where a padded batch may pick other GEMM kernels, and random weights leave near-ties) the
first 4 greedy tokens of every request must match. FlashAttention and SDPA are compared the same
way in bf16.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from models.loader import LoadSpec
from models.params import PromptInput, SamplingParams
from models.prompt import PreparedPrompt, PromptBuilder
from models.replica import build_replica
from tests.unit.configs import replica_config
from tests.unit.engine_driver import hf_greedy, run_jobs
from tests.unit.test_text_architectures import ARCHS, check_architecture
from tests.unit.test_vlm_architectures import png
from tests.unit.vlm_builders import ARCHS as VISION_ARCHS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GREEDY = dict(temperature=0.0, ignore_eos=True)
BF16_PREFIX = 4


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def replica(path, *, device="cuda:0", dtype="fp32", attn="sdpa", graphs="capture", **overrides):
    return build_replica(
        LoadSpec(source=str(path), dtype=dtype, attn_impl=attn, device=device),
        replica_config(max_batch_size=8, decode_graphs=graphs, kv_cache_budget_bytes=None, **overrides),
    )


def jobs(replica, tokens: int = 16):
    tokenizer = replica.loaded.tokenizer
    params = SamplingParams(max_tokens=tokens, **GREEDY)
    texts = ["many words in a long context " * 40] + [f"request {i} says hello" for i in range(4)]
    return [(i, PreparedPrompt(tokenizer(text)["input_ids"]), params) for i, text in enumerate(texts)]


def test_cuda_graphs_give_the_eager_tokens_in_fp32(tiny_text_path):
    graphed = replica(tiny_text_path)
    eager = replica(tiny_text_path, graphs="off")
    assert run_jobs(graphed, jobs(graphed)) == run_jobs(eager, jobs(eager))
    graphs = graphed.runner.graphs
    assert graphs.disabled is None, graphs.disabled
    assert graphs.captured > 0 and graphs.steps > 0
    assert graphed.runner.graphs_status.startswith("capture")


def test_cuda_graphs_in_bf16_agree_with_eager(tiny_text_path):
    graphed = replica(tiny_text_path, dtype="bf16")
    eager = replica(tiny_text_path, dtype="bf16", graphs="off")
    assert graphed.loaded.dtype == torch.bfloat16  # the default on GPU
    for a, b in zip(run_jobs(graphed, jobs(graphed)), run_jobs(eager, jobs(eager)), strict=True):
        assert a[:BF16_PREFIX] == b[:BF16_PREFIX]
    assert graphed.runner.graphs.disabled is None


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed")
def test_flash_attention_and_sdpa_agree(tiny_text_path):
    flash = replica(tiny_text_path, dtype="bf16", attn="flash_attention_2")
    sdpa = replica(tiny_text_path, dtype="bf16", attn="sdpa")
    assert flash.runner.use_flash and "flash" in flash.runner.backend
    for a, b in zip(run_jobs(flash, jobs(flash)), run_jobs(sdpa, jobs(sdpa)), strict=True):
        assert a[:BF16_PREFIX] == b[:BF16_PREFIX]


def test_kv_pool_is_sized_from_free_gpu_memory(tiny_text_path):
    free_before, _ = torch.cuda.mem_get_info(0)
    built = replica(tiny_text_path, max_batch_size=4)
    pool = built.kv_pool_bytes
    assert 0 < pool <= free_before * 0.9


@pytest.fixture(scope="module")
def arch_tokenizer():
    from models.tiny import build_tokenizer, chat_template

    tok = build_tokenizer(512)
    tok.chat_template = chat_template(None)
    return tok


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_architectures_on_cuda_with_graphs_match_generate(model_type, arch_tokenizer, tmp_path):
    """The CPU suite's architecture check (greedy tokens equal to generate() for four requests
    batched, prefilled in chunks, from the prefix cache), on CUDA in fp32 with decode graphs."""
    check_architecture(model_type, arch_tokenizer, tmp_path, device="cuda:0", decode_graphs="capture")


@pytest.mark.parametrize("arch", VISION_ARCHS, ids=lambda a: a.name)
def test_vision_architectures_on_cuda_match_generate(arch, tmp_path):
    """Two image prompts (images of different sizes) and two text prompts batched on CUDA in fp32,
    with decode graphs where the model allows them (Mllama's cross-attention steps run eagerly):
    each answer is generate()'s."""
    arch.build(tmp_path)
    served = replica(tmp_path)
    assert served.path == "fast", served.path_reason
    builder = PromptBuilder.for_model(served.loaded, max_input_tokens=4096)
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    prompts = [
        builder.prepare(PromptInput(messages=(message,), images=(png(8),))),
        builder.prepare(PromptInput(messages=({"role": "user", "content": "a text request " * 20},))),
        builder.prepare(PromptInput(messages=(message,), images=(png(9, size=(40, 72)),))),
        builder.prepare(PromptInput(messages=({"role": "user", "content": "short"},))),
    ]
    params = SamplingParams(max_tokens=10, **GREEDY)
    outputs = run_jobs(served, [(i, p, params) for i, p in enumerate(prompts)], prefill_budget=16)
    for prepared, output in zip(prompts, outputs, strict=True):
        assert output == hf_greedy(served, prepared, 10)


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
def test_two_replicas_on_two_gpus_give_the_same_tokens(tiny_text_path):
    first = replica(tiny_text_path, device="cuda:0")
    second = replica(tiny_text_path, device="cuda:1")
    assert next(second.loaded.model.parameters()).device == torch.device("cuda", 1)
    assert run_jobs(first, jobs(first)) == run_jobs(second, jobs(second))


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
def test_one_replica_over_two_gpus_gives_the_single_gpu_tokens(tiny_text_path):
    spread = replica(tiny_text_path, device="cuda:0+cuda:1")
    single = replica(tiny_text_path, device="cuda:0", graphs="off")
    devices = {p.device for p in spread.loaded.model.parameters()}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}
    assert spread.runner.graphs is None  # one capture cannot span two GPUs
    assert run_jobs(spread, jobs(spread)) == run_jobs(single, jobs(single))
