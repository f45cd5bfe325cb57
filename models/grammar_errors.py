"""What a compiled grammar is checked for before it is used, and how its failures are worded for
API clients: a walk into the output that finds llguidance's limits at compile time, and
llguidance's messages cleaned for an error body."""

from __future__ import annotations

import llguidance
import numpy

from models.params import GrammarSpec

MAX_ERROR_CHARS = 500
_WHAT = {
    "json_object": "JSON",
    "json_schema": "JSON schema",
    "regex": "regular expression",
    "lark": "grammar",
    "choice": "choice list",
    "tool_calls": "tool definitions",
}


_PROBE_TOKENS = 4


def probe_limits(matcher: llguidance.LLMatcher) -> llguidance.LLMatcher | None:
    """A copy of `matcher` walked a few tokens into the output, when the walk hits llguidance's
    limits (its error to report as a 400 now rather than mid-generation). llguidance builds lexer
    states lazily: the first mask is where most grammars past its limits fail; `b{1000000}` fails
    at its first token ("too many expressions constructed") and `(a|c)b{999999}` at its second,
    and a grammar that cannot end (a required property that contains itself) forces output
    without end. Each step takes the forced token, else the lowest allowed one.
    Past the first mask only the limits count: a forced token may be an added token's id that
    the grammar takes spelled out (PlainSpelling), which this bare walk would see refused."""
    probe = matcher.deep_copy()
    for step in range(_PROBE_TOKENS):
        mask = probe.compute_bitmask()
        if probe.is_error() and step == 0:
            return probe  # any error there: the grammar can produce nothing ("$ref": "#")
        if probe.is_error() or probe.is_stopped():
            break
        forced = probe.compute_ff_tokens()
        if probe.is_error():
            break
        if forced:
            token = forced[0]
        else:
            words = numpy.frombuffer(mask, dtype=numpy.uint32)
            nonzero = numpy.flatnonzero(words)
            if not len(nonzero):
                break
            word = int(words[nonzero[0]])
            token = int(nonzero[0]) * 32 + (word & -word).bit_length() - 1
        if not probe.consume_token(token):
            break
    error = (probe.get_error() or "") if probe.is_error() else ""
    return probe if any(word in error for word in ("limit", "too many")) else None


def invalid_message(spec: GrammarSpec, error: str) -> str:
    """Why `spec` cannot be used, for the 400: llguidance's error with what it means where it names
    nothing a client wrote."""
    what = _WHAT[spec.kind]
    error = clean_error(error)
    if "Too many items" in error:
        error += " (a grammar with no end, such as a schema whose required property contains itself, has no finite output)"
    elif "NoExtensionBias" in error:
        # llguidance's name for a grammar that can produce nothing at all.
        error += " (the grammar matches no output at all: for example a $ref that only leads to itself)"
    return f"the {what} cannot be used for constrained decoding: {error}"


def clean_error(error: str) -> str:
    """llguidance's message on one line, without the marker it adds when verbose errors are off
    (it means nothing to an API client) or the parser state it dumps after some ("<state>
    Tokens: ...", internals), cut short."""
    error = " ".join(error.split("<state>", 1)[0].replace("<non-verbose/>", " ").split())
    return error[:MAX_ERROR_CHARS] + "..." if len(error) > MAX_ERROR_CHARS else error
