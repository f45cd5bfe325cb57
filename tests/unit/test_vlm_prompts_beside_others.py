"""Vision-language prompts beside others: a later chat turn keys its image's cached blocks as the
first turn did, and a step that packs an image prompt with a text prompt holding the image
placeholder token runs. Every architecture of tests/unit/vlm_builders.py, replicas shared with
test_vlm_architectures.py."""

from __future__ import annotations

import pytest

from models.params import PromptInput, SamplingParams
from models.prompt import PreparedPrompt
from tests.unit.engine_driver import hf_greedy, run_jobs
from tests.unit.test_vlm_architectures import _builder, _image_prompt, _replica, _text_prompt, png
from tests.unit.vlm_builders import ARCHS, GREEDY, MAX_NEW


@pytest.fixture(params=ARCHS, ids=lambda a: a.name)
def arch_replica(request, tmp_path_factory):
    return request.param, _replica(request.param, tmp_path_factory)


def test_a_later_turn_of_a_chat_keys_its_image_as_the_first_turn_did(arch_replica):
    """The image's digest is mixed into the cache keys of every block from its first token on:
    hashing per-token inputs (Qwen2-VL's mm_token_type_ids, Gemma 3's token_type_ids) made it
    change with every word after the image, so no later turn found those blocks cached."""
    _, replica = arch_replica
    image = png(6)
    asked = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    first = _builder(replica).prepare(PromptInput(messages=(asked,), images=(image,)))
    follow_up = (
        asked,
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "And then?"},
    )
    later = _builder(replica).prepare(PromptInput(messages=follow_up, images=(image,)))
    assert later.token_ids[: first.unsplit_span[1] + 1] == first.token_ids[: first.unsplit_span[1] + 1]
    if later.unsplit_span == first.unsplit_span:
        assert later.span_digest == first.span_digest
    else:  # PaliGemma: the whole prompt attends both ways, so a later turn shares no block of it
        assert later.span_digest != first.span_digest
    other = _builder(replica).prepare(PromptInput(messages=follow_up, images=(png(7),)))
    assert other.span_digest != first.span_digest


def test_image_placeholders_typed_into_a_text_prompt_beside_an_image_request(arch_replica, caplog):
    """A raw prompt holding the image placeholder token (no image) computed in the same step as
    an image prompt: the model counted placeholders over the packed step against the one image's
    features, the step failed (an ERROR with a traceback) and every row ran again alone."""
    arch, replica = arch_replica
    if replica.path != "fast" or replica.runner.cross is not None:
        pytest.skip(
            "the packed step is the fast path's; cross-attention models have no placeholders to count"
        )
    [placeholder] = sorted(replica.runner._placeholders)[:1]
    image = _image_prompt(replica, "Describe it.", seed=3)
    typed = _text_prompt(replica, "look here")
    typed = PreparedPrompt(
        [*typed.token_ids[:-1], placeholder, placeholder, placeholder, typed.token_ids[-1]]
    )
    params = SamplingParams(max_tokens=MAX_NEW, **GREEDY)
    with caplog.at_level("ERROR", logger="scheduler.executor"):
        outputs = run_jobs(replica, [(0, image, params), (0, typed, params)])
    assert not [r for r in caplog.records if "retrying each row alone" in r.getMessage()]
    assert outputs[0] == hf_greedy(replica, image, MAX_NEW)
    assert outputs[1] == run_jobs(replica, [(0, typed, params)])[0]  # as alone
