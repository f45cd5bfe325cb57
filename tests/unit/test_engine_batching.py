"""The batching invariant on real tiny models: a greedy request gets exactly the same tokens
whether it runs alone or joins a busy batch at any step (text and image+text), and the same
tokens transformers' own generate() produces."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from models.generation import Generation
from models.images import ImageLimits
from models.loader import LoadSpec, ModelLoadError
from models.params import PromptInput, SamplingParams, choice_seed
from models.prompt import PreparedPrompt, PromptBuilder
from models.replica import build_replica
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver, hf_greedy
from tests.unit.engine_driver import run_jobs as run

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def text_replica(tiny_text_path):
    return build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=8)
    )


@pytest.fixture(scope="module")
def vlm_replica(tiny_vlm_path):
    return build_replica(
        LoadSpec(source=str(tiny_vlm_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=8)
    )


def prepared_text(replica, text: str) -> PreparedPrompt:
    return PreparedPrompt(replica.loaded.tokenizer(text)["input_ids"])


def builder(replica) -> PromptBuilder:
    return PromptBuilder.for_model(replica.loaded, max_input_tokens=4096)


def png(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=gen, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def prepared_image(replica, text: str, seed: int) -> PreparedPrompt:
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    return builder(replica).prepare(PromptInput(messages=(message,), images=(png(seed),)))


def test_image_prompts_are_the_processors_own(vlm_replica):
    """The demo's template reads parts in a macro (`for part in content`), which the source
    pattern missed: it got strings, each image became the bare image token plus a newline, and
    every image prompt was a token longer than transformers' (answers differed from the start)."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}],
        },
    ]
    images = (png(1), png(2))
    prepared = builder(vlm_replica).prepare(PromptInput(messages=tuple(messages), images=images))
    processor = vlm_replica.loaded.processor
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    reference = processor(text=text, images=decoded, return_tensors="pt")["input_ids"][0].tolist()
    assert prepared.token_ids == reference


def test_a_vlm_template_reading_parts_in_user_turns_only_gets_text_elsewhere(vlm_replica):
    """Llama 3.2 Vision's and Pixtral's templates loop over parts in user turns and print other
    turns' content as is: a system or assistant turn sent as text parts (valid OpenAI) reached
    the prompt as a Python list."""
    user_parts_only = (
        "{%- for message in messages %}<|{{ message['role'] }}|>"
        "{%- if message['role'] == 'user' and message['content'] is not string %}"
        "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}<image>{%- else %}"
        "{{ part['text'] }}{%- endif %}{%- endfor %}{%- else %}{{ message['content'] }}{%- endif %}"
        "<|end|>{%- endfor %}"
    )
    loaded = vlm_replica.loaded
    picky = PromptBuilder(
        loaded.tokenizer,
        processor=loaded.processor,
        chat_template=user_parts_only,
        image_token_id=None,
        max_input_tokens=4096,
        image_limits=ImageLimits(),
    )
    assert picky.part_roles == {"user"}
    messages = (
        {"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
    )
    rendered = picky.render(PromptInput(messages=messages, add_generation_prompt=False))
    assert rendered == "<|system|>Be\nbrief.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>"


def test_text_model_takes_the_fast_path(text_replica):
    assert text_replica.path == "fast"


def test_the_attention_reported_is_the_one_that_runs(tiny_text_path):
    """ATTN_IMPL=eager loads eager layers; the fast path replaces their attention with its paged
    one, and /health (`attention`) used to say "eager" all the same."""
    replica = build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="eager"),
        replica_config(max_batch_size=2),
    )
    assert replica.path == "fast" and replica.loaded.attn_impl == "eager"
    assert replica.attention == "sdpa"
    generic = build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="eager"),
        replica_config(max_batch_size=2, force_generic=True),
    )
    assert generic.attention == "eager"


def test_greedy_tokens_match_transformers_generate(text_replica):
    prepared = prepared_text(text_replica, "Hello there, how are you today?")
    alone = run(text_replica, [(0, prepared, SamplingParams(max_tokens=24, **GREEDY))])[0]
    assert alone == hf_greedy(text_replica, prepared, 24)


@pytest.mark.parametrize("join_step", [0, 1, 5, 17])
def test_greedy_request_is_identical_alone_and_joining_a_busy_batch(text_replica, join_step):
    target = prepared_text(text_replica, "The target request asks about the weather in Paris.")
    params = SamplingParams(max_tokens=20, **GREEDY)
    alone = run(text_replica, [(0, target, params)])[0]
    others = [
        (
            0,
            prepared_text(text_replica, "A long running neighbour " * 3),
            SamplingParams(max_tokens=40, **GREEDY),
        ),
        (2, prepared_text(text_replica, "Short one"), SamplingParams(max_tokens=3, **GREEDY)),
        (
            3,
            prepared_text(text_replica, "Sampled neighbour with its own seed"),
            SamplingParams(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True),
        ),
    ]
    busy = run(text_replica, [*others, (join_step, target, params)], prefill_budget=16)
    assert busy[-1] == alone


def test_chunked_prefill_matches_a_single_chunk(text_replica):
    prepared = prepared_text(text_replica, "one two three four five six seven eight nine ten " * 4)
    params = SamplingParams(max_tokens=12, **GREEDY)
    whole = run(text_replica, [(0, prepared, params)])[0]
    chunked = run(text_replica, [(0, prepared, params)], prefill_budget=7)[0]
    assert chunked == whole


def test_seeded_sampling_is_reproducible_whatever_the_batch(text_replica):
    prepared = prepared_text(text_replica, "Tell me a story")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run(text_replica, [(0, prepared, params)])[0]
    neighbour = (
        0,
        prepared_text(text_replica, "noise " * 5),
        SamplingParams(max_tokens=25, temperature=1.0, seed=99, ignore_eos=True),
    )
    busy = run(text_replica, [neighbour, (4, prepared, params)])[1]
    assert busy == alone
    other_seed = run(
        text_replica,
        [
            (
                0,
                prepared,
                SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=4321, ignore_eos=True),
            )
        ],
    )[0]
    assert other_seed != alone


def test_n_choices_share_one_prefill(text_replica):
    driver = EngineDriver(text_replica)
    prepared = prepared_text(text_replica, "Pick a number")
    stream = driver.submit(
        prepared, SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True), n=3
    )
    driver.executor.step()
    batch = driver.executor.batch
    # One prefill step computed the prompt once; all three choices drew their first token from it.
    assert [len(t) for t in driver.outputs(stream)] == [1, 1, 1]
    assert len(batch.running) == 3
    first_blocks = {
        tuple(s.block_table[: len(prepared.token_ids) // text_replica.block_size]) for s in batch.running
    }
    assert len(first_blocks) == 1  # the full prompt blocks are shared, not copied
    driver.run([stream])
    outputs = [tuple(o) for o in driver.outputs(stream)]
    assert all(len(o) == 6 for o in outputs) and len(set(outputs)) > 1  # independent samples
    # Choice i samples with choice_seed(seed, i): the second equals a single request seeded so.
    seed = choice_seed(5, 1)
    single = driver.submit(
        prepared, SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
    )
    driver.run([single])
    assert tuple(driver.outputs(single)[0]) == outputs[1]
    assert not batch.running and batch.blocks.num_used == 0


def test_generic_path_gives_the_same_greedy_tokens_batched(tiny_text_path, text_replica):
    generic = build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"),
        replica_config(force_generic=True),
    )
    assert generic.path == "generic"
    prepared = prepared_text(text_replica, "Generic path check")
    neighbour = prepared_text(text_replica, "a neighbour that joins later and decodes with it")
    params = SamplingParams(max_tokens=10, **GREEDY)
    fast = run(text_replica, [(0, prepared, params)])[0]
    together = run(generic, [(0, prepared, params), (2, neighbour, SamplingParams(max_tokens=14, **GREEDY))])
    assert together[0] == fast
    assert together[1] == run(text_replica, [(0, neighbour, SamplingParams(max_tokens=14, **GREEDY))])[0]


def test_a_model_whose_own_generate_fails_does_not_come_up(tiny_text_path, monkeypatch):
    """The generic path is the model's own generate(). Where that raises (a model transformers
    cannot run, as xLSTM with some configs), the replica reported ready and every request was a
    500: it fails to load instead, with the cause, so the server reports degraded."""
    import transformers

    def broken(self, *args, **kwargs):
        raise ValueError("matC_old has wrong shape")

    monkeypatch.setattr(transformers.GenerationMixin, "generate", broken)
    with pytest.raises(ModelLoadError, match=r"own generate\(\) fails.*ValueError: matC_old has wrong shape"):
        build_replica(
            LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"),
            replica_config(force_generic=True),
        )


def test_vlm_takes_the_fast_path_and_matches_generate(vlm_replica):
    assert vlm_replica.path == "fast"
    prepared = prepared_image(vlm_replica, "What is in this picture?", seed=1)
    assert prepared.num_image_tokens == 16
    alone = run(vlm_replica, [(0, prepared, SamplingParams(max_tokens=16, **GREEDY))])[0]
    assert alone == hf_greedy(vlm_replica, prepared, 16)


@pytest.mark.parametrize("join_step", [0, 3])
def test_image_request_is_identical_alone_and_in_a_mixed_batch(vlm_replica, join_step):
    target = prepared_image(vlm_replica, "Describe the image.", seed=2)
    params = SamplingParams(max_tokens=14, **GREEDY)
    alone = run(vlm_replica, [(0, target, params)])[0]
    text_neighbour = PreparedPrompt(
        vlm_replica.loaded.tokenizer("a text request in the same batch")["input_ids"]
    )
    others = [
        (0, text_neighbour, SamplingParams(max_tokens=30, **GREEDY)),
        (1, prepared_image(vlm_replica, "Another image", seed=3), SamplingParams(max_tokens=20, **GREEDY)),
    ]
    busy = run(vlm_replica, [*others, (join_step, target, params)], prefill_budget=8)
    assert busy[-1] == alone


def test_blocks_are_recycled(text_replica):
    params = SamplingParams(max_tokens=5, **GREEDY)
    driver = EngineDriver(text_replica, max_batch_size=4)
    streams = [
        driver.submit(prepared_text(text_replica, f"request {i} " * (i + 1)), params) for i in range(12)
    ]
    driver.run(streams)
    assert all(len(driver.outputs(s)[0]) == 5 for s in streams)
    batch = driver.executor.batch
    assert not batch.running and batch.blocks.num_used == 0


def test_a_prefix_hit_gives_the_same_tokens(text_replica):
    driver = EngineDriver(text_replica, max_prefill_tokens=16)
    system = "You are a helpful assistant. Answer briefly and never make things up. " * 2
    params = SamplingParams(max_tokens=12, **GREEDY)
    first = prepared_text(text_replica, system + "What is the capital of France?")
    second = prepared_text(text_replica, system + "Name three colours.")
    one = driver.submit(first, params)
    driver.run([one])
    two = driver.submit(second, params)
    driver.run([two])
    blocks = driver.executor.batch.blocks
    assert blocks.hit_tokens >= text_replica.block_size  # the shared system prompt was reused
    assert (
        driver.outputs(two)[0]
        == run(text_replica, [(0, second, params)])[0]
        == hf_greedy(text_replica, second, 12)
    )


def test_rows_of_very_different_lengths_decode_in_groups_with_the_same_tokens(text_replica):
    from models.plan import PlanRow

    size = text_replica.block_size
    rows = [
        PlanRow(1, [5], 20, list(range(2))),
        PlanRow(2, [5], 30 * size, list(range(31))),
        PlanRow(3, [5], 3, [40]),
    ]
    groups = text_replica.runner._decode_groups(rows)
    assert sorted(g.blocks.shape[1] for g in groups) == [2, 31]  # the long row pads nobody
    target = prepared_text(text_replica, "A short request next to a long one.")
    params = SamplingParams(max_tokens=12, **GREEDY)
    long = prepared_text(text_replica, "many words in a long context " * 40)
    alone = run(text_replica, [(0, target, params)])[0]
    busy = run(
        text_replica,
        [(0, long, SamplingParams(max_tokens=20, **GREEDY)), (1, target, params)],
        prefill_budget=64,
    )
    assert busy[1] == alone
    assert busy[0] == hf_greedy(text_replica, long, 20)


# MemoryError: what the compiled decode attention raises when its merge records find no memory.
@pytest.mark.parametrize("failure", [RuntimeError, MemoryError])
def test_a_request_that_breaks_the_step_fails_alone(text_replica, monkeypatch, failure):
    """A row that makes the forward raise is found by running the rows alone: it fails, and the
    requests prefilled and decoding beside it finish with their own tokens."""
    poison = 77
    runner = text_replica.runner
    real_execute = runner.execute

    def execute(plan):
        if any(poison in row.token_ids for row in plan.rows):
            raise failure("poisoned input")
        return real_execute(plan)

    monkeypatch.setattr(runner, "execute", execute)
    params = SamplingParams(max_tokens=8, **GREEDY)
    decoding = prepared_text(text_replica, "already decoding when the bad one arrives")
    same_step = prepared_text(text_replica, "prefilled in the same step")
    bad = PreparedPrompt(prepared_text(text_replica, "bad").token_ids + [poison])
    driver = EngineDriver(text_replica)
    first = driver.submit(decoding, params)
    driver.executor.step()
    neighbour, broken = driver.submit(same_step, params), driver.submit(bad, params)
    driver.run([first, neighbour, broken])
    assert driver.finished[(broken.request_id, 0)][0] == "error"
    assert (
        driver.finished[(first.request_id, 0)][0] == driver.finished[(neighbour.request_id, 0)][0] == "length"
    )
    monkeypatch.undo()
    assert driver.outputs(first)[0] == run(text_replica, [(0, decoding, params)])[0]
    assert driver.outputs(neighbour)[0] == run(text_replica, [(0, same_step, params)])[0]
    assert not driver.executor.batch.running and driver.executor.batch.blocks.num_used == 0


def test_a_request_whose_text_cannot_be_decoded_fails_alone(text_replica, monkeypatch):
    """Work after sampling (detokenization, stop strings) that raises for one choice ends that
    choice with an error; the replica thread and the neighbours carry on (a DecodeStream error
    once stopped the whole replica)."""
    params = SamplingParams(max_tokens=8, **GREEDY)
    marked = SamplingParams(max_tokens=7, **GREEDY)  # the choice whose detokenizer breaks
    real_append = Generation.append

    def append(self, token_id, logprob):
        if self.max_tokens == 7 and len(self.output_ids) == 2:
            raise RuntimeError("Invalid prefix encountered while decoding stream")
        return real_append(self, token_id, logprob)

    monkeypatch.setattr(Generation, "append", append)
    neighbour_prompt = prepared_text(text_replica, "a neighbour that decodes as usual")
    driver = EngineDriver(text_replica)
    neighbour = driver.submit(neighbour_prompt, params)
    broken = driver.submit(prepared_text(text_replica, "this one breaks"), marked)
    driver.run([neighbour, broken])
    assert driver.finished[(broken.request_id, 0)][0] == "error"
    assert driver.finished[(neighbour.request_id, 0)][0] == "length"
    assert driver.outputs(neighbour)[0] == hf_greedy(text_replica, neighbour_prompt, 8)
    after = driver.submit(neighbour_prompt, params)  # the same executor serves on
    driver.run([after])
    assert driver.outputs(after)[0] == driver.outputs(neighbour)[0]
    assert not driver.executor.batch.running and driver.executor.batch.blocks.num_used == 0


@pytest.fixture(scope="module")
def static_replica(tiny_text_path):
    return build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"),
        replica_config(max_batch_size=6, decode_graphs="static"),
    )


def test_decode_on_graph_buffers_gives_the_eager_tokens(static_replica, text_replica):
    """The CUDA-graph decode path minus the capture: padded batch buckets (5 rows run in the
    bucket of 6), block tables padded to width buckets (a long context next to short ones), the
    padding rows writing to the scratch block. Greedy tokens equal the eager path's and
    generate()'s, and the null block stays zero."""
    graphs = static_replica.runner.graphs
    assert graphs is not None and graphs.mode == "static"
    assert graphs.batches == (1, 2, 4, 6)
    params = SamplingParams(max_tokens=10, **GREEDY)
    long = prepared_text(text_replica, "many words in a long context " * 30)
    prompts = [long] + [prepared_text(text_replica, f"Request number {i} says hello.") for i in range(4)]
    jobs = [(i, prompt, params) for i, prompt in enumerate(prompts)]
    expected = run(text_replica, jobs)
    assert run(static_replica, jobs) == expected
    assert graphs.steps > 0
    assert expected[0] == hf_greedy(text_replica, long, 10)
    assert graphs.disabled is None
    cache = static_replica.runner.cache
    for layer in cache._keys:
        keys, values = cache.layer(layer, None, None)
        assert bool((keys[cache.null_block] == 0).all()) and bool((values[cache.null_block] == 0).all())
    stats = static_replica.runner.graphs_status
    assert stats.startswith("static"), stats


def test_graph_buckets():
    from models.graphs import batch_buckets, width_buckets

    assert batch_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert width_buckets(20, flash=False) == (1, 2, 4, 8, 16, 20)
    assert width_buckets(20, flash=True) == (20,)
