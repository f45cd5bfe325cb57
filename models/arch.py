"""What the fast path must know of an architecture that neither its config nor its attention
calls say, found by reading the model's own code in transformers. The startup self-test checks
every one of these against the model's own forward, so a wrong entry sends the model to the
generic path instead of serving wrong answers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Traits:
    # PaliGemma numbers positions from 1 (its forward adds one to the positions it builds).
    position_offset: int = 0
    # Which prompt tokens attend to each other both ways, read from the processor's
    # `token_type_ids`: "image_runs" (Gemma 3: each run of image tokens, type 1) or "prefix"
    # (PaliGemma: the whole prompt, type 0, is a bidirectional prefix).
    bidirectional: str | None = None
    # A prompt format of the model's own, for checkpoints without a chat template: "paligemma"
    # (the images, then <bos>, the text and a newline, as its processor builds it).
    prompt_format: str | None = None
    # Every prompt token depends on the prompt's images, not only those after them: Mllama's text
    # before the first image attends to all its vision states evenly. The span computed in one
    # chunk (and keyed in the prefix cache by the images) then starts at the first token.
    images_reach_whole_prompt: bool = False


_BY_MODEL_TYPE = {
    "paligemma": Traits(position_offset=1, bidirectional="prefix", prompt_format="paligemma"),
    "gemma3": Traits(bidirectional="image_runs"),
    "mllama": Traits(images_reach_whole_prompt=True),
}


def traits_of(config) -> Traits:
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", ""), Traits())


def bidirectional_spans(kind: str | None, token_type_ids) -> tuple[tuple[int, int], ...]:
    """Position ranges `[first, end)` whose tokens see each other, from one prompt's token types."""
    if kind is None or token_type_ids is None:
        return ()
    types = torch.as_tensor(token_type_ids).reshape(-1).tolist()
    wanted = 1 if kind == "image_runs" else 0
    spans, start = [], None
    for index, value in enumerate([*types, None]):
        if value == wanted and start is None:
            start = index
        elif value != wanted and start is not None:
            spans.append((start, index))
            start = None
    if kind == "prefix":
        spans = spans[:1] if spans and spans[0][0] == 0 else []
    return tuple(spans)


RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def rope_index_of(model) -> RopeIndex | None:
    """The model's own M-RoPE position builder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), when it takes
    the processor's outputs as the Qwen models do; None for 1-D positions."""
    for owner in (model, getattr(model, "model", None)):
        method = getattr(owner, "get_rope_index", None)
        if callable(method):
            parameters = inspect.signature(method).parameters
            if {"input_ids", "mm_token_type_ids", "image_grid_thw"} <= set(parameters):
                return method
    return None


def mrope_positions(rope_index: RopeIndex, token_ids: list[int], mm_inputs: dict) -> tuple[torch.Tensor, int]:
    """[3, P] positions of a prompt's tokens and the offset of every later token (position =
    index + delta on all three axes), as the model computes them for its first forward."""
    kwargs = {
        name: mm_inputs[name]
        for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        if mm_inputs.get(name) is not None
    }
    positions, deltas = rope_index(
        torch.tensor([token_ids]), mm_token_type_ids=mm_inputs["mm_token_type_ids"], **kwargs
    )
    return positions[:, 0].clone(), int(deltas.reshape(-1)[0])
