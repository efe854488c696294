"""Which structured-output engine jaxgen builds on: llguidance, xgrammar and outlines-core compared on
the default model's vocabulary (Gemma 3, 262,144 tokens), as jaxgen would use them.

For each engine: the one-off vocabulary preparation, the compile time of a JSON schema, the mean
per-step mask time along a valid output (consume the token, compute the next [V] mask), and which
of a set of JSON Schema features it accepts (coverage). Token texts come from jaxgen's own
`jaxgen.runtime.stops.token_texts` (SentencePiece `▁`, byte pieces `<0x0A>`).

    python benchmarks/constraint_engines.py [--engines llguidance,xgrammar,outlines] [--model DIR]

Needs the three packages (`pip install llguidance xgrammar outlines-core`); engines missing are
skipped. One CPU thread per engine call where the engine lets us choose (masks for one row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "mood", "address"],
    "additionalProperties": False,
}
OUTPUT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "mood": "happy",
                     "address": {"city": "London", "zip": "12345"}}, separators=(",", ":"))

# JSON Schema features (name, schema, a valid instance, an invalid one): covered = compiles, accepts the
# valid instance and refuses the invalid one (an engine that ignores a keyword accepts both).
FEATURES = [
    ("enum", {"enum": ["a", "b"]}, "a", "c"),
    ("const", {"const": "x"}, "x", "y"),
    ("integer bounds", {"type": "integer", "minimum": 3, "maximum": 7}, 5, 9),
    ("exclusiveMinimum", {"type": "integer", "exclusiveMinimum": 3}, 4, 3),
    ("number", {"type": "number"}, 1.5, "1.5"),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 10, 11),
    ("string lengths", {"type": "string", "minLength": 2, "maxLength": 3}, "ab", "abcd"),
    ("pattern", {"type": "string", "pattern": "^[a-z]+$"}, "abc", "aB"),
    ("format date", {"type": "string", "format": "date"}, "2024-01-02", "2024-13-02"),
    ("format email", {"type": "string", "format": "email"}, "a@b.co", "ab.co"),
    ("array bounds", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, [1], [1, 2, 3]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, [1, "a"], ["a", 1]),
    ("nested object", SCHEMA, json.loads(OUTPUT), {**json.loads(OUTPUT), "age": 200}),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"}}, {"k": 1},
     {"k": "v"}),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "s", [1]),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "string"}]}, 3, [3]),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
     {"a": 1}, {"b": 1}),
    ("$ref / $defs", {"$defs": {"n": {"type": "integer"}}, "type": "object",
                      "properties": {"x": {"$ref": "#/$defs/n"}}, "required": ["x"]}, {"x": 1}, {"x": "1"}),
    ("recursive $ref", {"$defs": {"t": {"type": "object", "properties": {"c": {"type": "array",
                        "items": {"$ref": "#/$defs/t"}}}}}, "$ref": "#/$defs/t"}, {"c": [{"c": []}]},
     {"c": [{"c": [1]}]}),
    ("if/then/else", {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, 1, -1),
    ("not", {"not": {"type": "string"}}, 1, "s"),
]


def vocabulary(model_dir: str):
    from jaxgen.model.checkpoint import load_vocabulary
    from jaxgen.model.config import ModelConfig
    from jaxgen.runtime.stops import token_texts

    config = ModelConfig.load(model_dir)
    tokens = load_vocabulary(model_dir)
    eos = tokens.index(config.eos_token)
    return tokens, token_texts(tokens), eos


def tokenize(texts: List[bytes], text: str) -> List[int]:
    """Greedy longest-match tokenisation of `text` over the token texts (a valid path for every engine)."""
    best: Dict[bytes, int] = {}
    for i, t in enumerate(texts):
        if t and t not in best:
            best[t] = i
    longest = max(len(t) for t in best)
    data, out, i = text.encode(), [], 0
    while i < len(data):
        for n in range(min(longest, len(data) - i), 0, -1):
            if data[i:i + n] in best:
                out.append(best[data[i:i + n]])
                i += n
                break
        else:
            raise ValueError(f"no token for byte {data[i]}")
    return out


class Engine:
    name = ""

    def prepare(self, tokens, texts, eos): ...
    def compile(self, schema: dict): ...
    def steps(self, compiled, ids: List[int]) -> float: ...  # mean seconds per (consume + mask)
    def accepts(self, compiled, ids: List[int]) -> bool: ...


class LLGuidance(Engine):
    name = "llguidance"

    def prepare(self, tokens, texts, eos):
        import llguidance

        from jaxgen.constraints import engine_tokenizer
        self.ll = llguidance
        self.tok = engine_tokenizer(tokens, eos)
        self.v = len(tokens)

    def compile(self, schema):
        from jaxgen.constraints import JsonSchema

        grammar = JsonSchema(schema).grammar()  # as jaxgen compiles it (compact JSON)
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def steps(self, grammar, ids):
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        mask = np.zeros(((self.v + 31) // 32,), np.int32)
        start = time.perf_counter()
        for t in ids:
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            assert mask[t // 32] >> (t % 32) & 1, "token not allowed"
            assert matcher.consume_token(t)
        return (time.perf_counter() - start) / len(ids)

    def accepts(self, grammar, ids):
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        return matcher.consume_tokens(ids) and matcher.is_accepting()


class XGrammar(Engine):
    name = "xgrammar"

    def prepare(self, tokens, texts, eos):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(texts, vocab_type=xgr.VocabType.RAW, vocab_size=len(texts), stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.v = len(tokens)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), strict_mode=True)

    def steps(self, compiled, ids):
        matcher = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.v)
        start = time.perf_counter()
        for t in ids:
            matcher.fill_next_token_bitmask(mask)
            assert int(mask[0, t // 32]) >> (t % 32) & 1, "token not allowed"
            assert matcher.accept_token(t)
        return (time.perf_counter() - start) / len(ids)

    def accepts(self, compiled, ids):
        matcher = self.xgr.GrammarMatcher(compiled)
        return all_ok(matcher, ids)


def all_ok(matcher, ids) -> bool:
    for t in ids:
        if not matcher.accept_token(t):
            return False
    return matcher.accept_token(matcher.stop_token_ids[0])


class Outlines(Engine):
    name = "outlines-core"

    def prepare(self, tokens, texts, eos):
        import outlines_core

        self.oc = outlines_core
        table: Dict[bytes, List[int]] = {}
        for i, t in enumerate(texts):
            if t and i != eos:
                table.setdefault(t, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, table)
        self.v = len(tokens)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def steps(self, index, ids):
        guide = self.oc.Guide(index)
        mask = np.zeros(((self.v + 31) // 32,), np.int32)
        start = time.perf_counter()
        for t in ids:
            guide.write_mask_into(mask.ctypes.data, mask.size, 4)
            assert mask[t // 32] >> (t % 32) & 1, "token not allowed"
            guide.advance(t)
        return (time.perf_counter() - start) / len(ids)

    def accepts(self, index, ids):
        guide = self.oc.Guide(index)
        try:
            for t in ids:
                guide.advance(t)
        except Exception:
            return False
        return guide.is_finished()


ENGINES: Dict[str, Callable[[], Engine]] = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines": Outlines}


def main(argv=None) -> int:
    from jaxgen.default_model import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="llguidance,xgrammar,outlines")
    parser.add_argument("--model", default=None, help="jaxgen model directory (default: the default model)")
    parser.add_argument("--features", action="store_true", help="also check JSON Schema coverage")
    args = parser.parse_args(argv)
    tokens, texts, eos = vocabulary(args.model or default_model_dir())
    ids = tokenize(texts, OUTPUT)
    print(f"vocabulary: {len(tokens):,} tokens; output: {len(ids)} tokens")
    rows = []
    for name in args.engines.split(","):
        engine = ENGINES[name]()
        try:
            start = time.perf_counter()
            engine.prepare(tokens, texts, eos)
            prep = time.perf_counter() - start
            heavy = [m for m in ("torch", "transformers", "triton") if m in sys.modules]
        except ImportError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        start = time.perf_counter()
        compiled = engine.compile(SCHEMA)
        comp = time.perf_counter() - start
        per_step = min(engine.steps(compiled, ids) for _ in range(3))  # the best of 3 passes (a loaded machine)
        covered = []
        if args.features:
            for feature, schema, good, bad in FEATURES:
                try:
                    c = engine.compile(schema)
                    ok = (engine.accepts(c, tokenize(texts, json.dumps(good, separators=(",", ":"))))
                          and not engine.accepts(c, tokenize(texts, json.dumps(bad, separators=(",", ":")))))
                except Exception:
                    ok = False
                covered.append(feature if ok else f"-{feature}")
        rows.append((name, prep, comp, per_step, covered))
        print(f"{name}: import + vocabulary {prep:.2f} s (imports {', '.join(heavy) or 'no torch'}), "
              f"schema compile {comp * 1e3:.1f} ms, "
              f"mask+consume {per_step * 1e6:.0f} us/token"
              + (f", features {sum(not c.startswith('-') for c in covered)}/{len(FEATURES)}: "
                 f"missing {[c[1:] for c in covered if c.startswith('-')]}" if covered else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
