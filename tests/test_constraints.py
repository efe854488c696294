"""Constrained decoding (jaxgen.constraints): JSON Schema, regex, choice and grammar constraints
enforced inside the greedy / sampling / beam loops and on the slot scheduler.

Most tests run on a tiny random gemma3-like model whose vocabulary is characters (every printable
ASCII character, plus a few JSON-ish multi-character tokens), so that any constraint can be
spelled; its outputs are random, so a test checks what must hold whatever the model prefers:
every complete output fullmatches / parses and validates, an output cut by max_length is
flagged (`constraint_complete` False) and is a prefix of a valid one. One slow test checks the
same on the default model (Gemma 3 270M), where the outputs complete.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

import jaxgen  # noqa: E402
from jaxgen.constraints import Choice, Grammar, JsonSchema, Regex  # noqa: E402
from jaxgen.runtime import matchers  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
MULTI = ['{"', '"}', '":', '",', '":"', '","', '["', '"]', "true", "false", "null", "ok", "no", "yes", "age",
         "name", "tags", "city", "zip", "mood", "happy", "sad", "red", "green", "blue", "12", "34", "56", "78",
         "90", "the", "an", "in", "on", "at", "er", "es", "ed", "ing", "ion", "al", "re", "st", "nd", "ou", "is",
         "it", "\n", "  ", "positive", "negative", "neutral", "item", "items", "ab", "cd", "ef", "gh", "id",
         "size", "kind"]
VOCAB = SPECIALS + [chr(c) for c in range(0x20, 0x7F)] + MULTI
EOS = 1

SMALL_SCHEMA = {"type": "object",
                "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 20},
                               "mood": {"enum": ["happy", "sad"]}},
                "required": ["ok", "n", "mood"], "additionalProperties": False}
RECORD_SCHEMA = {  # objects, arrays, enums, bounded integers, nested objects, string lengths
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}


def build_char_model(directory: str, heads: int = 2, kv_heads: int = 1) -> str:
    """A tiny random model directory over VOCAB, with a tokenizer.json (characters, no merges) for the CLI."""
    from tokenizers import Tokenizer, decoders, models

    from jaxgen.model.checkpoint import expected_flat_shapes, save_model_dir
    from jaxgen.model.config import ModelConfig

    config = ModelConfig(
        architecture="gemma3", vocab_size=len(VOCAB), hidden_size=32, num_layers=2, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=16, intermediate_size=64, norm_offset=1.0, norm_placement="sandwich",
        qk_norm="head", activation="gelu_tanh", layer_types=("sliding", "full"), sliding_window=8,
        max_position_embeddings=512, embedding_scale=32 ** 0.5, bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    rng = np.random.default_rng(0)
    flat = {name: ((0.1 if "norm" in name else 0.3) * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in expected_flat_shapes(config).items()}
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(VOCAB)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    save_model_dir(directory, config, flat, VOCAB, [("tokenizer.json", tok.to_str().encode())],
                   {"tokenizer_config.json": {"bos_token": "<bos>", "eos_token": "<eos>"}})
    return directory


@pytest.fixture(scope="module")
def char_model(tmp_path_factory) -> str:
    return build_char_model(str(tmp_path_factory.mktemp("constraints") / "model"))


@pytest.fixture(scope="module")
def gen(char_model):
    return jaxgen.Generator(char_model)


def prompt(text: str = "x"):
    return ["<bos>"] + list(text)


def text_of(ids) -> str:
    return "".join(VOCAB[i] for i in ids if i != EOS)


def generated(result, h: int = 0) -> str:
    return text_of(result.sequences_ids[h])


def check_regex(pattern: str, text: str, complete: bool) -> None:
    if complete:
        assert re.fullmatch(pattern, text), (pattern, text)


def check_json(schema: dict, text: str, complete: bool) -> None:
    if complete:
        jsonschema.validate(json.loads(text), schema)


DECODINGS = {
    "greedy": dict(),
    "sampling": dict(sampling_topk=0, sampling_temperature=1.0),
    "beam": dict(beam_size=3, num_hypotheses=2),
}


# ---------------------------------------------------------------------------- outputs keep to their constraint
@pytest.mark.parametrize("decoding", list(DECODINGS))
def test_regex_outputs_fullmatch(gen, decoding):
    pattern = r"[a-z]{2,6}(-[0-9]{1,3})?"
    seeds = range(4) if decoding == "sampling" else [0]
    completes = []
    for seed in seeds:
        results = gen.generate_batch([prompt("ab"), prompt("zz")], max_length=12, include_prompt_in_result=False,
                                     constraint=Regex(pattern), random_seed=seed, **DECODINGS[decoding])
        for r in results:
            assert len(r.constraint_complete) == len(r.sequences_ids)
            for h, complete in enumerate(r.constraint_complete):
                check_regex(pattern, generated(r, h), complete)
                completes.append(complete)
    assert any(completes)  # the pattern ends by itself within 10 characters


@pytest.mark.parametrize("decoding", list(DECODINGS))
def test_choice_outputs_are_options(gen, decoding):
    options = ["positive", "negative", "neutral", "n/a"]
    seeds = range(4) if decoding == "sampling" else [0]
    for seed in seeds:
        results = gen.generate_batch([prompt("review"), prompt("q")], max_length=16, include_prompt_in_result=False,
                                     constraint=Choice(options), random_seed=seed, **DECODINGS[decoding])
        for r in results:
            for h in range(len(r.sequences_ids)):
                assert r.constraint_complete[h]
                assert generated(r, h) in options
                assert r.sequences_ids[h][-1:] != [EOS]  # return_end_token is off


@pytest.mark.parametrize("decoding", list(DECODINGS))
def test_json_schema_outputs_validate(gen, decoding):
    seeds = range(6) if decoding == "sampling" else [0]
    completes = []
    for seed in seeds:
        results = gen.generate_batch([prompt("{"), prompt("rec")], max_length=40, include_prompt_in_result=False,
                                     constraint=JsonSchema(SMALL_SCHEMA), random_seed=seed, **DECODINGS[decoding])
        for r in results:
            for h, complete in enumerate(r.constraint_complete):
                check_json(SMALL_SCHEMA, generated(r, h), complete)
                completes.append(complete)
    assert any(completes)


def test_grammar_lark_and_gbnf(gen):
    lark = 'start: item ("," item)*\nitem: /[0-9]{1,2}/ | "ok"'
    gbnf = 'root ::= "(" [a-c]+ ")"'
    results = gen.generate_batch([prompt(), prompt()], max_length=10, include_prompt_in_result=False,
                                 constraint=[Grammar(lark), Grammar(gbnf)])
    check_regex(r"([0-9]{1,2}|ok)(,([0-9]{1,2}|ok))*", generated(results[0]), results[0].constraint_complete[0])
    check_regex(r"\([a-c]+\)", generated(results[1]), results[1].constraint_complete[0])
    assert re.fullmatch(r"\([a-c]*\)?", generated(results[1]))


def test_cut_by_max_length_is_flagged(gen):
    pattern = "[a-z]{30}"
    for decoding in DECODINGS.values():
        results = gen.generate_batch([prompt()], max_length=5, include_prompt_in_result=False,
                                     constraint=Regex(pattern), **decoding)
        for h, complete in enumerate(results[0].constraint_complete):
            assert complete is False
            assert len(results[0].sequences_ids[h]) == 5 and re.fullmatch("[a-z]+", generated(results[0], h))


# ---------------------------------------------------------------------------- mixed batches, paths
@pytest.mark.slow  # ~45 s on 2 cores
def test_free_row_equals_unconstrained(gen):
    prompts = [prompt("ab"), prompt("cd"), prompt("q")]
    for decoding in (dict(), dict(sampling_topk=0, random_seed=3), dict(beam_size=2)):
        free = gen.generate_batch(prompts, max_length=10, include_prompt_in_result=False, **decoding)
        mixed = gen.generate_batch(prompts, max_length=10, include_prompt_in_result=False,
                                   constraint=[Regex("[0-9]+"), None, Choice(["no"])], **decoding)
        assert mixed[1].sequences_ids == free[1].sequences_ids
        assert mixed[1].constraint_complete == []
        assert generated(mixed[2]) == "no"
        assert re.fullmatch("[0-9]*", generated(mixed[0]))


def test_scheduler_equals_static_path(char_model, gen):
    static = jaxgen.Generator(char_model, continuous_batching=False)
    prompts = [prompt("a" * n) for n in range(1, 7)]
    constraints = [Regex("[a-f]{1,8}"), None, JsonSchema(SMALL_SCHEMA), Choice(["yes", "no"]), None,
                   Regex("[0-9]{3}")]
    for decoding in (dict(), dict(sampling_topk=8, random_seed=11)):
        a = gen.generate_batch(prompts, max_length=24, constraint=constraints, max_batch_size=2, **decoding)
        b = static.generate_batch(prompts, max_length=24, constraint=constraints, max_batch_size=2, **decoding)
        assert [r.sequences_ids for r in a] == [r.sequences_ids for r in b]
        assert [r.constraint_complete for r in a] == [r.constraint_complete for r in b]
    assert gen.scheduler_stats["sessions"] > 0


def test_generate_iterable_and_tokens(gen):
    prompts = [prompt("a"), prompt("b"), prompt("c")]
    out = list(gen.generate_iterable(prompts, max_batch_size=2, max_length=12, include_prompt_in_result=False,
                                     constraint=iter([Choice(["red", "blue"]), None, Regex("[0-9]{2}")])))
    assert generated(out[0]) in ("red", "blue")
    assert out[1].constraint_complete == []
    assert re.fullmatch("[0-9]{2}", generated(out[2]))
    single = list(gen.generate_iterable(prompts, max_batch_size=2, max_length=12, include_prompt_in_result=False,
                                        constraint=Choice(["green"])))
    assert [generated(r) for r in single] == ["green"] * 3
    steps = list(gen.generate_tokens(prompt("z"), max_length=12, constraint=Regex("(ab|cd){2}")))
    assert re.fullmatch("(ab|cd){2}", text_of([s.token_id for s in steps]))


def test_static_prompt(gen):
    results = gen.generate_batch([prompt("a"), prompt("b")], max_length=16, static_prompt=["<bos>", "s", "y", "s"],
                                 include_prompt_in_result=False, constraint=Choice(["happy", "sad"]))
    assert [generated(r) in ("happy", "sad") for r in results] == [True, True]


def test_matchers_are_released(gen):
    before = matchers.open_count()
    gen.generate_batch([prompt()], max_length=6, constraint=Regex("[a-z]+"))
    gen.generate_batch([prompt()], max_length=6, beam_size=2, constraint=Regex("[a-z]+"))
    list(gen.generate_iterable([prompt()] * 3, max_batch_size=2, max_length=6, constraint=Regex("[a-z]+")))
    assert matchers.open_count() == before


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("constraint, message", [
    (Regex("("), "unclosed group"),
    (Regex("é+"), "no token"),  # the vocabulary has no such character
    (JsonSchema({"type": "string", "minLength": 3, "maxLength": 1}), "Unsatisfiable schema"),
    (JsonSchema({"type": "array", "items": {"not": {"type": "string"}}}), 'Unimplemented keys: ["not"]'),
    (JsonSchema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (JsonSchema({"type": "strin"}), "Invalid type"),
    (Grammar("start: foo"), "foo"),
])
def test_bad_constraints_raise_before_work(gen, constraint, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        gen.generate_batch([prompt()], max_length=4, constraint=constraint)
    assert gen.generate_batch([prompt()], max_length=3, constraint=Choice(["ok"]))[0].constraint_complete == [True]


def test_bad_arguments(gen):
    with pytest.raises(ValueError, match="not valid JSON"):
        JsonSchema("{not json")
    with pytest.raises(TypeError):
        JsonSchema(3)
    with pytest.raises(ValueError, match="empty"):
        Choice(["a", ""])
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        gen.generate_batch([prompt()] * 3, constraint=[None, Regex("a")])
    with pytest.raises(TypeError, match="constraint"):
        gen.generate_batch([prompt()], constraint="[a-z]+")
    with pytest.raises(ValueError, match="prompt_lookup_tokens"):
        gen.generate_batch([prompt()], constraint=Regex("a"), prompt_lookup_tokens=2)
    with pytest.raises(ValueError, match="return_alternatives"):
        gen.generate_batch([prompt()], constraint=Regex("a"), return_alternatives=True)
    with pytest.raises(ValueError, match=r"constraint\[1\]"):
        list(gen.generate_iterable([prompt()] * 2, constraint=iter([None, Regex("(")])))


# ---------------------------------------------------------------------------- CLI
def test_cli(char_model, tmp_path, capsys):
    from jaxgen import cli

    assert cli.main(["generate", "--model", char_model, "--max-length", "8", "--no-echo", "--choice", "yes",
                     "--choice", "no", "hi"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    assert cli.main(["generate", "--model", char_model, "--max-length", "3", "--no-echo", "--regex", "[a-z]{9}",
                     "hi"]) == 0
    captured = capsys.readouterr()
    assert re.fullmatch("[a-z]+", captured.out.strip()) and "cut (--max-length)" in captured.err
    lines = [{"prompt": "a", "json_schema": {"enum": ["red", "blue"]}}, {"prompt": "b", "regex": "[0-9]{4}"},
             {"prompt": "c", "choice": ["ok"]}, {"prompt": "d"}, {"prompt": "e", "regex": "[a-z]{40}"},
             {"prompt": "f", "regex": "("}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines[:5]) + "\n")
    assert cli.main(["generate", "--model", char_model, "--input", str(path), "--max-length", "6",
                     "--regex", "[xyz]+"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert json.loads(out[0]["text"]) in ("red", "blue")
    assert re.fullmatch("[0-9]{4}", out[1]["text"])
    assert out[2]["text"] == "ok" and out[2]["complete"] is True
    assert re.fullmatch("[xyz]+", out[3]["text"])  # the command's constraint
    assert out[4]["complete"] is False
    path.write_text(json.dumps(lines[5]) + "\n")
    assert cli.main(["generate", "--model", char_model, "--input", str(path)]) == 1  # the bad line is reported
    assert "unclosed group" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", char_model, "--regex", "a", "--choice", "b", "x"])


# ---------------------------------------------------------------------------- tensor parallelism
TP_SCRIPT = """
import json, sys
import jaxgen
from jaxgen.constraints import Choice, JsonSchema, Regex
sys.path.insert(0, {tests!r})
from test_constraints import SMALL_SCHEMA
prompts = [["<bos>", "a"], ["<bos>", "b", "c"], ["<bos>", "d"]]
constraints = [JsonSchema(SMALL_SCHEMA), None, Regex("[a-z]{{2,5}}")]
out = {{}}
for tp in (False, True):
    g = jaxgen.Generator({model!r}, device_index=[0, 1], tensor_parallel=tp) if tp else jaxgen.Generator({model!r})
    rows = []
    for kw in (dict(), dict(beam_size=2), dict(sampling_topk=8, random_seed=1)):
        rows += [[r.sequences_ids, r.constraint_complete] for r in g.generate_batch(
            prompts, max_length=24, include_prompt_in_result=False, constraint=constraints, **kw)]
    out[str(tp)] = rows
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_tensor_parallel_equals_one_device(tmp_path):
    """Two simulated CPU devices (their own process): constrained rows under tensor parallelism
    decode as on one device (greedy, beam, sampling)."""
    import subprocess
    import sys

    model = build_char_model(str(tmp_path / "model"), heads=4, kv_heads=2)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    code = TP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), model=model)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["True"] == out["False"]


# ---------------------------------------------------------------------------- the default model
@pytest.mark.slow
def test_default_model_outputs_parse_and_validate(default_model_dir):
    from jaxgen.tokenizer import load_tokenizer

    g = jaxgen.Generator(default_model_dir)
    tok = load_tokenizer(default_model_dir)
    text = ("Extract the person as JSON.\nText: Maria Lopez, 34, lives in Porto (zip 40001) and likes red and "
            "blue.\nJSON: ")
    p = tok.encode(text, add_special_tokens=True)
    complete = 0
    for decoding in ([dict()] + [dict(sampling_topk=20, sampling_temperature=0.8, random_seed=s) for s in range(3)]
                     + [dict(beam_size=2, num_hypotheses=2)]):
        r = g.generate_batch([p], max_length=96, include_prompt_in_result=False, constraint=JsonSchema(RECORD_SCHEMA),
                             **decoding)[0]
        for h, ids in enumerate(r.sequences_ids):
            out = tok.decode(ids)
            if r.constraint_complete[h]:
                jsonschema.validate(json.loads(out), RECORD_SCHEMA)
                complete += 1
    assert complete >= 4
    q = tok.encode("Is this review positive or negative? 'I loved it.' Answer:", add_special_tokens=True)
    results = g.generate_batch([q, q], max_length=16, include_prompt_in_result=False,
                               constraint=[Choice([" positive", " negative"]), Regex(r" [0-9]{2}-[0-9]{2}")])
    assert tok.decode(results[0].sequences_ids[0]) in (" positive", " negative")
    assert re.fullmatch(r" [0-9]{2}-[0-9]{2}", tok.decode(results[1].sequences_ids[0]))
