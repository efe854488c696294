"""The measured choice of CPU product formulations (`jaxgen.model.cpu_kernels`, issue 18).

With fake timings (no clock involved):
* the chooser picks the fastest candidate per row class and layout, and the layout by the decode
  row classes; an int8 weight falls back to float32 (dequantized at load) when every int8
  candidate is slower, and `compute_type="auto"` then resolves to float32 on CPU;
* the on-disk cache is keyed by the machine: the same CPU reads its timings back without timing
  again, another CPU (or jax version, or XLA_FLAGS) times again;
* a Generator whose weights are arranged by the chooser ([N, K] layouts, every exact int8
  formulation, the float32 fallback, weight-only int8) scores as the unarranged model up to float
  rounding (a few ulp for the exact int8 kinds, whose int32 products are identical).
And the real timer returns a positive time for every candidate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxgen.model import cpu_kernels
from jaxgen.model.config import ModelConfig
from jaxgen.model.cpu_kernels import KernelChooser, arrange_for_cpu, int8_pays, measure
from jaxgen.model.loading import resolve_compute_type

FP = {"cpu": "Fake CPU", "id": "family 25 model 1", "machine": "x86_64", "isa": ["avx2", "fma"], "cores": 2,
      "jax": "0", "jaxlib": "0", "xla_flags": ""}


class FakeTimer:
    """Seconds per candidate from `table(kind, layout, m, k, n)`; counts the calls."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, candidates, m, k, n):
        self.calls.append((tuple(candidates), m, k, n))
        return {c: self.table(*c.split("/"), m, k, n) for c in candidates}


def _chooser(table, path=None, fingerprint=FP, native=False):
    return KernelChooser(path, FakeTimer(table), dict(fingerprint), native=native)


def test_picks_fastest_per_row_class_and_layout():
    def table(kind, layout, m, k, n):
        base = {"a8": 2.0, "u8": 3.0, "a8t": 2.5, "w8": 4.0, "f32": 5.0}[kind]
        if m == 1 and kind == "a8t":
            base = 1.0  # a8t wins at one row, in [N, K] only
        if m == 512 and kind == "u8":
            base = 0.5
        return base * (0.8 if layout == "nk" else 1.0)

    ch = _chooser(table)
    assert ch.int8_kind(1, 640, 1024, "nk") == "a8t"
    assert ch.int8_kind(1, 640, 1024, "kn") == "a8"  # a8t is no candidate in [K, N]
    assert ch.int8_kind(16, 640, 1024, "nk") == "a8"
    assert ch.int8_kind(48, 640, 1024, "nk") == "a8"  # the same row class as 16
    assert ch.int8_kind(512, 640, 1024, "kn") == "u8"
    assert ch.stored_layout(640, 1024, int8=True) == ("nk", False)
    assert ch.stored_layout(640, 1024, int8=False) == ("nk", False)
    assert ch.stored_layout(640, 1024, int8=True, layouts=("kn",)) == ("kn", False)
    # small weights are never timed: stored layout, a8
    assert ch.int8_kind(16, 8, 8, "nk") == "a8" and ch.stored_layout(8, 8, True) == ("kn", False)
    assert all(k * n >= cpu_kernels.MIN_ELEMENTS for _, _, k, n in ch.timer.calls)


def test_int8_slower_than_float32_falls_back():
    def table(kind, layout, m, k, n):  # "int8 is slow on this CPU"; float32 best in [N, K]
        return {"f32": 1.0 if layout == "nk" else 1.5}.get(kind, 3.0)

    ch = _chooser(table)
    assert ch.stored_layout(640, 1024, int8=True) == ("nk", True)
    config = ModelConfig(architecture="test", vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=1, head_dim=64, intermediate_size=512, tie_word_embeddings=True)
    assert not int8_pays(config, ch)
    cpu_kernels.set_default_chooser(ch)
    try:
        assert resolve_compute_type("auto", "float32", "cpu", config).name == "float32"
        assert resolve_compute_type("auto", "float32", "cuda", config).name == "int8_bfloat16"
    finally:
        cpu_kernels.set_default_chooser(None)
    # int8 a little faster at 1 row but slower at 16: still not worth it
    mixed = _chooser(lambda kind, layout, m, k, n: (1.0 if m == 1 else 4.0) if kind != "f32" else 2.0)
    assert not int8_pays(config, mixed)
    fast = _chooser(lambda kind, layout, m, k, n: 1.0 if kind == "a8" else 2.0)
    assert int8_pays(config, fast)
    cpu_kernels.set_default_chooser(fast)
    try:
        assert resolve_compute_type("auto", "float32", "cpu", config).name == "int8_float32"
    finally:
        cpu_kernels.set_default_chooser(None)


def test_cache_is_keyed_by_machine(tmp_path):
    path = str(tmp_path / "cpu_kernels.json")

    def table(kind, layout, m, k, n):
        return {"a8": 1.0, "f32": 2.0}.get(kind, 3.0)

    first = _chooser(table, path)
    assert first.stored_layout(640, 1024, int8=True) == ("kn", False)
    assert first.timer.calls
    saved = json.load(open(path))
    assert list(saved["machines"]) == [first.key] and saved["machines"][first.key]["machine"] == FP

    again = _chooser(lambda *a: pytest.fail("the same machine must not time again"), path)
    assert again.stored_layout(640, 1024, int8=True) == ("kn", False)

    for change in ({"cpu": "Other CPU"}, {"id": "family 25 model 17"}, {"isa": ["avx2", "avx512f", "avx512_vnni"]},
                   {"cores": 64}, {"jaxlib": "1"}, {"xla_flags": "--xla_cpu_max_isa=AVX2"}):
        other = _chooser(lambda kind, layout, m, k, n: {"u8": 1.0, "f32": 2.0}.get(kind, 3.0), path,
                         dict(FP, **change))
        assert other.key != first.key
        assert other.int8_kind(16, 640, 1024, "kn") == "u8"  # its own timings
        assert other.timer.calls
    assert len(json.load(open(path))["machines"]) == 7
    assert _chooser(table, path).int8_kind(16, 640, 1024, "kn") == "a8"  # the first machine's are kept


def test_real_fingerprint_names_this_cpu():
    fp = cpu_kernels.machine_fingerprint()
    assert fp["cpu"] and fp["cores"] >= 1 and fp["jax"]
    assert cpu_kernels.machine_key(fp) == cpu_kernels.machine_key(dict(fp))
    assert cpu_kernels.machine_key(dict(fp, xla_flags="--xla_cpu_max_isa=SSE4_2")) != cpu_kernels.machine_key(fp)


def test_measure_times_every_candidate():
    from jaxgen.model import native

    cands = ["f32/kn", "a8/nk", "u8/kn", "a8t/nk", "w8/kn"] + (["c8/nk", "c32/nk"] if native.available() else [])
    got = measure(cands, 2, 64, 128, budget_s=0.0)
    assert set(got) == set(cands)
    assert all(0 < t < 1 for t in got.values())


def test_native_float32_kernel_is_chosen_per_row_class():
    def table(kind, layout, m, k, n):  # the native float32 kernel wins at 16 rows only
        return {"c32": 1.0 if m == 16 else 3.0, "f32": 2.0}.get(kind, 5.0)

    ch = _chooser(table, native=True)
    assert ch.float_kind(16, 640, 1024, "nk") == "c32" and ch.float_kind(1, 640, 1024, "nk") == "f32"
    assert ch.float_kind(16, 640, 1024, "kn") == "f32"  # [N, K] only
    assert _chooser(table).float_kind(16, 640, 1024, "nk") == "f32"  # no native kernel here
    assert ch.stored_layout(640, 1024, int8=False) == ("nk", False)  # c32 at 16 + f32 at 1 beats [K, N]


def _score(model_dir, compute_type, chooser):
    """score_batch log-probs of two sequences, with the params as `chooser` arranges them: (log-probs,
    layer 0's params, the embedding's params)."""
    from jaxgen import Generator

    cpu_kernels.set_default_chooser(chooser)
    try:
        gen = Generator(model_dir, compute_type=compute_type)
        vocab = gen._vocab.tokens
        batch = [["<bos>"] + vocab[5:30], ["<bos>"] + vocab[40:52]]
        params = gen._pool.replicas[0].params
        return [r.log_probs for r in gen.score_batch(batch)], params["layers"][0], params["embed"]
    finally:
        cpu_kernels.set_default_chooser(None)


@pytest.mark.parametrize("kind", ["a8", "u8", "a8t"])
def test_arranged_int8_model_scores_identically(cli_tiny_model, monkeypatch, kind):
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 0)  # time (fake) even the tiny model's weights
    plain, layer, _ = _score(cli_tiny_model, "int8", _chooser(
        lambda k_, layout, m, k, n: 1.0 if (k_, layout) == ("a8", "kn") else 2.0))
    assert "weight" in layer["q"] and "weight_nk" not in layer["q"]
    got, layer, embed = _score(cli_tiny_model, "int8", _chooser(
        lambda k_, layout, m, k, n: 1.0 if (k_, layout) == (kind, "nk") else 2.0))
    assert "weight_nk" in layer["q"] and "weight" not in layer["q"]
    assert str(layer["q"]["weight_nk"].dtype) == "int8" and str(embed["weight"].dtype) == "int8"
    # the int32 products are identical (test_int8_compute: int8_dot of every kind); the float
    # rescaling around them may be fused differently by XLA: a few ulp
    for a, b in zip(plain, got):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_fallback_and_layouts_within_float_rounding(cli_tiny_model, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 0)
    ref, _, _ = _score(cli_tiny_model, "float32", _chooser(
        lambda kind, layout, m, k, n: 1.0 if layout == "kn" else 2.0))
    f32_nk, layer, _ = _score(cli_tiny_model, "float32", _chooser(
        lambda kind, layout, m, k, n: 1.0 if layout == "nk" else 2.0))
    assert "weight_nk" in layer["up"] and str(layer["up"]["weight_nk"].dtype) == "float32"
    for a, b in zip(ref, f32_nk):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # int8 slower than float32 everywhere: every int8 weight is dequantized at load, the model then
    # runs the float32 products of the dequantized weights (weight-only int8 accuracy)
    deq, layer, embed = _score(cli_tiny_model, "int8", _chooser(
        lambda kind, layout, m, k, n: 1.0 if kind == "f32" else 2.0))
    assert str(layer["down"]["weight"].dtype) == "float32" and "weight_scale" not in layer["down"]
    assert str(embed["weight"].dtype) == "float32"
    w8, _, _ = _score(cli_tiny_model, "int8", _chooser(
        lambda kind, layout, m, k, n: 1.0 if kind == "w8" else 2.0))
    for a, b, c in zip(ref, deq, w8):
        np.testing.assert_allclose(b, c, rtol=1e-4, atol=1e-4)  # the same dequantized products
        assert np.abs(np.asarray(b) - np.asarray(a)).max() < 0.1  # int8 weights vs float32 ones


def test_arrange_is_idempotent_and_keeps_small_weights(cli_tiny_model):
    from jaxgen.model.loading import load_params

    config, params, _, _ = load_params(cli_tiny_model, "int8")
    ch = _chooser(lambda *a: pytest.fail("tiny weights are not timed"))
    assert int8_pays(config, ch)  # nothing timed: auto keeps int8 on CPU
    out = arrange_for_cpu(params, config, ch)
    assert out["layers"][0]["q"].keys() == params["layers"][0]["q"].keys()
    assert arrange_for_cpu(out, config, ch)["layers"][1]["down"]["weight"] is out["layers"][1]["down"]["weight"]


def test_slow_candidates_are_pruned_and_info_describes_the_choice():
    def table(kind, layout, m, k, n):
        return {"u8": 10.0, "f32": 2.0}.get(kind, 1.0 if layout == "nk" else 1.5)

    ch = _chooser(table)
    config = ModelConfig(architecture="test", vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=1, head_dim=64, intermediate_size=512, tie_word_embeddings=True)
    assert "not measured yet" in cpu_kernels.describe(config, True, ch)
    assert not ch.timer.calls  # describing measures nothing
    assert int8_pays(config, ch)
    assert ch.int8_kind(1, 256, 512, "nk") in ("a8", "a8t", "w8")
    timed_at_1 = [c for cands, m, k, n in ch.timer.calls if m == 1 for c in cands]
    assert timed_at_1 and not any(c.startswith("u8") for c in timed_at_1)  # 10x behind at 16 rows
    line = cpu_kernels.describe(config, True, ch)
    assert line.startswith("Fake CPU family 25 model 1 (avx2; 2 cores): int8 at 1 / 16 rows: ")
    assert "256x512 a8/a8 nk" in line
    assert "256x4096 a8/a8 nk" in line  # the tied head
    f32 = _chooser(lambda kind, *a: 1.0)
    for k, n, _, layouts in cpu_kernels.model_shapes(config):
        assert f32.stored_layout(k, n, False, layouts) == (layouts[0], False)
    assert "256x512 f32/f32 kn" in cpu_kernels.describe(config, False, f32)
