"""The `jaxgen` command line, run in subprocesses on a tiny random model (see conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

SUBCOMMANDS = ("generate", "chat", "score", "convert", "info")
# The installed console script when there is one (what users run), else `python -m jaxgen.cli`.
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "jaxgen")
JAXGEN = [_SCRIPT] if os.path.isfile(_SCRIPT) else [sys.executable, "-m", "jaxgen.cli"]


def run_cli(*args: str, stdin: str = "", env_extra=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([*JAXGEN, *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jaxgen: error: ")


def test_console_script_declared():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("jaxgen") == "jaxgen.cli:main"


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(command):
    proc = run_cli(*([command] if command else []), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: jaxgen" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_no_command_is_a_usage_error():
    proc = run_cli()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_generate_prints_text(cli_tiny_model):
    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "8", "the quick brown fox")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the quick brown fox")
    assert len(proc.stdout.strip()) > len("the quick brown fox")
    assert "Traceback" not in proc.stderr


def test_generate_is_deterministic_and_streams_like_batch(cli_tiny_model):
    """Greedy streaming (generate_tokens) and beam size 1 via the Python API give the same text."""
    from jaxgen import Generator
    from jaxgen.tokenizer import load_tokenizer

    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "8", "--no-echo", "hello world")
    assert proc.returncode == 0, proc.stderr
    tokenizer = load_tokenizer(cli_tiny_model)
    prompt = tokenizer.encode("hello world", add_special_tokens=True)
    assert prompt[0] == "<bos>"
    result = Generator(cli_tiny_model).generate_batch([prompt], max_length=8, include_prompt_in_result=False)[0]
    ids = [i for i in result.sequences_ids[0] if i != tokenizer.convert_tokens_to_ids(["<eos>"])[0]]
    context = tokenizer.convert_tokens_to_ids(prompt[-4:])
    expected = tokenizer.decode(context + ids)[len(tokenizer.decode(context)):]
    assert proc.stdout == expected + "\n"


def test_generate_options(cli_tiny_model):
    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "6", "--sampling-topk", "5",
                   "--sampling-topp", "0.9", "--temperature", "0.8", "--seed", "3", "--system", "be brief",
                   "--compute-type", "float32", "hello")
    assert proc.returncode == 0, proc.stderr
    again = run_cli("generate", "--model", cli_tiny_model, "--max-length", "6", "--sampling-topk", "5",
                    "--sampling-topp", "0.9", "--temperature", "0.8", "--seed", "3", "--system", "be brief",
                    "--compute-type", "float32", "hello")
    assert again.stdout == proc.stdout  # same seed, same text
    beam = run_cli("generate", "--model", cli_tiny_model, "--max-length", "6", "--beam-size", "2", "hello")
    assert beam.returncode == 0, beam.stderr
    assert beam.stdout.startswith("hello")


def test_generate_prompt_from_stdin(cli_tiny_model):
    """`echo TEXT | jaxgen generate -` continues TEXT, not TEXT + newline: same output as the argument."""
    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "4", "-", stdin="jax runs\n")
    assert proc.returncode == 0, proc.stderr
    direct = run_cli("generate", "--model", cli_tiny_model, "--max-length", "4", "jax runs")
    assert direct.returncode == 0, direct.stderr
    assert proc.stdout == direct.stdout
    assert proc.stdout.startswith("jax runs")


@pytest.mark.parametrize("given, prompt", [
    ("jax runs\n", "jax runs"), ("jax runs\r\n", "jax runs"), ("jax runs", "jax runs"),
    ("jax runs\n\n", "jax runs\n"),  # only one newline goes
    ("line one\nline two\n", "line one\nline two"),
])
def test_stdin_prompt_loses_one_trailing_newline(monkeypatch, given, prompt):
    import io

    from jaxgen import cli

    monkeypatch.setattr(sys, "stdin", io.StringIO(given))
    assert cli._read_text_arg("-") == prompt
    assert cli._read_text_arg(given) == given  # a PROMPT argument is taken as is


PROMPTS = ["the quick brown fox", "hello world", "jax runs on cpu"]


def _single_prompt_texts(model: str, prompts, max_length: int = 6):
    """What `jaxgen generate --no-echo PROMPT` prints for each prompt (greedy), without the newline."""
    texts = []
    for prompt in prompts:
        proc = run_cli("generate", "--model", model, "--max-length", str(max_length), "--no-echo", prompt)
        assert proc.returncode == 0, proc.stderr
        texts.append(proc.stdout[:-1])
    return texts


def _json_lines(text: str):
    import json

    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow  # ~1 min on 2 cores (several CLI processes)
def test_generate_input_txt_and_jsonl_match_single_prompts(cli_tiny_model, tmp_path):
    import json

    expected = _single_prompt_texts(cli_tiny_model, PROMPTS)
    txt = tmp_path / "prompts.txt"
    txt.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n{PROMPTS[2]}\n", encoding="utf-8")  # the blank line is skipped
    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "6", "--batch-size", "2",
                   "--input", str(txt))
    assert proc.returncode == 0, proc.stderr
    assert "prompts/s" not in proc.stderr  # no progress bar when stderr is not a terminal
    records = _json_lines(proc.stdout)
    assert [r["line"] for r in records] == [1, 3, 4]
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["text"] for r in records] == expected
    assert all(0 < r["tokens"] <= 6 and "id" not in r for r in records)

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)),
                     encoding="utf-8")
    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "6", "--input", "-",
                   "--input-format", "jsonl", "--output", "-", stdin=jsonl.read_text(encoding="utf-8"))
    assert proc.returncode == 0, proc.stderr
    records = _json_lines(proc.stdout)
    assert [(r["line"], r["id"], r["prompt"], r["text"]) for r in records] == \
        [(i + 1, f"p{i}", p, t) for i, (p, t) in enumerate(zip(PROMPTS, expected))]


def test_generate_input_bad_jsonl_lines(cli_tiny_model, tmp_path):
    """Bad lines are reported with their line numbers, the others complete (per-line max_length
    kept, input order kept); exit status 1; results go to --output; --progress forces the bar."""
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "the quick brown fox", "id": 7}\n'
                     '{not json\n'
                     '{"prompt": "hello world", "max_length": 2}\n'
                     '{"id": "no prompt"}\n'
                     '{"prompt": "   "}\n'
                     '["a list"]\n'
                     '{"prompt": "jax runs on cpu", "max_length": 0}\n'
                     '{"prompt": "jax runs on cpu"}\n', encoding="utf-8")
    out = tmp_path / "results.jsonl"
    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "5", "--input", str(jsonl),
                   "--output", str(out), "--progress")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    for line in (2, 4, 5, 6, 7):
        assert f"{jsonl}:{line}: " in proc.stderr
    assert "not valid JSON" in proc.stderr and 'no "prompt" string' in proc.stderr
    assert '"prompt" is empty' in proc.stderr and '"max_length" must be a positive integer' in proc.stderr
    assert "prompts/s" in proc.stderr and "tokens/s" in proc.stderr
    assert re.search(r"slots \d+%", proc.stderr)  # the scheduler's slot utilisation
    records = _json_lines(out.read_text(encoding="utf-8"))
    assert [r["line"] for r in records] == [1, 3, 8]
    assert records[0]["id"] == 7
    assert records[1]["tokens"] <= 2 and records[2]["tokens"] <= 5


@pytest.mark.parametrize("args", [
    ("generate", "--model", "{model}"),                                       # neither PROMPT nor --input
    ("generate", "--model", "{model}", "--input", "{file}", "hello"),         # both
    ("generate", "--model", "{model}", "--output", "{out}", "hello"),         # --output without --input
    ("generate", "--model", "{model}", "--input", "{missing}"),
    ("generate", "--model", "{model}", "--input", "{empty}"),
    ("generate", "--model", "{model}", "--end-token", "<no such token>", "hello"),
])
def test_generate_input_usage_errors(cli_tiny_model, tmp_path, args):
    (tmp_path / "p.txt").write_text("hello\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    values = dict(model=cli_tiny_model, file=str(tmp_path / "p.txt"), out=str(tmp_path / "o.jsonl"),
                  missing=str(tmp_path / "missing.txt"), empty=str(tmp_path / "empty.txt"))
    assert_one_line_error(run_cli(*[a.format(**values) for a in args]))


def test_end_token_escapes():
    import argparse

    from jaxgen.cli import _end_token_args

    args = argparse.Namespace(end_token=["\\n", ".", "\\t\\\\", "a\\x"])
    assert _end_token_args(args) == ["\n", ".", "\t\\", "a\\x"]
    assert _end_token_args(argparse.Namespace(end_token=None)) == []


def test_split_by_key_reads_lazily_in_order():
    from jaxgen.cli import _SplitByKey

    read = []
    source = ((k, f"{k}{i}") for i, k in enumerate("abab") if not read.append(i))
    split = _SplitByKey(source)
    b = split.items("b")
    assert next(b) == "b1" and read == [0, 1]  # "a0" was read and waits in its buffer
    assert list(split.items("a")) == ["a0", "a2"]
    assert list(b) == ["b3"]
    assert [item for _, item in split.pending] == ["a0", "b1", "a2", "b3"]


def test_generate_end_token(cli_tiny_model):
    """--end-token stops the single-prompt path and --input alike (here at the first generated token)."""
    from jaxgen import Generator
    from jaxgen.tokenizer import load_tokenizer

    prompt = load_tokenizer(cli_tiny_model).encode("hello world", add_special_tokens=True)
    result = Generator(cli_tiny_model).generate_batch([prompt], max_length=4, include_prompt_in_result=False)[0]
    token = result.sequences[0][0]
    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "4", "--no-echo", "--end-token", token,
                   "hello world")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "\n"
    batch = run_cli("generate", "--model", cli_tiny_model, "--max-length", "4", "--end-token", token,
                    "--input", "-", stdin="hello world\n")
    assert batch.returncode == 0, batch.stderr
    assert _json_lines(batch.stdout) == [{"line": 1, "prompt": "hello world", "text": "", "tokens": 0}]


def test_chat_reads_until_exit(cli_tiny_model):
    proc = run_cli("chat", "--model", cli_tiny_model, "--max-length", "5", "--system", "be brief",
                   stdin="hello\n\nhow are you\n/exit\nnot read\n")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2  # one reply per message
    assert "Traceback" not in proc.stderr


def test_chat_stops_at_eof(cli_tiny_model):
    proc = run_cli("chat", "--model", cli_tiny_model, "--max-length", "3", stdin="hello")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1


def test_score_prints_perplexity(cli_tiny_model, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox\n\nhello world, this is a tiny corpus\njax\n", encoding="utf-8")
    proc = run_cli("score", "--model", cli_tiny_model, str(path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "line\ttokens\tlog_likelihood\tperplexity"
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert set(rows) == {"1", "3", "4", "total"}  # the empty line 2 is skipped
    total = rows["total"]
    assert int(total[1]) == sum(int(rows[k][1]) for k in ("1", "3", "4"))
    assert float(total[3]) > 1.0
    assert "perplexity:" in proc.stderr


def test_score_matches_score_batch(cli_tiny_model, tmp_path):
    import math

    from jaxgen import Generator
    from jaxgen.tokenizer import load_tokenizer

    path = tmp_path / "one.txt"
    path.write_text("hello world\n", encoding="utf-8")
    proc = run_cli("score", "--model", cli_tiny_model, "--no-progress", str(path))
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.strip().splitlines()[1].split("\t")
    tokens = load_tokenizer(cli_tiny_model).encode("hello world", add_special_tokens=True)
    log_probs = Generator(cli_tiny_model).score_batch([tokens])[0].log_probs
    assert int(row[1]) == len(log_probs) == len(tokens) - 1
    assert math.isclose(float(row[2]), sum(log_probs), abs_tol=1e-3)


def test_info_prints_architecture(cli_tiny_model):
    proc = run_cli("info", cli_tiny_model)
    assert proc.returncode == 0, proc.stderr
    assert "architecture:" in proc.stdout and "gemma3" in proc.stdout
    assert "vocabulary size: 100" in proc.stdout
    assert "parameters:" in proc.stdout and "size on disk:" in proc.stdout
    assert "bos='<bos>'" in proc.stdout and "chat template:   yes" in proc.stdout
    # 1 full layer x K and V x 1 kv head x head_dim 16 x 4 bytes; 1 sliding layer with a ring of 8 slots
    assert "KV cache:        128 B per token in float32 (weight dtype and compute type); 1 full-attention layer" \
        in proc.stdout
    assert "sliding cache:   1.0 KiB per sequence in float32" in proc.stdout and "ring of 8 slots" in proc.stdout
    assert "attention:       flash (portable: one einsum for small inputs and decode" in proc.stdout


def test_info_compute_type(cli_tiny_model):
    proc = run_cli("info", cli_tiny_model, "--compute-type", "bfloat16", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "compute type:    bfloat16 on cpu" in proc.stdout
    assert "64 B per token in bfloat16 (compute type), 128 B in float32 (weight dtype)" in proc.stdout


@pytest.mark.parametrize("args", [
    ("generate", "--model", "{missing}", "hello"),
    ("chat", "--model", "{missing}"),
    ("score", "--model", "{missing}", "{file}"),
    ("info", "{missing}"),
    ("info", "{not_a_model}"),
])
def test_unknown_model_dir(args, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    values = dict(missing=str(tmp_path / "no-such-model"), file=str(text), not_a_model=str(tmp_path))
    proc = run_cli(*[a.format(**values) for a in args])
    assert_one_line_error(proc)


def test_broken_model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path), "hello"))
    assert_one_line_error(run_cli("info", str(tmp_path)))


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(cli_tiny_model, prompt):
    assert_one_line_error(run_cli("generate", "--model", cli_tiny_model, prompt))


def test_unreadable_file(cli_tiny_model, tmp_path):
    assert_one_line_error(run_cli("score", "--model", cli_tiny_model, str(tmp_path / "missing.txt")))
    assert_one_line_error(run_cli("score", "--model", cli_tiny_model, str(tmp_path)))  # a directory
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_error(run_cli("score", "--model", cli_tiny_model, str(binary)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(run_cli("score", "--model", cli_tiny_model, str(empty)))


def test_bad_option_values(cli_tiny_model):
    for args in (("--compute-type", "float64"), ("--device", "abacus"), ("--sampling-topp", "2")):
        proc = run_cli("generate", "--model", cli_tiny_model, *args, "hello")
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, args
    proc = run_cli("generate", "--model", cli_tiny_model, "--max-length", "0", "hello")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_convert_errors_are_one_line(tmp_path):
    proc = run_cli("convert", "--from", "gguf", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_generate_default_model(default_model_home):
    proc = run_cli("generate", "--max-length", "12", "The capital of France is", timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is")
    assert len(proc.stdout.split()) > len("The capital of France is".split())
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_info_default_model(default_model_dir):
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "gemma3" in proc.stdout and "262,144" in proc.stdout


def test_start_up_imports(cli_tiny_model):
    """`import jaxgen` and building the parser import no JAX; a whole `generate` imports none of
    the reference libraries (torch, transformers, CTranslate2), which `make demo` does not install."""
    script = (
        "import sys, jaxgen, jaxgen.cli\n"
        "jaxgen.cli.build_parser()\n"
        "assert 'jax' not in sys.modules, 'jax imported early'\n"
        f"assert jaxgen.cli.main(['generate', '--model', {cli_tiny_model!r}, '--max-length', '3', 'hello']) == 0\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'ctranslate2', 'flax'})\n"
        "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
