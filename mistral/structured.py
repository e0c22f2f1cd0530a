"""Constrained decoding: answers that must be JSON of a schema, or tool calls the request allows.

A request's constraint is a grammar over bytes (a Lark grammar with JSON schemas inside). At each
step the grammar engine lists, as a bitmask over the 32768 v3 tokens, the tokens that keep the
output a prefix of some sentence of the grammar; the sampler sets every other logit to -inf on the
device (`sampling.sample`), then the chosen token advances the grammar. So an answer that ends with
EOS is a whole sentence: JSON that parses and validates.

What is built here (`Constraint.grammar`):

    response_format {"type": "json_object"}              start: " "? %json {"type": "object"}
    response_format {"type": "json_schema", ...}         start: " "? %json <the schema>
    tool_choice "required" / a named function             start: <[TOOL_CALLS]> " "? %json <calls>
    tool_choice "auto" (the default with tools)           the same, switched on once the model
                                                          emits [TOOL_CALLS] of its own accord

where <calls> is a JSON array (one item with parallel_tool_calls false) of
{"name": <one of the tools>, "arguments": <that tool's parameters>}. JSON may have one space
around its separators (json.dumps's style, in which the v3 prompt writes calls) or none. The
optional leading space is SentencePiece's: the model's first piece usually starts with `▁`,
which decoding drops at the start of the answer.

The engine is llguidance (Microsoft's; used by llama.cpp, vLLM and SGLang). xgrammar fills a
mask faster (median 3 µs a token against 30 µs here, on the v3 vocabulary: BENCHMARKS.md), but
both are far below a decode step, and xgrammar depends on transformers and imports it, which the
runtime must not; llguidance depends on nothing (one 3 MB wheel), so it is a dependency. Where
it cannot be installed, requests that need a grammar get a 400 naming the parameter, tool_choice
"auto" goes unconstrained, and everything else works.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import RequestError
from .tokenizer import Tokenizer

# At most one space around separators: json.dumps's default style (", ", ": "), which is how the v3
# prompt writes tool calls and so how the model writes them, and the compact one. Free whitespace
# would let a sampled answer run on in blanks.
_JSON_STYLE = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?", "item_separator": ",", "key_separator": ":"}


def _llguidance(param: str):
    try:
        import llguidance
    except ImportError:
        raise RequestError(f"{param} needs constrained decoding, which needs the llguidance package "
                           "(pip install llguidance), not installed here", param=param) from None
    return llguidance


# --- grammars from request fields --------------------------------------------------------------


def response_format_grammar(response_format: Any, param: str = "response_format") -> str | None:
    """The grammar OpenAI's `response_format` asks for, or None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError(f"{param} must be an object, got {type(response_format).__name__}", param=param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_grammar({"type": "object"}, lenient=False)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError(f"{param}.json_schema must be an object with a 'schema'", param=f"{param}.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise RequestError(f"{param}.json_schema.schema must be a JSON schema object",
                               param=f"{param}.json_schema.schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError(f"{param}.json_schema.strict must be a boolean", param=f"{param}.json_schema.strict")
        # strict: a keyword the engine cannot enforce is an error; otherwise it is dropped
        # (OpenAI's non-strict mode promises no more than "best effort" either).
        return _json_grammar(schema or {"type": "object"}, lenient=not strict)
    raise RequestError(f"{param}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                       param=f"{param}.type")


def tool_calls_grammar(tools: list[dict], tool_calls_id: int, parallel: bool, answer: str | None = None) -> str:
    """[TOOL_CALLS] then a JSON list of calls to `tools` (the checked list from prompt.read_tools);
    or, with `answer` (a grammar from response_format_grammar), either that answer or the calls."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t["function"]["name"]},
                             "arguments": t["function"]["parameters"] or {"type": "object"}}}
             for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    grammar = f"calls: <[{tool_calls_id}]> " + _json_rule("call_list", schema, lenient=True)
    if answer is None:
        return "start: calls\n" + grammar
    return "start: calls | answer\n" + grammar + "\n" + answer.replace("start:", "answer:", 1)


def _json_grammar(schema: dict, lenient: bool) -> str:
    return "start: " + _json_rule("json", schema, lenient)


def _json_rule(name: str, schema: dict, lenient: bool) -> str:
    """`" "? name` and the rule `name`: JSON of `schema`. The rule names must differ in one grammar."""
    options = {**_JSON_STYLE, "lenient": lenient}
    return f'" "? {name}\n{name}: %json ' + json.dumps({**schema, "x-guidance": options})


# --- the constraint a request carries into the engine ------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """A grammar for one request's answer. `trigger`: a token that switches the grammar on when the
    model emits it (tool_choice "auto"); None: on from the first token."""

    grammar: str
    tokenizer: Tokenizer = field(compare=False)
    trigger: int | None = None

    def matcher(self) -> "Matcher":
        return Matcher(self)


def available() -> bool:
    """Whether the grammar engine is installed."""
    try:
        importlib.import_module("llguidance")
    except ImportError:
        return False
    return True


def make_constraint(tokenizer: Tokenizer, grammar: str, param: str, trigger: int | None = None) -> Constraint:
    """A checked Constraint; without llguidance, or for a grammar it refuses (a schema keyword it
    cannot enforce under strict), a RequestError naming `param`."""
    _llguidance(param)
    error = _check(llguidance_tokenizer(tokenizer), grammar)
    if error:
        raise RequestError(f"{param}: the schema cannot be enforced: {error.splitlines()[0]}", param=param)
    return Constraint(grammar, tokenizer, trigger)


@functools.lru_cache(maxsize=256)
def _check(llg_tokenizer, grammar: str) -> str:
    """The engine's complaint about a grammar, or "" (cached: each schema is compiled once)."""
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar, llg_tokenizer)


class Matcher:
    """One sequence's place in its grammar: fills its row of the token mask, and follows the tokens
    chosen. Used by the engine on its own thread."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self._matcher = None if constraint.trigger is not None else self._start()
        self.failed: str | None = None

    def _start(self):
        import llguidance

        return llguidance.LLMatcher(llguidance_tokenizer(self.constraint.tokenizer), self.constraint.grammar)

    @property
    def active(self) -> bool:
        """Whether the next token is constrained."""
        return self._matcher is not None

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed tokens into `row`, a contiguous int32 CPU tensor of mask_words(V) words."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token: int) -> None:
        if self._matcher is None:
            if token != self.constraint.trigger:
                return
            self._matcher = self._start()
        if not self._matcher.consume_token(token):
            self.failed = self._matcher.get_error() or f"token {token} does not fit the grammar"


# --- the v3 vocabulary as llguidance sees it -----------------------------------------------------


@functools.lru_cache(maxsize=8)
def llguidance_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of the v3 tokenizer, built once per Tokenizer (~0.2 s)."""
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary(tokenizer)))


class Vocabulary:
    """What llguidance.TokenizerWrapper reads: each token's bytes, the special tokens, and an encoder.

    Ordinary pieces are their text with `▁` as a space, byte pieces their byte, control tokens
    0xFF + their name (llguidance's marker for a special token, never valid UTF-8)."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_control(i)]
        self.tokens = [self._bytes(i) for i in range(tok.vocab_size)]

    def _bytes(self, i: int) -> bytes:
        tok = self._tok
        if tok.is_control(i):
            return b"\xff" + tok.id_to_piece(i).encode()
        if tok.is_byte(i):
            return bytes([tok.byte_value[i]])
        return tok.id_to_piece(i).replace("\u2581", " ").encode()

    def __call__(self, text: bytes | str) -> list[int]:
        """Text as it continues an answer: no dummy-prefix space. A newline, which no piece contains,
        takes the dummy prefix and is cut off with it."""
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        ids = self._tok.encode("\n" + text)
        return ids[2:]  # "▁", "<0x0A>"
