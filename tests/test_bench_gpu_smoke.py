"""Smoke test of benchmarks/bench_gpu.py: its tiny models on the CPU, jaxgen and transformers (eager).

Runs the script as a user would, in a subprocess (it spawns one process per engine), and checks
that its JSON holds a positive tok/s for every requested workload and engine. About 50 s on a
2-core CPU (jaxgen compiles every shape once), hence `slow`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_gpu.py")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
                    reason="the transformers engine needs torch and transformers")
def test_bench_gpu_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--models", "gemma3-270m", "--decode-batches", "1",
           "--prefill-lengths", "64", "--reps", "1", "--engines", "jaxgen,hf-eager", "--out", str(out),
           "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| model | workload | jaxgen tok/s | HF eager | HF static |" in proc.stdout

    data = json.loads(out.read_text())
    got = {(r["engine"], r["workload"]): r for r in data["results"]}
    expected = [(engine, workload) for engine in ("jaxgen", "hf-eager")
                for workload in ("decode B=1", "prefill 64", "score 64")]
    expected.append(("jaxgen", "stress 8x256 +8"))  # the jaxgen-only memory stress line, scaled down
    for key in expected:
        assert key in got, f"no result for {key}: {sorted(got)}"
        r = got[key]
        assert not r.get("error"), f"{key}: {r['error']}"
        assert r["tok_s"] > 0 and r["first_s"] > 0 and r["median_s"] > 0, r
    for engine in ("jaxgen", "hf-eager"):
        decode = got[(engine, "decode B=1")]
        assert decode["generated_min"] == decode["generated_max"] == decode["new_tokens"], decode  # never stopped early
        assert decode["decode_only_tok_s"] > 0, decode
        assert got[(engine, "score 64")]["scored"] == 63
    assert got[("jaxgen", "stress 8x256 +8")]["status"] == "ok"
    assert not any(r["engine"] == "hf-static" for r in data["results"])
