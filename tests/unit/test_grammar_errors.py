"""Grammars the engine cannot serve: each is a 400 naming its field before generation starts
(past llguidance's limits, without a finite output, matching nothing), and a grammar that turns
out too costly per token fails only its own request. None may kill the process."""

from __future__ import annotations

import json

import llguidance
import pytest
import torch

from models.errors import InvalidRequestError
from models.grammar import GrammarCompiler
from models.loader import LoadSpec
from models.params import GrammarSpec, SamplingParams
from models.replica import build_replica
from tests.unit.configs import replica_config
from tests.unit.test_grammar import PERSON

CHEAP = PERSON  # a realistic schema (a bounded string, an integer range, an enum array)


@pytest.fixture(scope="module")
def replica(tiny_text_path):
    return build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=8)
    )


def test_a_grammar_past_the_engine_limits_is_a_400_before_generation(replica):
    compiler = replica.grammars
    tight = GrammarCompiler(
        replica.loaded.tokenizer, vocab_size=replica.vocab_size, eos_token_ids=replica.loaded.eos_token_ids
    )
    tight._limits = llguidance.LLParserLimits(step_lexer_fuel=1, initial_lexer_fuel=1, verbose_errors=False)
    spec = GrammarSpec("json_schema", json.dumps({"type": "string", "pattern": "(a|b|c)[0-9]{3,9}x"}))
    compiler.validate(spec)  # fine with the default limits
    with pytest.raises(InvalidRequestError) as caught:
        tight.validate(spec)
    assert caught.value.param == "response_format"
    assert caught.value.message.startswith("the JSON schema cannot be used for constrained decoding")


@pytest.mark.parametrize("pattern", ["b{1000000}", "(a|c)b{999999}", "[ac]b{888888}"])
def test_a_pattern_past_the_lexers_limits_a_few_tokens_in_is_a_400_before_generation(replica, pattern):
    """`b{1000000}` passes the first mask and fails at the first token ("too many expressions
    constructed"), `(a|c)b{999999}` at the second: the client had a 200, then an error event,
    and the SDK's generic APIError."""
    with pytest.raises(InvalidRequestError) as caught:
        replica.grammars.validate(GrammarSpec("regex", pattern, param="guided_regex"))
    assert caught.value.param == "guided_regex" and "too many expressions" in caught.value.message
    assert "<state>" not in caught.value.message  # llguidance's parser dump is not the client's


_SELF = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}}}
_SELF_ARRAY = {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}}}


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("json_schema", json.dumps({**_SELF, "$ref": "#/$defs/n"})),
        GrammarSpec("json_schema", json.dumps({**_SELF_ARRAY, "$ref": "#/$defs/n"})),
        GrammarSpec("lark", 'start: "a" start', param="guided_grammar"),
    ],
    ids=["required-property-contains-itself", "non-empty-array-of-itself", "rule-without-base-case"],
)
def test_a_grammar_with_no_end_is_a_400_before_generation(replica, spec):
    """Such grammars pass the first mask; generation then hit llguidance's item limit on its first
    token (the run of forced tokens has no end) and the request failed with a 500."""
    with pytest.raises(InvalidRequestError) as caught:
        replica.grammars.validate(spec)
    assert caught.value.param == spec.param
    assert "no finite output" in caught.value.message and "<non-verbose/>" not in caught.value.message
    # A recursive schema that can end is fine.
    replica.grammars.validate(
        GrammarSpec(
            "json_schema", json.dumps({**_SELF, "$ref": "#/$defs/n"}).replace(', "required": ["c"]', "")
        )
    )


class _BrokenConstraint:
    param = "tools"

    def __init__(self, error: str) -> None:
        self.error = error


def test_a_grammar_failing_mid_generation_on_a_limit_is_the_requests_400():
    from models.errors import GenerationError
    from models.generation import _constraint_failure

    limit = _constraint_failure(
        _BrokenConstraint("parser error: Too many items (limit 50000; ff_tokens) <non-verbose/>")
    )
    assert isinstance(limit, InvalidRequestError) and limit.param == "tools"
    assert "<non-verbose/>" not in limit.message
    assert isinstance(_constraint_failure(_BrokenConstraint("token 5 not allowed")), GenerationError)


def test_a_schema_that_matches_nothing_says_so(replica):
    """A $ref that only leads to itself: llguidance says "NoExtensionBias", which tells a client nothing."""
    with pytest.raises(InvalidRequestError) as caught:
        replica.grammars.validate(GrammarSpec("json_schema", json.dumps({"$ref": "#"})))
    assert "matches no output at all" in caught.value.message


_CHAIN_COMPILE = """
import json, sys
from models.errors import InvalidRequestError
from models.grammar import GrammarCompiler
from models.params import GrammarSpec
from models.tiny import build_tokenizer

compiler = GrammarCompiler(build_tokenizer(512), vocab_size=512, eos_token_ids=[0])
n = 5000
defs = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
defs[f"a{n}"] = {"type": "string", "maxLength": 3}
rules = "start: r0\\n" + "".join(f"r{i}: r{i + 1}\\n" for i in range(n)) + f'r{n}: "a"\\n'
for spec in (
    GrammarSpec("json_schema", json.dumps({"$defs": defs, "$ref": "#/$defs/a0"})),
    GrammarSpec("lark", rules),
):
    try:
        compiler.validate(spec)
        compiler.constraint(spec)
    except InvalidRequestError:
        pass
print("alive")
"""


def test_a_long_chain_of_references_compiles_without_killing_the_process():
    """A $ref chain a0 -> a1 -> ... (no nesting for the body's limit to see) or a chain of Lark
    rules made llguidance recurse past a worker thread's stack: the server died of SIGSEGV with
    every request in it. Run apart, so that a crash fails this test and not the session."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", _CHAIN_COMPILE],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "alive" in done.stdout, (done.returncode, done.stderr[-500:])


def test_a_grammar_too_costly_per_token_fails_its_own_request(replica):
    """`b{100000}` compiles in a millisecond but costs ~17 ms of CPU per mask, on the replica
    thread, inside every step: a neighbour's inter-token gaps went from 6 to 380 ms. After a few
    such masks the row gets none (its request fails with a 400 saying why); cheap grammars never
    come near the budget."""
    from models.sampling import RowSampler, sample

    costly = replica.grammars.constraint(GrammarSpec("regex", "b{100000}", param="guided_regex"))
    cheap = replica.grammars.constraint(
        GrammarSpec("json_schema", json.dumps(CHEAP), param="response_format")
    )
    vocab = len(replica.loaded.tokenizer)
    for _ in range(6):
        costly_logits = costly.mask_logits(torch.zeros(vocab))
        cheap.mask_logits(torch.zeros(vocab))
    assert costly.error is not None and "ms of CPU per token" in costly.error
    assert not torch.isfinite(costly_logits).any()
    assert cheap.error is None
    row = RowSampler(
        SamplingParams(max_tokens=4, temperature=0.0),
        vocab_size=vocab,
        device=torch.device("cpu"),
        prompt_ids=[],
        eos_token_ids=frozenset(),
        seed=None,
    )
    row.constraint = costly
    assert sample(torch.zeros(1, vocab), [row])[0] == [None]
