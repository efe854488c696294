"""benchmarks/: the harness, the engines and every workload on the tiny model (tests/hf_models.py).

Each workload runs as `python benchmarks/run.py NAME --tiny` does (its engines in their own
processes, the report printed, every reply written as JSON), so a broken benchmark fails here
rather than in a later measurement. The checks are on what the engines returned: token counts,
outputs that must agree, compiled programs, memory. Workloads with several jaxgen processes are
`slow` (each process imports JAX and compiles its own programs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from jaxgen.model import native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import harness  # noqa: E402
import models  # noqa: E402
import run as bench  # noqa: E402
import workloads  # noqa: E402

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("bench"))


def run_workload(bench_dir: str, name: str, *args: str) -> dict:
    out = os.path.join(bench_dir, f"{name}.json")
    assert bench.main([name, "--tiny", "--work-dir", bench_dir, "--json", out, *args]) == 0
    with open(out, encoding="utf-8") as f:
        data = json.load(f)
    for run in data["runs"]:
        for key, worker in run["workers"].items():
            assert not worker["error"], (key, worker["error"])
        for r in run["results"]:
            assert r["error"] in (None, "unsupported"), (r["case"], r["engine"], r["error"])
    return data


def replies(data: dict, case_prefix: str, engine: str) -> list:
    return [x for run in data["runs"] for r in run["results"] if r["case"].startswith(case_prefix)
            and r["engine"] == engine for x in ([r["first"]] if r["first"] else []) + r["runs"]]


def num(cell: str) -> float:
    return float(cell.replace(",", ""))


def table(data: dict, first_cell: str) -> list:
    """The cells of the report's table row that starts with `first_cell` (one or more "|"-separated
    cells), after those."""
    row = next(line for line in data["report"] if line.startswith(f"| {first_cell}"))
    return [c.strip() for c in row.strip("|").split("|")][first_cell.count("|") + 1:]


# ============================================================================ pure parts (milliseconds)
def test_cpu_extensions_and_number_format():
    assert harness.cpu_extensions({"avx2", "fma"}) == "AVX2"
    assert harness.cpu_extensions({"avx2", "avx512f", "avx512_vnni"}) == "AVX-512 VNNI"
    assert harness.cpu_extensions({"avx2", "avx512f", "avx512_vnni", "amx_tile"}) == "AVX-512 VNNI, AMX"
    assert harness.cpu_extensions({"asimd", "sve"}) == "NEON SVE"
    name, extensions = harness.cpu_name()
    assert name and extensions
    assert [harness.fmt(x) for x in (1500.4, 35.62, 0.1234, None)] == ["1,500", "35.6", "0.123", "—"]
    assert harness.ratio(3.0, 2.0) == "1.50x" and harness.ratio(None, 2.0) == "—"
    assert harness.markdown_table(["a", "b"], [["x", "1"]]) == ["| a | b |", "| :--- | ---: |", "| x | 1 |"]


def test_parameters_from_the_command_line():
    main = workloads.WORKLOADS["main"]
    params = bench.parse_params(main, ["--batch-sizes", "1,8", "--new-tokens", "64", "--engines", "jaxgen"], False)
    assert params["batch_sizes"] == (1, 8) and params["new_tokens"] == 64 and params["engines"] == "jaxgen"
    assert bench.parse_params(main, [], True)["new_tokens"] == main.tiny["new_tokens"]
    with pytest.raises(SystemExit, match="no parameter --nope"):
        bench.parse_params(main, ["--nope", "1"], False)


def test_compile_plan_is_seeded():
    import types

    p = types.SimpleNamespace(**workloads.WORKLOADS["compiles"].params)

    class FakeTokens:
        bos = "<bos>"

        def random(self, count, length, seed):
            return [[f"t{i}" for i in range(length)]]

    plan = workloads.compile_plan(p, FakeTokens())
    assert [c.args for c in plan] == [c.args for c in workloads.compile_plan(p, FakeTokens())]
    ops = [c.op for c in plan]
    assert (ops.count("generate"), ops.count("score"), ops.count("forward")) == (42, 20, 5)
    assert plan[0].args == plan[1].args and all(c.reps == 0 for c in plan)
    assert {"beam_size", "static_prompt", "sampling_topk"} <= {k for c in plan for k in c.args}


def test_card_limits_from_the_parameter_table(hf_tiny_model, jaxgen_tiny_model):
    from jaxgen.model.config import ModelConfig

    assert workloads.card_limits("NVIDIA H200")[0] == "H200" and workloads.card_limits("NVIDIA H100 NVL") is None
    for arch in ("gemma3_text", "llama"):
        config = ModelConfig.load(jaxgen_tiny_model(arch))
        counts = models.parameter_count(config)
        torch_count = sum(p.numel() for p in hf_tiny_model(arch).model.parameters())
        assert sum(counts.values()) == torch_count, arch
        assert (counts["lm_head"] == 0) == config.tie_word_embeddings
        # a decode step reads at least every non-embedding weight once; a forward pass does 2 FLOPs a weight
        assert workloads.decode_bytes(config, 1, 8, 8, 4) > 4 * counts["body"]
        assert workloads.forward_flops(config, 16, False) > 2 * counts["body"] * 16


# ============================================================================ the harness
def test_harness_alternates_and_times_every_engine(bench_dir):
    paths = models.tiny_model(bench_dir)
    if "ct2-float32" not in paths:
        pytest.skip("CTranslate2 is not installed")
    tok = models.Tokens(paths["jaxgen"], tiny=True)
    specs = [harness.Spec(f"ct2 {q}", "ct2", paths[f"ct2-{q}"], {"compute_type": q}) for q in ("float32", "int8")]
    cases = [harness.Case("decode", "generate", dict(prompts="p", batch=2, new_tokens=5), work=10),
             harness.Case("lookup", "generate", dict(prompts="p", new_tokens=2, prompt_lookup_tokens=4), ["ct2 int8"]),
             harness.Case("once", "score", dict(prompts="p"), reps=0)]
    log = []
    results = harness.run(specs, cases, {"p": [tok.prompt("a b c")]}, 3, os.path.join(bench_dir, "logs"), 2,
                          pause=0, log=log.append)
    order = [line.split()[-3] for line in log if line.strip().startswith("rep ") and "decode" in line]
    assert order == ["float32", "int8", "int8", "float32", "float32", "int8"]  # the first engine rotates
    r = results[("decode", "ct2 int8")]
    assert r.first and len(r.runs) == 3 and all(x["tokens"] == 10 for x in r.runs)
    assert results.rate(cases[0], "ct2 int8") == pytest.approx(10 / sorted(r.seconds)[1])
    assert results[("lookup", "ct2 int8")].error and "lookup" not in [c for c, k in results if k == "ct2 float32"]
    once = results[("once", "ct2 float32")]
    assert once.first["tokens"] == 3 and once.runs == []
    for key in ("ct2 float32", "ct2 int8"):
        assert results.workers[key]["final"]["peak_rss_mib"] > 10


# ============================================================================ every workload, tiny
# The workloads below start several engine processes each (jaxgen compiles in every one): `slow`.
@pytest.mark.slow
def test_main_table(bench_dir):
    data = run_workload(bench_dir, "main")
    keys = ["jaxgen float32", "CTranslate2 float32", "jaxgen int8", "CTranslate2 int8"]
    keys += ["llama.cpp Q4_K_M"] if HAS_LLAMA_CPP else []
    for key in keys:
        for b in (1, 4):
            got = replies(data, f"decode tok/s, batch {b}", key)
            assert got and all(r["tokens"] == b * 8 for r in got), (key, b)  # exactly N new tokens a row
    ratio = 3 if HAS_LLAMA_CPP else 2  # columns: jaxgen, CTranslate2, [llama.cpp], jaxgen / CT2
    for prec in ("float32", "int8"):
        cells = table(data, f"decode tok/s, batch 1 (8 new tokens), {prec}")
        assert num(cells[0]) > 0 and num(cells[1]) > 0 and cells[ratio].endswith("x"), cells
        assert int(table(data, f"programs JAX compiled (load and warm-up), {prec}")[0]) > 0
    if HAS_LLAMA_CPP:  # beside the int8 engines
        assert table(data, "decode tok/s, batch 4 (8 new tokens), float32")[2] == "—"
        assert num(table(data, "decode tok/s, batch 4 (8 new tokens), int8")[2]) > 0
    assert "/" in table(data, "new process to first token")[0]  # jaxgen: cold / warm


def test_int8_numerics(bench_dir):
    data = run_workload(bench_dir, "int8")
    ours = table(data, "jaxgen int8 vs jaxgen float32")
    assert 0 < num(ours[1]) < 0.5 and ours[3].endswith("/ 16")  # mean |Δ log-prob|: int8 moves scores a little
    # Every pair ran. (The engines' float32 scores differ on this tiny checkpoint, max 0.13, while on
    # the default model they agree to 0.000: not asserted here.)
    for pair in ("CTranslate2 int8 vs CTranslate2 float32", "jaxgen int8 vs CTranslate2 int8",
                 "jaxgen float32 vs CTranslate2 float32"):
        assert num(table(data, pair)[0]) >= 0, pair


def test_int8_kernels(bench_dir):
    data = run_workload(bench_dir, "int8_kernels")
    for m in ("1", "16"):
        exact, ours = table(data, f"kv | 640 x 256 | {m} | f32"), table(data, f"kv | 640 x 256 | {m} | u8")
        assert num(ours[0]) > 0  # median ms
        assert float(exact[2]) < 1e-4 and 1e-4 < float(ours[2]) < 0.2  # error against the float64 product
        if native.available():  # the native kernels: the same int8 products as u8; float32 within rounding
            assert table(data, f"kv | 640 x 256 | {m} | c8")[2] == ours[2]
            assert float(table(data, f"kv | 640 x 256 | {m} | c32")[2]) < 1e-4


def test_long_context(bench_dir):
    data = run_workload(bench_dir, "long_context")
    assert any("agrees with scoring its first 16 tokens" in line for line in data["report"])
    assert num(table(data, "`score_batch`, one 48-token sequence")[0]) > 0  # peak RSS, GiB


@pytest.mark.slow
def test_continuous_batching(bench_dir):
    data = run_workload(bench_dir, "continuous")
    for mode in ("greedy", "sampling"):
        cells = table(data, f"{mode} | 4")
        assert cells[-1] == "12/12"  # the scheduler's outputs are static batching's
    assert replies(data, "greedy 4", "scheduler")[-1]["scheduler"]["slot_steps"] > 0


@pytest.mark.slow
def test_prompt_lookup_and_beam(bench_dir):
    data = run_workload(bench_dir, "prompt_lookup")
    assert not any("OUTPUTS DIFFER" in line for line in data["report"])
    assert len([line for line in data["report"] if line.startswith("| copy/edit")]) == 2
    data = run_workload(bench_dir, "beam")
    assert all(r["tokens"] == 4 * 8 for r in replies(data, "greedy", "jaxgen"))


@pytest.mark.slow
def test_constraints(bench_dir):
    """Free and constrained sampling of exactly N tokens per row, and a new constraint's preparation."""
    pytest.importorskip("llguidance")
    data = run_workload(bench_dir, "constraints")
    for mode in ("free", "constrained"):
        assert all(r["tokens"] == 4 * 8 for r in replies(data, f"{mode}, batch 4", "jaxgen")), mode
    cells = table(data, "4 |")  # constrained tok/s, constrained / free, compile seconds
    assert cells[0] != "—" and cells[1].endswith("x")
    assert any(line.startswith("Preparation of a new constraint: first") for line in data["report"])


@pytest.mark.slow
def test_moe_against_dense(bench_dir):
    """Three jaxgen processes (experts, dense with the same active parameters, all experts), each
    decoding exactly N tokens per row."""
    data = run_workload(bench_dir, "moe")
    for stack in ("moe", "dense", "all"):
        assert all(r["tokens"] == 4 * 8 for r in replies(data, "batch 4", stack)), stack
    cells = table(data, "4 |")
    assert cells[-2].endswith("x") and cells[-1].endswith("x")


@pytest.mark.slow
def test_compiles_counts_what_jax_compiled(bench_dir):
    data = run_workload(bench_dir, "compiles", "--persistent-cache", "1")
    again = replies(data, "representative, again", "cache off")
    assert again and again[0]["compiled"] == []  # the same call again compiles nothing
    assert replies(data, "representative, first", "cache off")[0]["compiled"]
    off, warm = table(data, "cache off"), table(data, "warm cache")
    assert int(off[1]) > 0 and int(off[3]) == 0  # jaxgen's programs; no cache hits with the cache off
    assert int(warm[3]) > 0  # the warm process loaded programs the cold one wrote


@pytest.mark.slow
def test_devices(bench_dir):
    data = run_workload(bench_dir, "devices")
    for layout in ("1 device, one device", "2 devices, replicas", "2 devices, tensor parallel"):
        assert num(table(data, layout)[2]) > 0, layout
    assert table(data, "2 devices, replicas")[:2] == ["1", "2"]  # score / generate max_batch_size: B / 2


@pytest.mark.slow
def test_gpu_workload_on_cpu(bench_dir):
    pytest.importorskip("transformers")
    data = run_workload(bench_dir, "gpu", "--engines", "jaxgen,hf-eager")
    for workload in ("decode B=1", "prefill 32", "score 32"):
        cells = table(data, f"gemma3-270m | {workload}")
        assert num(cells[0]) > 0 and num(cells[1]) > 0, workload
    assert replies(data, "stress", "jaxgen")


@pytest.mark.slow
def test_lm_eval_prefix(bench_dir):
    """lm-eval's simple_evaluate on a local few-shot multiple-choice task: jaxgen with and without
    its prefix cache and lm-eval's hf backend, each in its own process, agree on every item."""
    pytest.importorskip("lm_eval")
    data = run_workload(bench_dir, "lm_eval_prefix")
    # cells: items, wall s, CPU s, items per CPU s, vs hf, vs no sharing, acc, max |diff|, same choice,
    # tokens reused, RSS
    shared, plain, hf = (table(data, k) for k in ("jaxgen", "jaxgen-noshare", "hf"))  # the first row matching
    assert shared[0] == plain[0] == hf[0] == "8"  # items
    assert float(shared[7]) <= 1e-4 and shared[8] == "8/8"  # against jaxgen without sharing
    assert float(hf[7]) <= 1e-2 and hf[8] == "8/8"
    assert num(shared[9]) > 0 and plain[9] == "0"  # prefix tokens reused
    assert shared[6] == plain[6] == hf[6]  # acc
