"""TGI's `/generate` parameters beyond sampling: the grammar it constrains with, and those this
server does not implement, refused unless at the value that changes nothing."""

from __future__ import annotations

from app.schemas.generate import GenerateGrammar, GenerateParameters
from app.structured import check_size
from scheduler.errors import InvalidRequestError
from scheduler.request import GrammarSpec


def refuse_unsupported(p: GenerateParameters, max_input_tokens: int) -> None:
    """TGI parameters this server does not implement: a 400 naming the one set to a value that
    would change the answer; null, false, 0, 1 (`best_of`), 1.0 (`typical_p`) change nothing."""
    refused = [
        ("details", bool(p.details), "token details are not returned; use /v1/completions with logprobs"),
        (
            "decoder_input_details",
            bool(p.decoder_input_details),
            "prompt token details are not returned; use /v1/completions with echo and logprobs",
        ),
        (
            "top_n_tokens",
            bool(p.top_n_tokens),
            "token alternatives are not returned; use /v1/completions with logprobs",
        ),
        (
            "best_of",
            p.best_of is not None and p.best_of > 1,
            "ranking candidate sequences is not implemented",
        ),
        ("typical_p", p.typical_p is not None and p.typical_p < 1.0, "typical sampling is not implemented"),
        ("watermark", bool(p.watermark), "watermarking is not implemented"),
        ("adapter_id", bool(p.adapter_id), "adapters are not served, only the base model"),
        (
            "truncate",
            p.truncate is not None and p.truncate < max_input_tokens,
            f"prompts are cut from the left to MAX_INPUT_TOKENS={max_input_tokens} tokens only "
            "(a truncate of at least that is accepted)",
        ),
    ]
    for name, effective, why in refused:
        if effective:
            raise InvalidRequestError(
                f"parameters.{name} is not supported on /generate: {why}", param=f"parameters.{name}"
            )


def tgi_grammar(grammar: GenerateGrammar | None) -> GrammarSpec | None:
    """TGI's `grammar` -> the engine's; an invalid schema or regex is a 400 naming it when compiled."""
    if grammar is None:
        return None
    param = "parameters.grammar"
    value = grammar.value
    if grammar.type == "regex":
        if not isinstance(value, str):
            raise InvalidRequestError("a regex grammar's value must be the regex as a string", param=param)
        return GrammarSpec("regex", value, param=param)
    if grammar.type == "json_schema":
        schema = value.get("schema") if isinstance(value, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                'a json_schema grammar\'s value must be {"name": ..., "schema": <a JSON schema object>}',
                param=param,
            )
        value = schema
    # json (and its alias json_object): the schema as an object, or its JSON text, which the
    # grammar compiler parses (naming `param` when it is not JSON).
    text = value if isinstance(value, str) else check_size(value, param)
    return GrammarSpec("json_schema", text, param=param)
