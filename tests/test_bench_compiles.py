"""benchmarks/bench_compiles.py: its call plan (fast), and a small run on the tiny model (slow).

The slow test runs the script as a user would, with a handful of calls on the random-weight tiny
copy of the default model, and checks that every compiled program of the engine's jitted functions
was attributed to the call that compiled it (the script wraps those functions by name: an engine
change that renames them shows up here).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Not in `make test-fast` (compiles the benchmark scripts' programs); `make test` runs it.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_compiles.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_compiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**changes):
    args = dict(seed=0, calls=40, score_calls=20, forward_calls=5, max_batch=32, min_prompt=5, max_prompt=600,
                max_lengths=[16, 32, 64, 100, 200], max_score_batch=16, max_score_len=1000, max_forward_len=128,
                max_tokens=1024, max_decode=1600)
    args.update(changes)
    return argparse.Namespace(**args)


def test_plan_is_reproducible_and_capped():
    bench = _load()
    plan = bench.build_plan(_args())
    assert plan == bench.build_plan(_args())
    assert plan != bench.build_plan(_args(seed=1))
    calls = plan["calls"]
    apis = [c["api"] for c in calls]
    assert (apis.count("generate"), apis.count("score"), apis.count("forward")) == (40, 20, 5)
    modes = {c["mode"] for c in calls if c["api"] == "generate"}
    assert modes == {"greedy", "sampling", "beam"}
    assert any(c.get("static") is not None for c in calls)
    for c in calls:
        assert len(c["lengths"]) == c["batch"] <= c["wanted_batch"]
        assert all(n >= 1 for n in c["lengths"])
        if c["batch"] > 1:  # a capped call keeps at least one row
            assert c["batch"] * max(c["lengths"]) <= 1024
            if c["api"] == "generate":
                assert c["batch"] * c["max_length"] * c["beam_size"] <= 1600
    uncapped = bench.build_plan(_args(max_tokens=0, max_decode=0))["calls"]
    assert all(c["batch"] == c["wanted_batch"] for c in uncapped)


def test_dimension_analysis():
    bench = _load()
    sigs = [dict(rows=r, width=w) for r in (1, 2) for w in (16, 32, 64)] + [dict(rows=4, width=16)]
    dims = bench._dimension_analysis(sigs)
    assert dims["_distinct"] == 7 and dims["_product"] == 9
    assert dims["rows"]["values"] == [1, 2, 4] and dims["rows"]["programs_if_constant"] == 3
    assert dims["width"]["programs_if_constant"] == 3
    assert dims["_buildup"] == [("rows", 3), ("width", 7)] or dims["_buildup"] == [("width", 3), ("rows", 7)]


@pytest.mark.slow
def test_bench_compiles_tiny(tmp_path):
    out = tmp_path / "compiles.json"
    cmd = [sys.executable, SCRIPT, "--tiny", "--calls", "3", "--score-calls", "1", "--forward-calls", "1",
           "--max-prompt", "40", "--max-score-len", "40", "--max-forward-len", "16", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| function | calls | distinct calls | programs |" in proc.stdout
    data = json.loads(out.read_text())
    summary = data["main"]["summary"]
    assert summary["calls"] == {"generate": 3, "score": 1, "forward": 1}
    result = data["main"]["result"]
    assert not result["wrapped_missing"]
    functions = summary["functions"]
    for name in ("prefill", "decode", "start_cache", "target_log_probs", "forward_logits"):
        assert functions[name]["programs"] >= 1, name
    for name, f in functions.items():
        # one program per distinct (shapes, static arguments) key, each attributed to its call
        assert f["programs"] == f["distinct_calls"], (name, f)
        assert f["dims"].get("_distinct", f["programs"]) == f["programs"], (name, f)
    assert result["representative"]["second"]["programs"] == 0  # the same call again compiles nothing
    assert summary["cache_hits"] == 0  # the persistent cache is off
