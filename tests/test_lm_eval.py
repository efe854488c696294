"""The lm-evaluation-harness backend (`jaxgen.lm_eval`) against lm-eval's own `hf` backend on the
same tiny checkpoint: a multiple-choice task with few-shot contexts, a generate_until task with
multi-token `until` strings, and a rolling-perplexity task, as local YAML tasks over local JSON
data (nothing is downloaded). Per request: the same log-likelihoods (within 1e-3 per token), the
same is_greedy flags and the same greedy generations. max_length 48 makes lm-eval truncate the
longer contexts from the left and split the rolling texts into several windows.

The checkpoint is a tiny random llama (tests/hf_models.py) with a byte-level BPE tokenizer.json
(trained here), converted with jaxgen, so that both backends read the same tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

CORPUS = [
    "The cat sat on the mat. Q: Where did the cat sit? A: on the mat.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Water boils at one hundred degrees. Ice melts at zero degrees.",
    "A B C D E F G. one two three four five six seven eight nine ten.",
] * 8
MAX_LENGTH = 48


def _write_tokenizer(directory: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as tests/hf_models.py expects
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True, "model_max_length": MAX_LENGTH}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(HF checkpoint dir, jaxgen model dir)."""
    import torch

    import hf_models
    from jaxgen.converters import TransformersConverter

    root = tmp_path_factory.mktemp("lm-eval")
    hf_dir = str(root / "hf")
    cls, cfg = hf_models.ARCHITECTURES["llama"]()
    cfg.max_position_embeddings = 256
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(hf_dir)
    _write_tokenizer(hf_dir)
    return hf_dir, TransformersConverter(hf_dir).convert(str(root / "jaxgen"))


def _write_tasks(directory: str) -> None:
    rows = [("Where is Paris?", ["France", "Germany", "Spain"], 0),
            ("What boils at one hundred degrees?", ["Ice", "Water", "Stone"], 1),
            ("Where did the cat sit?", ["on the dog", "on the mat", "on the hat"], 1),
            ("What comes after two?", ["three", "one", "ten"], 0)]
    shots = [("Where is Berlin?", ["Germany", "France", "Italy"], 0),
             ("What melts at zero degrees?", ["Water", "Ice", "Iron"], 1)]
    mc = [{"question": q, "choices": c, "label": a} for q, c, a in rows]
    fewshot = [{"question": q, "choices": c, "label": a} for q, c, a in shots]
    gen = [{"question": q, "answer": a} for q, a in (("Where did the cat sit?", "on the mat"),
                                                       ("What is the capital of France?", "Paris"),
                                                       ("Count to three.", "one two three"))]
    texts = [{"text": t} for t in CORPUS[:3] + [" ".join(CORPUS[:3])]]
    data = {"mc_test.json": mc, "mc_train.json": fewshot, "gen.json": gen, "text.json": texts}
    for name, records in data.items():
        with open(os.path.join(directory, name), "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    d = directory
    yamls = {
        "tiny_mc.yaml": f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {d}/mc_train.json
    test: {d}/mc_test.json
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
num_fewshot: 2
metric_list:
  - metric: acc
""",
        "tiny_gen.yaml": f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d}/gen.json
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\nQ:", "the m", ". "]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
        "tiny_ppl.yaml": f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d}/text.json
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""",
    }
    for name, text in yamls.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory):
    """Samples of both backends per task: {backend: {task: [sample, ...]}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import jaxgen.lm_eval  # noqa: F401

    hf_dir, jaxgen_dir = checkpoints
    tasks = str(tmp_path_factory.mktemp("tasks"))
    _write_tasks(tasks)
    manager = TaskManager(include_path=tasks, include_defaults=False)
    names = ["tiny_mc", "tiny_gen", "tiny_ppl"]
    out = {}
    for backend, args in (("hf", f"pretrained={hf_dir},dtype=float32,max_length={MAX_LENGTH}"),
                          ("jaxgen", f"model={jaxgen_dir},max_length={MAX_LENGTH},max_batch_size=4")):
        res = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=names, task_manager=manager,
                                      device="cpu", batch_size=1 if backend == "hf" else 4, log_samples=True,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
        out[backend] = {t: sorted(res["samples"][t], key=lambda s: s["doc_id"]) for t in names}
    return out


def _requests(samples):
    return [(s["doc_id"], [tuple(a) for a in s["arguments"]]) for s in samples]


def test_multiple_choice_log_likelihoods_match_hf(results, checkpoints):
    from jaxgen.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoints[1])
    hf, jg = results["hf"]["tiny_mc"], results["jaxgen"]["tiny_mc"]
    assert _requests(hf) == _requests(jg) and len(hf) == 4
    assert any(len(tok.encode_ids(s["arguments"][0][0])) > MAX_LENGTH for s in hf)  # some were truncated
    for a, b in zip(hf, jg):
        for (ctx, cont), (ll_a, greedy_a), (ll_b, greedy_b) in zip(
                a["arguments"], (r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
            n = len(tok.encode_ids(ctx + cont)) - len(tok.encode_ids(ctx)) or 1
            assert abs(ll_a - ll_b) <= 1e-3 * n, (ctx[-30:], cont, ll_a, ll_b)
            assert greedy_a == greedy_b


def test_generate_until_matches_hf(results):
    hf, jg = results["hf"]["tiny_gen"], results["jaxgen"]["tiny_gen"]
    assert _requests(hf) == _requests(jg) and len(hf) == 3
    assert [s["resps"] for s in hf] == [s["resps"] for s in jg]
    assert any(s["resps"][0][0].strip() for s in jg)  # something was generated


def test_rolling_log_likelihoods_match_hf(results, checkpoints):
    from jaxgen.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoints[1])
    hf, jg = results["hf"]["tiny_ppl"], results["jaxgen"]["tiny_ppl"]
    assert _requests(hf) == _requests(jg)
    assert max(len(tok.encode_ids(s["arguments"][0][0])) for s in hf) > 2 * MAX_LENGTH  # several windows
    for a, b in zip(hf, jg):
        n = len(tok.encode_ids(a["arguments"][0][0]))
        assert abs(a["resps"][0][0] - b["resps"][0][0]) <= 1e-3 * n


def test_model_args_are_checked(checkpoints):
    import jaxgen.lm_eval as backend

    with pytest.raises(ValueError, match="mps"):
        backend.JaxgenLM(model=checkpoints[1], device="mps")
    with pytest.raises(ValueError, match="max_length"):
        backend.JaxgenLM(model=checkpoints[1], max_length=1)


@pytest.mark.slow  # ~35 s on 2 cores (lm-eval's own CLI in a subprocess)
def test_jaxgen_eval_runs_lm_evals_cli(checkpoints, tmp_path):
    """`jaxgen eval` is lm-eval's command line with the backend registered."""
    tasks = str(tmp_path / "tasks")
    os.makedirs(tasks)
    _write_tasks(tasks)
    cmd = [sys.executable, "-m", "jaxgen.cli", "eval", "--model", "jaxgen", "--model_args",
           f"model={checkpoints[1]},max_length={MAX_LENGTH}", "--tasks", "tiny_mc", "--include_path", tasks,
           "--limit", "2", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny_mc" in proc.stdout and "acc" in proc.stdout


def test_shared_contexts_score_as_without_sharing(checkpoints, tmp_path):
    """The multiple-choice task's contexts (2 shots and a question, not truncated here) are computed
    once with the prefix cache: the same log-likelihoods and is_greedy flags as without it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxgen.lm_eval import JaxgenLM

    _write_tasks(str(tmp_path))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = {}
    for share in (True, False):
        lm = JaxgenLM(model=checkpoints[1], max_length=200, max_batch_size=6, prefix_cache=share)
        res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager, log_samples=True,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        out[share] = (sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"]), lm.generator.prefix_cache.stats)
    (shared, stats), (plain, plain_stats) = out[True], out[False]
    assert stats["reused_tokens"] > 0 and plain_stats["reused_tokens"] == 0
    for a, b in zip(shared, plain):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
            assert abs(ll_a - ll_b) <= 1e-4 and greedy_a == greedy_b
