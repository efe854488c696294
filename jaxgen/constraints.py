"""Structured output: constraints that decoding keeps to, token by token.

    from jaxgen.constraints import JsonSchema, Regex, Choice, Grammar
    generator.generate_batch(prompts, constraint=JsonSchema({"type": "object", ...}))
    generator.generate_batch(prompts, constraint=[Regex(r"\\d{3}-\\d{4}"), None, Choice(["yes", "no"])])

* `JsonSchema(schema)`: a JSON Schema (a dict, or its JSON text); the output is one JSON value that
  validates. Compact by default (no whitespace between tokens of the JSON text); `whitespace=True`
  allows it. Enforced: types, enum/const, numeric bounds, string lengths, pattern, format,
  items/prefixItems, min/maxItems, properties/required/additionalProperties, anyOf/oneOf/allOf,
  $ref/$defs. Known keywords the engine cannot enforce (not, if/then/else, contains, uniqueItems,
  dependentSchemas) raise ValueError; unknown keywords are ignored, as JSON Schema says.
* `Regex(pattern)`: the whole output matches (Rust `regex` syntax: no look-around or back-references).
* `Choice([...])`: the output is one of the strings.
* `Grammar(text)`: a context-free grammar in llguidance's Lark syntax (`start: ...`, rules in
  lower case, terminals in upper case, `/regex/` and "literal" terminals, `%json {...}` for a JSON
  Schema inside), or in llama.cpp's GBNF (`root ::= ...`), told apart by their syntax.

Matching is on the decoded text: each token's bytes (SentencePiece `▁` as a space, byte pieces
`<0x0A>` as that byte, byte-level BPE characters as their bytes: `jaxgen.runtime.stops.token_texts`).
Special tokens (the model's bos/eos/pad/unk tokens, markers written like `<start_of_turn>` or
`[INST]`) never match text. The end token is allowed only once the constraint is complete; a
hypothesis cut before that (max_length, a stop string) has `constraint_complete` False on its
`GenerationResult`.

Built on llguidance (chosen by measurement, see benchmarks/constraint_engines.py and the README):
`pip install jaxgen[constraints]`. This module imports without it; using a constraint without it
raises ImportError naming the extra. A constraint is compiled once per (constraint, vocabulary)
and cached (`ConstraintCompiler`); each decoded row then follows its own copy of the matcher.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from typing import Dict, List, Optional, Sequence, Union

INSTALL_HINT = "constrained decoding needs llguidance: pip install 'jaxgen[constraints]' (or pip install llguidance)"
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_MARKER = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")  # as jaxgen.tokenizer: '<start_of_turn>', '[INST]'


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return llguidance


class Constraint:
    """Base class: a constraint is a value (equal constraints share one compiled form)."""

    kind = ""

    def key(self) -> tuple:
        raise NotImplementedError

    def grammar(self) -> str:
        """The llguidance grammar (JSON text). ValueError when the constraint is malformed."""
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        text = repr(self.key()[1])
        return f"{type(self).__name__}({text[:60] + '...' if len(text) > 60 else text})"


class JsonSchema(Constraint):
    """A JSON Schema (dict or JSON text). whitespace: allow whitespace between JSON tokens
    (default: compact JSON, `{"a":1}`), which keeps outputs short and models from wandering."""

    kind = "json_schema"

    def __init__(self, schema: Union[dict, str, bool], *, whitespace: bool = False):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ValueError(f"JsonSchema: the schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise TypeError(f"JsonSchema needs a dict (or its JSON text), got {type(schema).__name__}")
        self.schema = schema
        self.whitespace = bool(whitespace)
        self._text = json.dumps(schema)  # key order kept: properties are generated in their order

    def key(self) -> tuple:
        return (self.kind, self._text, self.whitespace)

    def grammar(self) -> str:
        ll = _llguidance()
        options = {"whitespace_flexible": self.whitespace}
        if not self.whitespace:
            options["item_separator"] = ","
            options["key_separator"] = ":"
        try:
            return ll.LLMatcher.grammar_from_json_schema(self._text, overrides=options)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"JsonSchema: {exc}") from None


class Regex(Constraint):
    """The whole output matches `pattern` (Rust regex syntax)."""

    kind = "regex"

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise TypeError(f"Regex needs a str pattern, got {type(pattern).__name__}")
        self.pattern = pattern

    def key(self) -> tuple:
        return (self.kind, self.pattern)

    def grammar(self) -> str:
        return _llguidance().LLMatcher.grammar_from_regex(self.pattern)


class Choice(Constraint):
    """The output is one of `options` (non-empty strings)."""

    kind = "choice"

    def __init__(self, options: Sequence[str]):
        if isinstance(options, (str, bytes)) or not isinstance(options, (list, tuple)):
            raise TypeError(f"Choice needs a list of strings, got {type(options).__name__}")
        for i, option in enumerate(options):
            if not isinstance(option, str):
                raise TypeError(f"Choice option {i} must be a str, got {type(option).__name__}")
            if not option:
                raise ValueError(f"Choice option {i} is empty")
        if not options:
            raise ValueError("Choice needs at least one option")
        self.options = tuple(dict.fromkeys(options))

    def key(self) -> tuple:
        return (self.kind, self.options)

    def grammar(self) -> str:
        return _llguidance().LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in self.options))


class Grammar(Constraint):
    """A context-free grammar: llguidance's Lark syntax or llama.cpp's GBNF (module docstring)."""

    kind = "grammar"

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"Grammar needs the grammar's text (str), got {type(text).__name__}")
        if not text.strip():
            raise ValueError("Grammar: the grammar is empty")
        self.text = text

    def key(self) -> tuple:
        return (self.kind, self.text)

    def grammar(self) -> str:
        try:
            return _llguidance().grammar_from("grammar", self.text)
        except ValueError as exc:
            raise ValueError(f"Grammar: {exc}") from None


def as_constraints(value, n: int) -> List[Optional[Constraint]]:
    """`constraint=` of a generate call -> one entry per prompt (None: a free row). A single
    constraint applies to every prompt; a list needs one entry per prompt."""
    if value is None:
        return [None] * n
    if isinstance(value, Constraint):
        return [value] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"constraint has {len(value)} entries for {n} prompts (pass one per prompt, or one "
                             "constraint for all)")
        for i, c in enumerate(value):
            if c is not None and not isinstance(c, Constraint):
                raise TypeError(f"constraint[{i}] must be a jaxgen.constraints constraint (JsonSchema, Regex, "
                                f"Choice, Grammar) or None, got {type(c).__name__}")
        return list(value)
    raise TypeError("constraint must be a jaxgen.constraints constraint (JsonSchema, Regex, Choice, Grammar), "
                    f"a list of them (None for a free prompt), or None; got {type(value).__name__}")


def special_ids(tokens: Sequence[str], named: Sequence[Optional[str]]) -> List[int]:
    """Ids that never match text: the `named` tokens (bos/eos/pad/unk) and markers ('<...>' that
    are not byte pieces, '[...]')."""
    names = {t for t in named if t}
    return [i for i, t in enumerate(tokens)
            if t in names or (_MARKER.fullmatch(t) is not None and not _BYTE_PIECE.match(t))]


class _Encoder:
    """What llguidance's TokenizerWrapper needs: the token texts and an encoder (greedy longest
    match: llguidance matches any tokenisation, this one is only used for its own helpers)."""

    def __init__(self, texts: List[bytes], eos: int, special: Sequence[int]):
        self.tokens = texts
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = list(special)
        special_set = set(special)
        self._ids: Dict[bytes, int] = {}
        for i, t in enumerate(texts):
            if t and i not in special_set and t not in self._ids:
                self._ids[t] = i
        self._longest = max((len(t) for t in self._ids), default=1)

    def __call__(self, data) -> List[int]:
        data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                token = self._ids.get(data[i:i + n])
                if token is not None:
                    out.append(token)
                    i += n
                    break
            else:
                i += 1  # a byte no token spells: skipped
        return out


def engine_tokenizer(tokens: Sequence[str], eos: int, named: Sequence[Optional[str]] = ()):
    """The llguidance tokenizer of a vocabulary (token strings, index = id; `eos` one end id;
    `named`: the special tokens' strings). Token texts: `jaxgen.runtime.stops.token_texts`."""
    from jaxgen.runtime.stops import token_texts

    ll = _llguidance()
    special = special_ids(tokens, named)
    texts = token_texts(tokens)
    for i in special:
        if not texts[i]:
            texts[i] = tokens[i].encode("utf-8") or b"<special>"
    empty = [i for i, t in enumerate(texts) if not t]
    special = sorted(set(special) | set(empty) | {eos})
    for i in empty:
        texts[i] = f"<empty_{i}>".encode()
    return ll.LLTokenizer(ll.TokenizerWrapper(_Encoder(texts, eos, special)), slices=None)


class Compiled:
    """A constraint compiled for one vocabulary: a template matcher; `matcher()` gives each row its own."""

    def __init__(self, constraint: Constraint, template, words: int):
        self.constraint = constraint
        self._template = template
        self.words = words  # int32 words of a row's packed token mask

    def matcher(self):
        return self._template.deep_copy()

    def accepts(self, ids: Sequence[int]) -> bool:
        """Whether these generated ids (no end token) spell a complete output."""
        m = self.matcher()
        return bool(m.consume_tokens(list(ids))) and not m.is_error() and m.is_accepting()


class ConstraintCompiler:
    """Compiles constraints for one vocabulary, with an LRU cache. The llguidance tokenizer is
    built on first use (about a second for a 262K vocabulary)."""

    def __init__(self, tokens: Sequence[str], eos: Optional[int], named: Sequence[Optional[str]] = (),
                 cache_size: int = 64):
        self._tokens = list(tokens)
        self._eos = eos
        self._named = tuple(named)
        self._tokenizer = None
        self._cache: "collections.OrderedDict[Constraint, Compiled]" = collections.OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    @property
    def mask_words(self) -> int:
        """int32 words of one row's packed mask: ceil(V / 32) for the vocabulary's V tokens."""
        return (len(self._tokens) + 31) // 32

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                eos = self._eos if self._eos is not None else 0
                self._tokenizer = engine_tokenizer(self._tokens, eos, self._named)
            return self._tokenizer

    def compile(self, constraint: Constraint) -> Compiled:
        """The compiled constraint (cached). ValueError for a malformed constraint, a schema
        keyword the engine cannot enforce, or one that no token of the vocabulary can start."""
        if not isinstance(constraint, Constraint):
            raise TypeError(f"not a constraint: {type(constraint).__name__}")
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
        ll = _llguidance()
        grammar = constraint.grammar()
        tokenizer = self.tokenizer()
        is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"{constraint!r} cannot be enforced: {messages[0] if messages else 'invalid'}")
        template = ll.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ValueError(f"{constraint!r} cannot be enforced: {template.get_error()}")
        if not template.is_accepting() and not _any_allowed(template, tokenizer.vocab_size, tokenizer.eos_tokens):
            raise ValueError(f"{constraint!r}: no token sequence of this vocabulary can satisfy it (no token "
                             "can start it)")
        compiled = Compiled(constraint, template, self.mask_words)
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return compiled


def _any_allowed(matcher, vocab_size: int, end_ids: Sequence[int]) -> bool:
    """Whether the matcher's next-token mask allows some token but the end tokens (which the
    engine allows when it finds no way on)."""
    import numpy as np

    mask = np.zeros(((vocab_size + 31) // 32,), np.int32)
    matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    bits = mask.view(np.uint32)
    for t in end_ids:
        bits[t // 32] &= ~np.uint32(1 << (t % 32))
    return bool(np.any(bits))


def compile_all(compiler: ConstraintCompiler, constraints: List[Optional[Constraint]]) -> List[Optional[Compiled]]:
    """Compiles every distinct constraint once; errors name the entry."""
    out: List[Optional[Compiled]] = []
    done: Dict[Constraint, Compiled] = {}
    for i, c in enumerate(constraints):
        if c is None:
            out.append(None)
            continue
        if c not in done:
            try:
                done[c] = compiler.compile(c)
            except ValueError as exc:
                raise ValueError(f"constraint[{i}]: {exc}" if len(constraints) > 1 else str(exc)) from None
        out.append(done[c])
    return out


__all__ = ["Constraint", "JsonSchema", "Regex", "Choice", "Grammar", "ConstraintCompiler", "Compiled",
           "as_constraints", "compile_all", "INSTALL_HINT"]
