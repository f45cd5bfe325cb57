"""Constrained decoding with llguidance, on the CPU beside the sampler.

A `GrammarCompiler` belongs to one replica. It wraps the replica's tokenizer for llguidance once
(lazily: most servers never see a grammar) and compiles each `GrammarSpec` into a pristine matcher,
cached by value and bounded; every sequence gets a deep copy of it as its `GrammarConstraint`,
the `RowSampler.constraint` hook:

    mask_logits(logits[vocab]) -> logits with every token the grammar forbids at -inf
    advance(token_id)          -> the matcher consumes the sampled token
    is_finished()              -> the grammar cannot be extended (only EOS could follow)
    fork()                     -> an independent copy at the same position (n > 1)

While the grammar is complete but could go on (`{"a": 1}` then maybe more tool calls), the mask
allows the model's EOS tokens, so the model decides; once nothing but EOS can follow, the sequence
ends with "stop" without spending a step on EOS.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

import llguidance
import llguidance.hf
import torch
from llguidance.gbnf_to_lark import any_to_lark
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

from models.errors import InvalidRequestError
from models.grammar_errors import invalid_message, probe_limits
from models.params import GrammarSpec

log = logging.getLogger(__name__)

# JSON as models usually write it (json.dumps' separators) and no free whitespace: a model that
# drifts into newlines or spaces could otherwise fill max_tokens without ever closing the object.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# llguidance's converters and compiler recurse once per level of a chain of references (`$ref`
# a0 -> a1 -> ..., Lark rules r0: r1 ...), which the body's nesting limit does not see: a chain
# of 2,500 overflowed a worker thread's 8 MiB stack and the process died (SIGSEGV) with every
# request in it. Compiles run on a thread with this much stack (address space, touched only as
# deep as a grammar goes): 20,000 $refs, more than the 256 KiB schema cap can hold, take ~0.2 s.
_COMPILE_STACK_BYTES = 256 * 2**20
_stack_size_lock = threading.Lock()


def _on_a_large_stack(compile_it):
    """`compile_it()` on a thread of its own with `_COMPILE_STACK_BYTES` of stack; its result, or
    its exception raised here."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = compile_it()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    with _stack_size_lock:  # the size applies to threads created while it is set
        previous = threading.stack_size(_COMPILE_STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="grammar-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class GrammarCompiler:
    """Compiled grammars of one replica. Thread-safe: the scheduler validates specs in a worker
    thread while the replica thread builds constraints from the same cache."""

    def __init__(
        self, tokenizer, *, vocab_size: int, eos_token_ids: Iterable[int], max_cached: int = 64
    ) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        # The model's logits may be wider than the tokenizer (padded embeddings), never narrower
        # than what llguidance needs to address every tokenizer id.
        self._num_ids = max(vocab_size, len(tokenizer))
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._special: dict[str, int] = {}  # text -> id of tokens llguidance treats as special
        self._plain_spelling: PlainSpelling | None = None
        self._compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._limits = llguidance.LLParserLimits(verbose_errors=False)

    def validate(self, spec: GrammarSpec) -> None:
        """Compile `spec` (or find it cached); raise InvalidRequestError when it cannot be used."""
        self._pristine(spec)

    def is_compiled(self, spec: GrammarSpec) -> bool:
        """Whether `spec` is in the cache (using it costs a copy, not a compile)."""
        with self._lock:
            return spec in self._compiled

    def constraint(self, spec: GrammarSpec) -> GrammarConstraint:
        pristine = self._pristine(spec)
        with self._lock:
            matcher = pristine.deep_copy()
        return GrammarConstraint(matcher, spec.param, self._num_ids, self._plain_spelling)

    # -- compilation ---------------------------------------------------------------------------
    def _pristine(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        with self._lock:
            matcher = self._compiled.get(spec)
            if matcher is not None:
                self._compiled.move_to_end(spec)
                return matcher
            tokenizer = self._tokenizer(spec.param)
        matcher = _on_a_large_stack(lambda: self._compile(spec, tokenizer))
        with self._lock:
            self._compiled[spec] = matcher
            while len(self._compiled) > self._max_cached:
                self._compiled.popitem(last=False)
        return matcher

    def _compile(self, spec: GrammarSpec, tokenizer) -> llguidance.LLMatcher:
        try:
            text = _grammar_text(spec, self._special)
        except InvalidRequestError:
            raise
        except Exception as exc:  # llguidance's converters raise ValueError (e.g. nesting too deep)
            self._blame_a_tool(spec)
            raise InvalidRequestError(invalid_message(spec, str(exc)), param=spec.param) from None
        # Outside the lock: compiling a large schema takes a while and releases the GIL.
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0, limits=self._limits)
        if not matcher.is_error():
            probe = probe_limits(matcher)
            if probe is not None:
                matcher = probe
        if matcher.is_error():
            self._blame_a_tool(spec)
            raise InvalidRequestError(invalid_message(spec, matcher.get_error()), param=spec.param)
        return matcher

    def _blame_a_tool(self, spec: GrammarSpec) -> None:
        """A forced call's grammar that fails: the first tool whose parameters fail alone as a
        JSON schema is the one to name (`tools[i].function.parameters`), with that schema's own
        error rather than one quoting the whole generated grammar."""
        if spec.kind != "tool_calls":
            return
        for position, tool in enumerate(json.loads(spec.source).get("tools", [])):
            parameters = tool.get("parameters")
            if isinstance(parameters, dict):
                index = tool.get("index", position)
                self._pristine(
                    GrammarSpec("json_schema", json.dumps(parameters), f"tools[{index}].function.parameters")
                )

    def _tokenizer(self, param: str) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            try:
                lltokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._num_ids, eos_token=self._eos or None
                )
            except Exception as exc:
                log.warning("constrained decoding unavailable for this tokenizer: %s", exc)
                raise InvalidRequestError(
                    "structured outputs (response_format, guided_* and structured_outputs fields, required or "
                    "named tool_choice) are not supported for this model's tokenizer",
                    param=param,
                ) from None
            added = getattr(self._hf_tokenizer, "added_tokens_decoder", {})
            self._special = {
                t.content: i for i, t in added.items() if t.content and lltokenizer.is_special_token(i)
            }
            self._plain_spelling = PlainSpelling(lltokenizer, self._special)
            self._lltokenizer = lltokenizer
        return self._lltokenizer


def _grammar_text(spec: GrammarSpec, special: dict[str, int]) -> str:
    """The spec as an llguidance grammar; a schema that is not even JSON is the client's error."""
    # vLLM's whitespace_pattern: exactly the whitespace it matches may come between JSON tokens.
    style = JSON_STYLE if spec.whitespace_pattern is None else {"whitespace_pattern": spec.whitespace_pattern}
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=style)
    if spec.kind == "json_schema":
        schema = json.dumps(_json_source(spec, "JSON schema"))
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=style)
    if spec.kind == "choice":
        # Quoted literals, not a regex alternation: no escaping to get wrong, any text is literal.
        choices = json.loads(spec.source)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(_as_lark(spec))
    if spec.kind == "tool_calls":
        return llguidance.LLMatcher.grammar_from_lark(
            tool_calls_lark(_json_source(spec, "tool definition"), special)
        )
    raise InvalidRequestError(f"unknown grammar kind '{spec.kind}'", param=spec.param)


def _as_lark(spec: GrammarSpec) -> str:
    """A client's grammar in Lark, or in GBNF (llama.cpp's EBNF, what vLLM's default backend takes),
    converted by llguidance's own translator."""
    try:
        return any_to_lark(spec.source)
    except Exception as exc:  # the converter raises bare Exceptions for unknown rules
        raise InvalidRequestError(invalid_message(spec, str(exc)), param=spec.param) from None


def _json_source(spec: GrammarSpec, what: str) -> dict:
    try:
        value = json.loads(spec.source)
    except ValueError:
        raise InvalidRequestError(f"the {what} is not valid JSON", param=spec.param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"the {what} must be a JSON object", param=spec.param)
    bound = _unrepresentable_bound(value)
    if bound is not None:
        raise InvalidRequestError(
            f"the {what} has a bound ({bound[0]}: {bound[1]}) beyond what constrained decoding can "
            f"represent (magnitudes below 2**63)",
            param=spec.param,
        )
    return value


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_LARGEST_BOUND = 2**63


def _unrepresentable_bound(node: object, depth: int = 0) -> tuple[str, object] | None:
    """A numeric bound llguidance cannot hold: it would clamp an integer bound of 1e30 to 2**63 - 1
    and generate numbers the schema forbids. Nesting past what any grammar compiles is left to its
    own depth limit."""
    if depth > 200:
        return None
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, int | float) and not isinstance(value, bool):
                if not abs(value) < _LARGEST_BOUND:
                    return key, value
            found = _unrepresentable_bound(value, depth + 1)
            if found is not None:
                return found
    elif isinstance(node, list):
        for item in node:
            found = _unrepresentable_bound(item, depth + 1)
            if found is not None:
                return found
    return None


def tool_calls_lark(config: dict, special: dict[str, int]) -> str:
    """Lark for `prefix call (separator call)* suffix` (one call unless `parallel`), where a call
    is `begin {"name": <a tool>, <arguments_key>: <its parameters>} end`, or with the `name_args`
    layout `begin <a tool's name> args_marker <its parameters> end`. Markup that is one special
    token of this tokenizer (Qwen's `<tool_call>`, Mistral's `[TOOL_CALLS]`) must be written as that
    token: llguidance never spells a special token out of plain bytes, so a quoted literal would
    force the model off the token it was trained on."""

    def seq(*parts: str) -> str:
        return " ".join(p for p in parts if p)

    def literal(key: str) -> str:
        return _lark_literal(config.get(key, ""), special)

    tools = config["tools"]
    if config.get("layout") == "name_args":
        bodies = [
            seq(
                _lark_literal(tool["name"], special),
                literal("args_marker"),
                f"%json {json.dumps({**_arguments_schema(tool), 'x-guidance': JSON_STYLE})}",
            )
            for tool in tools
        ]
        body = bodies[0] if len(bodies) == 1 else "(" + " | ".join(f"({b})" for b in bodies) + ")"
    else:
        key = config.get("arguments_key", "arguments")
        calls = []
        for i, tool in enumerate(tools):
            root = f"#/properties/{key}" if len(tools) == 1 else f"#/anyOf/{i}/properties/{key}"
            calls.append(
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": tool["name"]},
                        key: _reroot(_arguments_schema(tool), root),
                    },
                    "required": ["name", key],
                    "additionalProperties": False,
                }
            )
        schema = dict(calls[0]) if len(calls) == 1 else {"anyOf": calls}
        schema["x-guidance"] = JSON_STYLE
        body = f"%json {json.dumps(schema)}"
    repeat = f"({seq(literal('separator'), 'call')})*" if config.get("parallel", True) else ""
    return f"start: {seq(literal('prefix'), 'call', repeat, literal('suffix'))}\ncall: {seq(literal('begin'), body, literal('end'))}\n"


def _arguments_schema(tool: dict) -> dict:
    # A function sent without `parameters` takes none, as OpenAI reads it: its arguments are `{}`.
    if tool.get("parameters") is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return tool["parameters"] or {"type": "object"}


def _lark_literal(text: str, special: dict[str, int]) -> str:
    """`text` as a Lark sequence: special-token texts become token references (`<[id]>`)."""
    parts: list[str] = []
    rest = text
    while rest:
        hits = [(rest.find(t), -len(t), t) for t in special if t in rest]
        if not hits:
            parts.append(json.dumps(rest))
            break
        at, _, token = min(hits)
        if at:
            parts.append(json.dumps(rest[:at]))
        parts.append(f"<[{special[token]}]>")
        rest = rest[at + len(token) :]
    return " ".join(parts)


def _reroot(schema, root: str):
    """A tool's parameters schema moved under `root`: its local `$ref`s ("#/$defs/X") must now
    point below the new location."""
    if isinstance(schema, dict):
        moved = {k: _reroot(v, root) for k, v in schema.items()}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            moved["$ref"] = root + ref[1:]
        return moved
    if isinstance(schema, list):
        return [_reroot(v, root) for v in schema]
    return schema


class PlainSpelling:
    """llguidance treats every added token written `<...>` as special: only a grammar's explicit
    special-token syntax matches it. Yet when a grammar forces plain text such as `<tool_call>x`
    (a client's regex), llguidance tokenizes that text with the model's tokenizer, which writes the
    added token, and the mask allows a token the parser then refuses once sampled (seen with
    llguidance 1.9.1 on Qwen's `<tool_call>` and `<think>`). Such a token is swapped, in the mask,
    for the first token of its text spelled in ordinary tokens, which the parser accepts."""

    def __init__(self, lltokenizer: llguidance.LLTokenizer, special: dict[str, int]) -> None:
        # End tokens too: a regex spelling `<|im_end|>` was offered the end token, which ended the
        # answer (empty, the regex unmatched); where the grammar may end, the parser accepts it.
        ids = sorted(special.values())
        self._ids = torch.tensor(ids, dtype=torch.long)
        self._word, self._bit = self._ids >> 5, self._ids & 31  # where each id sits in the packed mask
        self._text = {token: text for text, token in special.items()}
        self._lltokenizer = lltokenizer
        self._first_plain: dict[int, int | None] = {}

    def fix(self, matcher: llguidance.LLMatcher, words: torch.Tensor, allowed: torch.Tensor) -> None:
        """`words`: the packed mask on the CPU; `allowed`: the same unpacked, changed in place."""
        if not len(self._ids):
            return
        bits = (words[self._word] >> self._bit) & 1
        if not bool(bits.any()):
            return
        for token in self._ids[bits.bool()].tolist():
            if matcher.validate_tokens([token]) == 1:
                continue  # the grammar asks for the special token itself (a tool call's tag)
            allowed[token] = False
            plain = self._plain(token)
            if plain is not None and matcher.validate_tokens([plain]) == 1:
                allowed[plain] = True

    def _plain(self, token: int) -> int | None:
        if token not in self._first_plain:
            spelled = self._lltokenizer.greedy_tokenize(self._text[token])
            self._first_plain[token] = spelled[0] if spelled else None
        return self._first_plain[token]


# A grammar's mask is computed on the replica thread, row by row, inside every step: a grammar
# whose masks cost more CPU than this on average (a moving mean, from its `_MASKS_BEFORE_JUDGING`th
# mask on) would slow every request in the batch (`guided_regex: "b{100000}"` takes ~17 ms a token
# where a JSON schema takes under 0.1 ms: a neighbour's inter-token gaps went from 6 to 380 ms), so
# it fails its own request. Free-text regexes on 150k-258k vocabularies take 2-3 ms a token; the
# mean keeps one mask slowed by a neighbour's CPU from failing them.
MASK_BUDGET_S = 0.010
_MASKS_BEFORE_JUDGING = 4


class GrammarConstraint:
    """One sequence's position in its grammar; lives on the replica thread."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        param: str,
        num_ids: int,
        plain_spelling: PlainSpelling | None = None,
    ) -> None:
        self._matcher = matcher
        self.param = param  # the request field the grammar came from, for errors
        self._num_ids = num_ids
        self._plain_spelling = plain_spelling
        # One bit per token id, packed in int32 words: [1, ceil(ids / 32)]; llguidance fills it.
        self._bitmask = allocate_token_bitmask(1, num_ids)
        self._shifts: torch.Tensor | None = None  # [32] on the logits' device
        self._masks = 0
        self._mean_mask_s = 0.0  # moving mean of the CPU each mask took
        self._too_slow: str | None = None

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [vocab] -> the same with forbidden tokens at -inf."""
        started = time.thread_time()  # CPU, not wall: a thread descheduled by a neighbour is not slow
        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        spent = time.thread_time() - started
        self._masks += 1
        self._mean_mask_s = spent if self._masks == 1 else 0.75 * self._mean_mask_s + 0.25 * spent
        if (
            self._masks >= _MASKS_BEFORE_JUDGING
            and self._mean_mask_s > MASK_BUDGET_S
            and self._too_slow is None
        ):
            self._too_slow = (
                f"the grammar takes {self._mean_mask_s * 1e3:.0f} ms of CPU per token to follow, more than "
                f"the {MASK_BUDGET_S * 1e3:.0f} ms allowed (it would slow every request beside it)"
            )
        if self._too_slow is not None or self._matcher.is_error():
            # A limit hit mid-generation (lexer fuel, Earley items): nothing may be sampled; the
            # row fails alone and `error` says why.
            return torch.full_like(logits, float("-inf"))
        # llguidance.torch's own apply is torch.compile'd: the first constrained request would
        # compile a kernel (seconds, and a C++ toolchain at run time). Unpacking is three ops.
        words = self._bitmask[0].to(logits.device)
        if self._shifts is None or self._shifts.device != logits.device:
            self._shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((words.unsqueeze(-1) >> self._shifts) & 1).flatten().bool()  # [words * 32]
        if self._plain_spelling is not None:
            self._plain_spelling.fix(self._matcher, self._bitmask[0], allowed)
        vocab = logits.shape[-1]
        if allowed.shape[0] < vocab:
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[0]), value=False)
        return logits.masked_fill(~allowed[:vocab], float("-inf"))

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            log.warning("constrained decoding rejected token %d: %s", token_id, self._matcher.get_error())

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Set when the matcher broke (a token outside the mask; its output cannot be trusted) or
        when following the grammar costs too much per token."""
        if self._too_slow is not None:
            return self._too_slow
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "constrained decoding failed"

    def fork(self) -> GrammarConstraint:
        return GrammarConstraint(self._matcher.deep_copy(), self.param, self._num_ids, self._plain_spelling)
