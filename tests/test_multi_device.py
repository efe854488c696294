"""Several devices: replicas and tensor parallelism on simulated CPU devices, and two processes
that generate together with jax.distributed. Each run needs its own process (see multidevice_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# Not in `make test-fast` (subprocess workers with simulated devices); `make test` runs it.
pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_worker.py")


def _run(*args: str, timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _result(proc.stdout)


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def _assert_same(reference: dict, other: dict, what: str = "") -> None:
    assert set(reference) == set(other)
    for name in reference:
        if name == "score":
            for a, b in zip(reference[name], other[name]):
                np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"{what} {name}")
            continue
        for (ids_a, scores_a), (ids_b, scores_b) in zip(reference[name], other[name]):
            assert ids_a == ids_b, f"{what} {name}"
            np.testing.assert_allclose(scores_a, scores_b, atol=1e-4, err_msg=f"{what} {name}")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("multidevice") / "model")
    subprocess.run([sys.executable, WORKER, "build", directory], check=True)
    return directory


def test_replicas_and_tensor_parallel_match_one_device(tiny_model_dir):
    report = _run("compare", tiny_model_dir, "4")
    assert report["num_replicas"] == 4
    _assert_same(report["single"], report["replicas"])
    _assert_same(report["single"], report["tensor_parallel"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_together_like_one(tiny_model_dir):
    single = _run("single", tiny_model_dir)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, WORKER, "host", tiny_model_dir, str(i), "2", port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        report = _result(out)
        assert report["devices"] == 2
        _assert_same(single, report["outputs"])


def test_bad_device_arguments(tiny_model_dir):
    import jaxgen

    with pytest.raises(ValueError, match="unsupported device"):
        jaxgen.Generator(tiny_model_dir, device="quantum")
    with pytest.raises(ValueError, match="device_index 99 does not exist"):
        jaxgen.Generator(tiny_model_dir, device_index=99)
    with pytest.raises(ValueError, match="must not be empty"):
        jaxgen.Generator(tiny_model_dir, device_index=[])
    with pytest.raises(TypeError, match="device_index"):
        jaxgen.Generator(tiny_model_dir, device_index="0")


def test_tensor_parallel_head_count_must_divide(tiny_model_dir):
    report_dir = tiny_model_dir
    code = ("import os; os.environ['XLA_FLAGS']='--xla_force_host_platform_device_count=3'; import jaxgen\n"
            "try:\n"
            f"    jaxgen.Generator({report_dir!r}, device_index=[0, 1, 2], tensor_parallel=True)\n"
            "except ValueError as e:\n"
            "    print('RESULT ' + __import__('json').dumps(str(e)))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    message = _result(proc.stdout)
    assert "num_heads (4) divisible by 3" in message


# ---------------------------------------------------------------------------- tensor parallelism layouts
# Tiny models named "ARCH-kvK" (4 query heads, K key/value heads, MLP width 90) or "ARCH-qQ-kvK"
# (see multidevice_worker.tp_model_config); each is compared on 1, 2 and 4 simulated devices.
ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")


def _assert_tensor_parallel_matches(report: dict, copies: dict) -> None:
    """Every "tpN" entry of each model's report equals its "single" entry; `copies` maps
    (model, N) to the KV-head copies the layout must use."""
    for model, runs in report.items():
        counts = [int(k[2:]) for k in runs if k.startswith("tp") and not k.endswith("copies")]
        assert counts == [2, 4], model
        for n in counts:
            _assert_same(runs["single"], runs[f"tp{n}"], f"{model} on {n} devices")
            if (model, n) in copies:
                assert runs[f"tp{n}_kv_head_copies"] == copies[(model, n)], (model, n)


@pytest.mark.slow
def test_tensor_parallel_scores_every_architecture_and_kv_heads(tmp_path):
    """score_batch of every architecture with 1, 2 and 4 KV heads, sharded over 2 and 4 devices,
    equals one device's (KV heads copied where devices outnumber them, MLP width padded)."""
    names = [f"{arch}-kv{k}" for arch in ARCHITECTURES for k in (1, 2, 4)]
    report = _run("tp_models", str(tmp_path), "4", "score", *names, timeout=900)
    assert sorted(report) == sorted(names)
    _assert_tensor_parallel_matches(report, {("gemma3-kv1", 4): 4, ("gemma3-kv2", 4): 2, ("gemma3-kv4", 4): 1,
                                             ("gemma3-kv1", 2): 2, ("gemma3-kv2", 2): 1})


@pytest.mark.slow
def test_tensor_parallel_generation_matches_one_device(tmp_path):
    """Greedy outputs and scores, with and without a static prompt, and score_batch: one KV head
    copied to every device (gemma3), two KV heads (qwen2: biases, a sliding layer), and 3 KV heads
    for 12 query heads (no device count divides the other: each head copied to 2 or 4 devices)."""
    names = ["gemma3-kv1", "qwen2-kv2", "llama-q12-kv3"]
    report = _run("tp_models", str(tmp_path), "4", "generate", *names, timeout=900)
    _assert_tensor_parallel_matches(report, {("llama-q12-kv3", 2): 2, ("llama-q12-kv3", 4): 4})


@pytest.mark.slow
def test_tensor_parallel_new_blocks_match_one_device(tmp_path):
    """A parallel-residual block (GPT-NeoX) and experts (each expert's width split, a shared
    expert, a dense layer) on 2 and 4 devices: greedy outputs and scores with and without a static
    prompt equal one device's. (ALiBi: test_alibi_loaders.py's converted Falcon-RW; the worker's
    "gptj" and "bloom" configs are there for the same check by hand.)"""
    names = ["gpt_neox-kv4", "moe-kv2"]
    report = _run("tp_models", str(tmp_path), "4", "generate", *names, timeout=900)
    _assert_tensor_parallel_matches(report, {("moe-kv2", 4): 2})


@pytest.mark.slow
def test_tensor_parallel_gemma4_matches_one_device(tmp_path):
    """Gemma 4's choices on 2 and 4 devices: full layers with their own head dim and one KV head
    (copied to every device) beside sliding layers with two, shared-KV layers, per-layer inputs,
    and a gated MLP beside experts with a scaled router: greedy outputs and scores with and
    without a static prompt equal one device's."""
    report = _run("tp_models", str(tmp_path), "4", "generate", "gemma4-kv2", timeout=900)
    _assert_tensor_parallel_matches(report, {("gemma4-kv2", 4): 2, ("gemma4-kv2", 2): 1})


@pytest.mark.slow
def test_tensor_parallel_default_model_on_four_devices(default_model_dir):
    """Gemma 3 270M (4 query heads, 1 KV head, MLP width 2048, vocabulary 262,144) on 4 devices
    gives the single-device greedy outputs and scores, with and without a static prompt."""
    report = _run("tp_default", "4", timeout=900)
    assert report["tp4_kv_head_copies"] == 4
    _assert_same(report["single"], report["tp4"], "default model on 4 devices")


def test_tensor_parallel_layout_errors_and_copies():
    """No layout without query heads that divide; KV-head copies are n / gcd(num_kv_heads, n)."""
    import types

    from jaxgen.model.config import ModelConfig
    from jaxgen.runtime.replicas import tensor_parallel_layout

    config = ModelConfig(architecture="t", vocab_size=8, hidden_size=8, num_layers=1, num_heads=12, num_kv_heads=6,
                         head_dim=4, intermediate_size=8)
    with pytest.raises(ValueError, match=r"num_heads \(12\) divisible by 8"):
        tensor_parallel_layout(config, [None] * 8)
    for n, copies in ((1, 1), (2, 1), (3, 1), (4, 2), (6, 1), (12, 2)):
        laid_out = config.replace(mesh=types.SimpleNamespace(devices=np.zeros(n)))
        assert laid_out.kv_head_copies == copies, n
        assert laid_out.stored_kv_heads % n == 0
    assert "mesh" not in config.to_dict()
