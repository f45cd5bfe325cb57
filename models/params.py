"""Per-request generation parameters as the engine sees them (no wire types here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

GREEDY_BELOW = 1e-5
GrammarKind = Literal["json_object", "json_schema", "regex", "lark", "choice", "tool_calls"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What the output must match; `models.grammar` compiles it (cached by value, so equal specs
    share one compiled grammar).

    `source` is the JSON schema as JSON text (json_schema), a regex, an llguidance Lark grammar, the
    allowed outputs as a JSON list of strings (choice), or
    for tool_calls a JSON object `{"begin", "end", "separator", "tools": [{"name", "parameters"}],
    "parallel"}` and optionally `"prefix"`, `"suffix"`, `"arguments_key"` and `"layout": "name_args"`
    with `"args_marker"`: one or more `begin {"name": ..., "arguments": ...} end` blocks (or `begin
    name args_marker {...} end`) between prefix and suffix, in the chat format's markup (the compiler
    binds it to the tokenizer's own tokens; `models.grammar.tool_calls_lark`). Empty for json_object.
    `whitespace_pattern`: JSON kinds only, a regex for the whitespace allowed between JSON tokens
    (None: none, items separated as `json.dumps` writes them). `param` names the request field it
    came from, for error messages only.
    """

    kind: GrammarKind
    source: str = ""
    param: str = field(default="response_format", compare=False)
    whitespace_pattern: str | None = None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Everything that decides which tokens a sequence gets; each row of a batch has its own.

    `temperature == 0` means greedy. Penalties follow OpenAI (presence/frequency, over generated
    tokens) and Hugging Face (repetition, over prompt + generated tokens).
    """

    max_tokens: int | None = None  # None: the server decides (its default, within the context)
    # What an absent max_tokens stands for on this endpoint (OpenAI's 16 on /v1/completions),
    # treated as a default: lowered to the room left, never warned about. None: the server's cap.
    default_max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    # None: no logprobs; 0..20: the chosen token's logprob plus that many alternatives.
    logprobs: int | None = None
    # None: no prompt logprobs; 0..20: each prompt token's logprob (after the first, which has
    # none) plus that many alternatives, computed during prefill (echo with logprobs, vLLM's
    # prompt_logprobs). A sequence that asks for them computes its whole prompt: no prefix hit.
    prompt_logprobs: int | None = None
    logit_bias: Mapping[int, float] | None = None
    skip_special_tokens: bool = True
    # Special tokens kept in the text while the others are skipped: a tool-call format's markers.
    keep_special_tokens: tuple[str, ...] = ()
    # Constrained decoding: the output must match this grammar (models.grammar).
    grammar: GrammarSpec | None = None

    @property
    def is_greedy(self) -> bool:
        # As vLLM: temperatures this small are greedy (dividing by them overflows the logits).
        return self.temperature < GREEDY_BELOW

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True, slots=True)
class PromptInput:
    """What to render: chat messages (OpenAI-shaped dicts, images already replaced by
    `{"type": "image"}` parts) or a raw prompt (text or token ids)."""

    messages: tuple[Mapping[str, Any], ...] | None = None
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    tools: tuple[Mapping[str, Any], ...] | None = None
    add_generation_prompt: bool = True
    # None: a raw text prompt gets the tokenizer's special tokens (BOS), a rendered chat does not
    # (its template already wrote them).
    add_special_tokens: bool | None = None
    # Raw text only: special-token spellings become plain text instead of control tokens.
    split_special_tokens: bool = False
    # Raw encoded images in the order their placeholders appear in `messages`, and the request
    # field each came from (for errors: "messages[0].content[1].image_url").
    images: tuple[bytes, ...] = ()
    image_params: tuple[str, ...] = ()
    # Per image, a longest side below the server's (`detail: "low"`); None or missing: the server's.
    image_max_sides: tuple[int | None, ...] = ()
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)


_MASK64 = (1 << 64) - 1


def choice_seed(seed: int, index: int) -> int:
    """The seed choice `index` of a request seeded `seed` samples with. Choice 0 keeps the
    request's seed (an n=1 request is the same with n > 1); the others get SplitMix64's mix of the
    pair, so that requests with neighbouring seeds share no choices (with seed + index, choices
    1..n-1 of seed 7 were choices 0..n-2 of seed 8, and a client trying seeds 0, 1, 2... for
    best-of-n got duplicates)."""
    if index == 0:
        return seed % (1 << 64)
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
