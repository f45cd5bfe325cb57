"""Image processors the way checkpoints ship them: without tokenizer options, images-only
processors standing in for image+video ones (their halves in place, the model type's own when the
named one is unknown), and the logits-only check that keeps such models off the fast path."""

from __future__ import annotations

import importlib.util
import json

import pytest
from transformers import AutoConfig

from models.images import ImageLimits
from models.params import PromptInput
from models.prompt import PromptBuilder
from tests.unit.test_vlm_architectures import _image_prompt, _replica, png
from tests.unit.vlm_builders import ARCHS

pytestmark = pytest.mark.slow


def test_a_processor_without_tokenizer_options_is_called_without_them(tmp_path_factory):
    """Remote-code processors such as Phi-3-vision's take no `add_special_tokens`."""
    replica = _replica(ARCHS[0], tmp_path_factory)
    real = replica.loaded.processor

    class Strict:
        image_processor = real.image_processor
        image_token = real.image_token

        def __call__(self, text=None, images=None, return_tensors=None):
            return real(text=text, images=images, return_tensors=return_tensors)

    loaded = replica.loaded
    builder = PromptBuilder(
        loaded.tokenizer,
        processor=Strict(),
        chat_template=loaded.chat_template,
        image_token_id=loaded.image_token_id,
        max_input_tokens=4096,
        image_limits=ImageLimits(),
    )
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}
    prepared = builder.prepare(PromptInput(messages=(message,), images=(png(1),)))
    assert prepared.token_ids == _image_prompt(replica, "hi", seed=1).token_ids


@pytest.mark.parametrize("name", ["gemma3", "qwen2_vl", "paligemma"])
def test_the_logits_alone_refuse_the_fast_path_when_it_is_not_told(name, tmp_path_factory, monkeypatch):
    """Bidirectional spans and M-RoPE reach the fast path from `models.arch`. Were an
    architecture's entry missing, the self-test's logit comparison alone must refuse the fast
    path (it is what guards architectures nobody listed)."""
    import dataclasses

    import models.prompt as prompt_module
    import models.replica as replica_module
    import models.runner as runner_module
    import models.self_test as self_test_module
    from models.arch import Traits, traits_of

    replica = _replica(next(a for a in ARCHS if a.name == name), tmp_path_factory)
    monkeypatch.setattr(self_test_module, "mask_problem", lambda mask, spans=(): None)
    # The prompt format stays (without it PaliGemma could not be sent an image at all).
    monkeypatch.setattr(
        prompt_module,
        "traits_of",
        lambda config: dataclasses.replace(Traits(), prompt_format=traits_of(config).prompt_format),
    )
    monkeypatch.setattr(prompt_module, "rope_index_of", lambda model: None)
    monkeypatch.setattr(runner_module, "traits_of", lambda config: Traits())
    loaded = replica.loaded
    text_config = loaded.model.config.get_text_config(decoder=True)
    serving_attn = text_config._attn_implementation
    runner = runner_module.PagedRunner(loaded.model, num_blocks=64, block_size=16, device=loaded.device)
    try:
        reason = replica_module._self_test(runner, loaded)
    finally:
        text_config._attn_implementation = serving_attn  # the cached replica serves on
    assert reason is not None and ("differ" in reason or "non-causal" in reason), reason


def test_images_only_processor_defaults_a_required_video_processor():
    """SmolVLM's processor takes its video processor as a required argument; without torchvision
    the server builds it images-only."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    from models.processors import images_only_processor_class
    from tests.unit.vlm_builders import tiny_tokenizer

    tok = tiny_tokenizer(extra=("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"))
    processor = images_only_processor_class(SmolVLMProcessor)(SmolVLMImageProcessorPil(), tok)
    assert processor.tokenizer is tok and processor.video_processor is None
    assert "video_processor" not in type(processor).get_attributes()


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="the fallback is for no torchvision"
)
def test_an_images_only_processor_whose_video_half_comes_first_gets_its_halves_in_place(tmp_path):
    """LLaVA-NeXT-Video's processor takes (video_processor, image_processor, tokenizer): loaded
    without the video half, the image processor landed in its slot and the tokenizer was None, so
    the checkpoint did not load ("maximum recursion depth exceeded" from AutoProcessor first)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from models.processors import images_only_processor
    from tests.unit.vlm_builder_parts import text_kwargs
    from tests.unit.vlm_builders import TINY_VISION, tiny_tokenizer

    tok = tiny_tokenizer({"image_token": "<image>", "video_token": "<video>"})
    LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(**text_kwargs(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
    ).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    image_processor.save_pretrained(tmp_path)
    saved = {"processor_class": "LlavaNextVideoProcessor", "patch_size": 8, "image_token": "<image>"}
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    processor = images_only_processor(str(tmp_path), AutoConfig.from_pretrained(tmp_path), {})
    assert type(processor).__name__ == "LlavaNextVideoProcessor"
    assert processor.video_processor is None and processor.patch_size == 8
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="the fallback is for no torchvision"
)
def test_the_images_only_fallback_takes_the_model_types_processor_when_the_named_one_is_unknown(tmp_path):
    """The class a checkpoint names comes first (pixtral-12b: a `llava` model with a
    PixtralProcessor); one this transformers does not know leaves the model type's."""
    from models.processors import images_only_processor
    from tests.unit.vlm_builders_qwen import build_qwen2_vl

    build_qwen2_vl(tmp_path)
    for name in ("processor_config.json", "tokenizer_config.json"):
        saved = json.loads((tmp_path / name).read_text())
        if "processor_class" in saved:
            saved["processor_class"] = "NoSuchProcessor"
            (tmp_path / name).write_text(json.dumps(saved))
    processor = images_only_processor(str(tmp_path), AutoConfig.from_pretrained(tmp_path), {})
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert processor.video_processor is None
