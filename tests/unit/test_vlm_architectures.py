"""Vision-language architectures beyond the builtin LLaVA, on tiny random checkpoints.

Each builder (tests/unit/vlm_builders.py) saves a real checkpoint into a temporary folder. The
server must load it, pick the right execution path (the fast path only where it computes what the
model computes; the generic path otherwise) and produce, for image and text prompts, exactly the
greedy tokens of transformers' generate(). Architectures not built here, and why, are listed in
`vlm_builders.NOT_BUILT` (and the README).
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from models.errors import InvalidRequestError
from models.images import ImageLimits
from models.loader import LoadSpec
from models.params import PromptInput, SamplingParams
from models.prompt import PreparedPrompt, PromptBuilder
from models.replica import build_replica
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver, hf_greedy, run_jobs
from tests.unit.vlm_builders import ARCHS, GREEDY, MAX_NEW, Arch

pytestmark = pytest.mark.slow  # builds and loads many checkpoints


def png(seed: int, size=(56, 40)) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


_REPLICAS: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads that wait
    on each other make this file ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _replica(arch: Arch, tmp_path_factory):
    if arch.name not in _REPLICAS:
        out = tmp_path_factory.mktemp(arch.name)
        arch.build(out)
        _REPLICAS[arch.name] = build_replica(
            LoadSpec(source=str(out), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=4)
        )
    return _REPLICAS[arch.name]


@pytest.fixture(params=ARCHS, ids=lambda a: a.name)
def arch_replica(request, tmp_path_factory):
    return request.param, _replica(request.param, tmp_path_factory)


def _builder(replica) -> PromptBuilder:
    return PromptBuilder.for_model(replica.loaded, max_input_tokens=4096)


def _image_prompt(replica, text: str, seed: int) -> PreparedPrompt:
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    return _builder(replica).prepare(PromptInput(messages=(message,), images=(png(seed),)))


def _text_prompt(replica, text: str) -> PreparedPrompt:
    return _builder(replica).prepare(PromptInput(messages=({"role": "user", "content": text},)))


def _engine_greedy(replica, prepared: PreparedPrompt) -> list[int]:
    return run_jobs(replica, [(0, prepared, SamplingParams(max_tokens=MAX_NEW, **GREEDY))])[0]


def test_takes_the_expected_path(arch_replica):
    arch, replica = arch_replica
    assert replica.path == arch.path, replica.path_reason
    assert arch.why in replica.path_reason


def test_image_prompt_matches_generate(arch_replica):
    arch, replica = arch_replica
    prepared = _image_prompt(replica, "What is in this picture?", seed=1)
    assert prepared.num_image_tokens > 0
    assert _engine_greedy(replica, prepared) == hf_greedy(replica, prepared, MAX_NEW)


@pytest.mark.parametrize("size", [(1, 1), (200, 20)], ids=["tracking-pixel", "thin-line"])
def test_a_tracking_pixel_or_a_thin_line_is_answered_as_generate_answers_it(arch_replica, size):
    """Careless clients send tracking pixels. Mistral 3's patch merger broke on an image of at
    most two patches a side, in transformers' own code (a 500): such sides are enlarged first.
    LightOnOCR's broke on a 200x20 line scaled to one patch high (a 500): stretched, and said so."""
    arch, replica = arch_replica
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    prepared = _builder(replica).prepare(PromptInput(messages=(message,), images=(png(5, size=size),)))
    assert prepared.num_image_tokens > 0
    if arch.name == "idefics2" and size == (1, 1):  # its processor divides by zero on it: enlarged, said so
        assert any("enlarged to at least 32 pixels" in warning for warning in prepared.warnings)
    if arch.name == "lighton_ocr" and size == (200, 20):
        assert any("image 1 (200x20 after decoding) was stretched to 200x" in w for w in prepared.warnings)
    assert _engine_greedy(replica, prepared) == hf_greedy(replica, prepared, MAX_NEW)


def test_every_choice_of_an_image_prompt_matches_generate(arch_replica):
    """n=2 greedy: the second choice forks from the first after the prompt (on the generic path
    it computes the prompt again, plus the token sampled since, with the image's inputs)."""
    arch, replica = arch_replica
    prepared = _image_prompt(replica, "What is in this picture?", seed=3)
    driver = EngineDriver(replica)
    stream = driver.submit(prepared, SamplingParams(max_tokens=MAX_NEW, **GREEDY), n=2)
    driver.run([stream])
    expected = hf_greedy(replica, prepared, MAX_NEW)
    assert driver.outputs(stream) == [expected, expected]


def test_prompt_tokens_match_the_processors_own_format(arch_replica):
    arch, replica = arch_replica
    processor = replica.loaded.processor
    image = Image.open(io.BytesIO(png(1))).convert("RGB")
    text = "What is in this picture?"
    ours = _image_prompt(replica, text, seed=1)
    if processor.chat_template is None:
        # No template (PaliGemma): the processor's own format around the prompt text.
        theirs = processor(text=text, images=[image], return_tensors="pt")
        assert ours.token_ids == theirs["input_ids"][0].tolist()
        assert ours.bidirectional == ((0, len(ours.token_ids)),)
        return
    # The processor's template rendered, then the processor on text and image. (The processor's
    # own apply_chat_template also prepares videos: SmolVLM's needs torchvision for that.)
    rendered = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        chat_template=processor.chat_template,
        add_generation_prompt=True,
        tokenize=False,
    )
    theirs = processor(text=rendered, images=[image], return_tensors="pt", add_special_tokens=False)
    assert ours.token_ids == theirs["input_ids"][0].tolist()
    for key, value in ours.mm_inputs.items():
        assert torch.equal(value, theirs[key]), key


def test_two_image_prompt_matches_the_processors_own_format(arch_replica):
    """Images reach the processor nested per prompt, as its apply_chat_template hands them:
    LLaVA-OneVision took a flat list as two one-image prompts and tiled each at full resolution
    (twice the image tokens of its multi-image format)."""
    arch, replica = arch_replica
    processor = replica.loaded.processor
    if processor.chat_template is None:
        pytest.skip("no chat template: the processor's own prefix format, covered above")
    images = [png(4), png(5, size=(40, 64))]
    parts = [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]
    ours = _builder(replica).prepare(
        PromptInput(messages=({"role": "user", "content": parts},), images=tuple(images))
    )
    rendered = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}],
        chat_template=processor.chat_template,
        add_generation_prompt=True,
        tokenize=False,
    )
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    theirs = processor(text=[rendered], images=[pictures], return_tensors="pt", add_special_tokens=False)
    assert ours.token_ids == theirs["input_ids"][0].tolist()
    for key, value in ours.mm_inputs.items():
        assert torch.equal(value, theirs[key]), key


def test_two_images_in_one_prompt_match_generate(arch_replica):
    arch, replica = arch_replica
    message = {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Compare"},
            {"type": "image"},
            {"type": "text", "text": "these."},
        ],
    }
    prepared = _builder(replica).prepare(
        PromptInput(messages=(message,), images=(png(4), png(5, size=(40, 64))))
    )
    assert prepared.num_images == 2
    assert _engine_greedy(replica, prepared) == hf_greedy(replica, prepared, MAX_NEW)


def test_text_prompt_matches_generate(arch_replica):
    arch, replica = arch_replica
    prepared = _text_prompt(replica, "Hello there, how are you today?")
    assert prepared.num_images == 0
    assert _engine_greedy(replica, prepared) == hf_greedy(replica, prepared, MAX_NEW)


def test_image_request_is_identical_in_a_mixed_batch(arch_replica):
    arch, replica = arch_replica
    target = _image_prompt(replica, "Describe the image.", seed=2)
    params = SamplingParams(max_tokens=MAX_NEW, **GREEDY)
    alone = run_jobs(replica, [(0, target, params)])[0]
    others = [
        (
            0,
            _text_prompt(replica, "a text request in the same batch"),
            SamplingParams(max_tokens=20, **GREEDY),
        ),
        (1, _image_prompt(replica, "Another image", seed=3), SamplingParams(max_tokens=14, **GREEDY)),
    ]
    for join_step in (0, 3):
        busy = run_jobs(replica, [*others, (join_step, target, params)], prefill_budget=8)
        assert busy[-1] == alone, f"joined at step {join_step}"


def test_four_concurrent_requests_match_generate(arch_replica):
    """Two image prompts (images of different sizes), a text prompt longer than the sliding
    windows, and a short one, all in the batch at once and prefilled in chunks: each answer is
    the model's own."""
    arch, replica = arch_replica
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    builder = _builder(replica)
    first = builder.prepare(PromptInput(messages=(message,), images=(png(8),)))
    second = builder.prepare(PromptInput(messages=(message,), images=(png(9, size=(40, 72)),)))
    long = _text_prompt(replica, "a long request that goes on and on, " * 12)
    short = _text_prompt(replica, "short")
    assert len(long.token_ids) > 100
    params = SamplingParams(max_tokens=MAX_NEW, **GREEDY)
    jobs = [(0, first, params), (0, long, params), (1, second, params), (2, short, params)]
    merged_before = getattr(replica.runner, "merged_calls", 0)
    outputs = run_jobs(replica, jobs, prefill_budget=16)
    for (_, prepared, _), output in zip(jobs, outputs, strict=True):
        assert output == hf_greedy(replica, prepared, MAX_NEW)
    if replica.path == "generic":  # the two text requests decoded together
        assert replica.runner.merged_calls > merged_before


def test_a_repeated_image_prompt_gives_the_same_tokens_from_the_prefix_cache(arch_replica):
    arch, replica = arch_replica
    prepared = _image_prompt(
        replica, "Describe the image in detail, please, and then say more about it.", seed=6
    )
    params = SamplingParams(max_tokens=MAX_NEW, **GREEDY)
    driver = EngineDriver(replica)
    first = driver.submit(prepared, params)
    driver.run([first])
    again = driver.submit(prepared, params)
    driver.run([again])
    assert driver.outputs(again) == driver.outputs(first)
    if (
        replica.path == "fast"
        and len(prepared.token_ids) - 1
        >= (prepared.unsplit_span[1] // replica.block_size + 1) * replica.block_size
    ):
        # Blocks past the image hit: the second request ran without its image inputs at all.
        assert driver.executor.batch.blocks.hit_tokens > prepared.unsplit_span[1]
    other = _image_prompt(
        replica, "Describe the image in detail, please, and then say more about it.", seed=7
    )
    different = driver.submit(other, params)
    driver.run([different])
    # A different image never shares the blocks of its tokens.
    assert driver.outputs(different)[0] == hf_greedy(replica, other, MAX_NEW)


def test_mask_check_flags_what_the_causal_fast_path_cannot_do():
    from models.self_test import mask_problem as _mask_problem

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert _mask_problem(causal[None, None]) is None
    assert _mask_problem(None) is None
    window = causal & torch.ones(5, 5, dtype=torch.bool).triu(-2)
    assert _mask_problem(window[None, None]) is None
    image_block = causal.clone()
    image_block[1:3, 1:3] = True  # two image tokens that see each other
    assert "later tokens" in _mask_problem(image_block[None, None])
    additive = torch.zeros(5, 5).masked_fill(~image_block, torch.finfo(torch.float32).min)
    assert "later tokens" in _mask_problem(additive[None, None])
    assert (
        _mask_problem(torch.zeros(5, 5).masked_fill(~causal, torch.finfo(torch.float32).min)[None, None])
        is None
    )
    assert "cross-attention" in _mask_problem(torch.ones(1, 1, 5, 3, dtype=torch.bool))


def test_cross_attention_states_survive_preemption_and_are_shared_by_choices(tmp_path_factory):
    """Mllama keeps each image request's vision states in side blocks of the pool: a pool too
    small for every request at once preempts some (their side blocks are taken again and refilled
    from the images), the choices of an n = 2 request read the parent's, and every answer is
    still generate()'s."""
    from models.kv_cache import kv_bytes_per_token
    from tests.unit.vlm_builders import build_mllama

    out = tmp_path_factory.mktemp("mllama-small-pool")
    build_mllama(out)
    spec = LoadSpec(source=str(out), dtype="fp32", attn_impl="sdpa")
    per_token = kv_bytes_per_token(
        AutoConfig.from_pretrained(out).get_text_config(decoder=True), torch.float32
    )
    replica = build_replica(spec, replica_config(max_batch_size=4, kv_cache_budget_bytes=48 * 16 * per_token))
    assert replica.path == "fast", replica.path_reason
    assert replica.runner.block_size == 16 and replica.runner.num_blocks <= 50
    builder = _builder(replica)
    prompts = [
        builder.prepare(
            PromptInput(
                messages=(
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Look {i}."}]},
                ),
                images=(png(20 + i, size=(40 + 16 * i, 40)),),
            )
        )
        for i in range(4)
    ]
    params = SamplingParams(max_tokens=160, **GREEDY)
    driver = EngineDriver(replica, max_batch_size=4)
    streams = [driver.submit(p, params, n=2 if i == 0 else 1) for i, p in enumerate(prompts)]
    kept = replica.runner.cross._decode_rows  # each decoding row's mask and slots, kept per sequence
    most_kept = 0
    for _ in range(10_000):
        if all(driver.done(s) for s in streams):
            break
        driver.executor.step()
        most_kept = max(most_kept, len(kept))
    assert driver.executor.batch.num_preemptions > 0
    assert most_kept >= 2  # kept while decoding (and still right after preemptions: answers below)
    for prepared, stream in zip(prompts, streams, strict=True):
        expected = hf_greedy(replica, prepared, 160)
        assert all(output == expected for output in driver.outputs(stream))
    assert driver.executor.batch.blocks.num_free == replica.runner.num_blocks
    driver.executor.step()  # the step after the last finish hands the runner the released sequences
    assert not kept


def test_an_encoder_decoder_vlm_generates_from_its_decoder_start_token(tmp_path_factory):
    """Florence-2 (BART behind a vision tower) takes the generic path. Its generation_config was
    replaced by one without `decoder_start_token_id`: every request was a 500 while /health said
    ready. Its decoder tokens now equal generate()'s, image and text alike."""
    from tests.unit.vlm_builders_glm import build_florence2

    path = tmp_path_factory.mktemp("florence2")
    build_florence2(path)
    replica = build_replica(LoadSpec(source=str(path), dtype="fp32", attn_impl="sdpa"), replica_config())
    assert replica.path == "generic"
    model, start = replica.loaded.model, replica.loaded.model.config.decoder_start_token_id
    for prepared in (_image_prompt(replica, "What is this?", seed=3), _text_prompt(replica, "Hello there")):
        ours = run_jobs(replica, [(0, prepared, SamplingParams(max_tokens=6, **GREEDY))])[0]
        inputs = {"input_ids": torch.tensor([prepared.token_ids]), **(prepared.mm_inputs or {})}
        with torch.inference_mode():
            reference = model.generate(
                **inputs, max_new_tokens=6, do_sample=False, decoder_start_token_id=start, eos_token_id=None
            )
        assert ours == reference[0, 1:].tolist()  # after the decoder's start token


def test_low_detail_images_are_shrunk_first(tmp_path_factory):
    """OpenAI's `detail: "low"` (PromptInput.image_max_sides): the image reaches the processor
    with its longest side capped, so a dynamic-resolution model gets fewer image tokens, and the
    same bytes at full detail stay a separate prefix-cache entry."""
    arch = next(a for a in ARCHS if a.name == "qwen2_vl")
    replica = _replica(arch, tmp_path_factory)
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    image = png(6, size=(56, 56))  # the tiny processor takes at most 56 x 56 pixels: 4 image tokens
    builder = _builder(replica)
    full = builder.prepare(PromptInput(messages=(message,), images=(image,)))
    low = builder.prepare(PromptInput(messages=(message,), images=(image,), image_max_sides=(28,)))
    assert 0 < low.num_image_tokens < full.num_image_tokens
    assert low.span_digest != full.span_digest
    assert _engine_greedy(replica, low) == hf_greedy(replica, low, MAX_NEW)


def test_an_image_its_processor_cannot_take_is_a_400_naming_it(tmp_path_factory):
    """Mistral 3's tiny processor (longest edge 64) scales a 3000x20 image (kept whole under
    MAX_IMAGE_SIZE=4096) to 0 pixels high and fails in transformers' code: the client gets a 400
    naming the image in its own words first (the processor's, a SizeDict repr cut mid-word, were
    all it got), then the processor's, clipped."""
    replica = _replica(next(a for a in ARCHS if a.name == "mistral3"), tmp_path_factory)
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    where = "messages[0].content[0].image_url"
    builder = PromptBuilder.for_model(replica.loaded, image_limits=ImageLimits(max_side=4096))
    with pytest.raises(InvalidRequestError) as refused:
        builder.prepare(
            PromptInput(messages=(message,), images=(png(6, size=(3000, 20)),), image_params=(where,))
        )
    assert refused.value.param == where
    message = str(refused.value)
    assert message.startswith("the images could not be prepared for this model") and "3000x20" in message
    assert "the processor said:" in message and len(message) < 500


def test_a_processor_that_disagrees_with_its_model_is_refused_at_startup(tmp_path):
    """A processor that writes 17 placeholders per image for a model that makes 16 features: the
    fast path's self-test failed, the generic path came up ready, and every image request got a
    500. Its own generate() fails on an image prompt, so the replica does not come up."""
    from models.loader import ModelLoadError
    from tests.unit.vlm_builders_more import build_vipllava

    build_vipllava(tmp_path)
    saved = tmp_path / "processor_config.json"
    processor_config = json.loads(saved.read_text())
    processor_config["vision_feature_select_strategy"] = "full"
    saved.write_text(json.dumps(processor_config))
    with pytest.raises(ModelLoadError, match="fails on an image prompt its processor prepared"):
        build_replica(
            LoadSpec(source=str(tmp_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=4)
        )
