"""The Pallas TPU attention path (attention="pallas", jaxgen.model.attention.pallas_self_attention).

No TPU here: the kernel (JAX's Pallas TPU splash attention) runs in Pallas's interpret mode on the
CPU, which executes the same kernel body through XLA. Checked:
- pallas_self_attention equals the portable `attend` on random inputs: mixed lengths (a full row,
  a short one, a length-1 row), GQA (4 query heads over 2 or 1 key/value heads), head dims 16
  (zero-padded to 128) and 128, several sequence blocks, sliding windows and soft-capping.
- resolve_attention / describe_attention choose and refuse "pallas" as documented.
- Whole models whose first (fresh) pass runs the kernel give attention="flash"'s logits.
Interpret mode is slow: shapes are small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen.model import attention
from jaxgen.model.attention import AttentionSpec, attend, pallas_self_attention, resolve_attention

pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")


def _inputs(t: int, hq: int, hkv: int, hd: int, lengths, seed: int = 0):
    b = len(lengths)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (b, t, hq, hd))
    k = jax.random.normal(keys[1], (b, t, hkv, hd))
    v = jax.random.normal(keys[2], (b, t, hkv, hd))
    lengths = jnp.array(lengths)
    pos = jnp.where(jnp.arange(t)[None] < lengths[:, None], jnp.arange(t)[None], -1)
    return q, k, v, lengths, pos


@pytest.mark.parametrize("t, hkv, hd, window, softcap", [
    (70, 2, 16, None, None),   # one 128 block, head dim padded 16 -> 128
    (70, 2, 16, 5, 3.0),       # sliding window + soft-capping
    (40, 1, 128, None, 3.0),   # MQA, native head dim
    (300, 2, 16, 100, None),   # 384 padded rows in three 128 blocks, window spanning blocks
])
def test_pallas_kernel_matches_portable_attention(t, hkv, hd, window, softcap):
    lengths = [t, 17, 1]
    q, k, v, lengths, pos = _inputs(t, 4, hkv, hd, lengths)
    spec = AttentionSpec(0.3, softcap, window)
    ref = attend(q, k, v, pos, pos, spec)
    got = jax.jit(lambda *a: pallas_self_attention(*a, spec, interpret=True))(q, k, v, lengths)
    assert got.shape == ref.shape
    diff = float(jnp.abs(got - ref).max())
    assert diff < 1e-5, diff
    assert float(jnp.abs(got[2, 1:]).max()) == 0.0  # padding rows are zeros, like attend's


def test_pallas_interpret_flag_is_read_when_interpret_is_none(monkeypatch):
    q, k, v, lengths, pos = _inputs(8, 2, 2, 16, [8, 3])
    spec = AttentionSpec(0.25, None, None)
    monkeypatch.setattr(attention, "_PALLAS_INTERPRET", True)
    got = pallas_self_attention(q, k, v, lengths, spec)
    assert float(jnp.abs(got - attend(q, k, v, pos, pos, spec)).max()) < 1e-5


def test_pallas_choice_and_errors(jaxgen_tiny_model, monkeypatch):
    config = jaxgen.Generator(jaxgen_tiny_model("llama")).config
    assert resolve_attention("auto", "tpu", config, jnp.bfloat16) == "pallas"
    assert resolve_attention("auto", "tpu", config, jnp.float32) == "pallas"
    assert resolve_attention("auto", "tpu", config.replace(attn_logit_softcapping=50.0), jnp.bfloat16) == "pallas"
    assert resolve_attention("auto", "tpu", config, jnp.float16) == "flash"
    assert resolve_attention("auto", "tpu", config.replace(head_dim=512), jnp.bfloat16) == "flash"
    assert resolve_attention("auto", "cpu", config, jnp.float32) == "flash"
    assert resolve_attention("auto", "cuda", config, jnp.float32) == "flash"
    assert resolve_attention("pallas", "tpu", config, jnp.bfloat16) == "pallas"
    with pytest.raises(ValueError, match="attention='pallas' needs a TPU"):
        resolve_attention("pallas", "cpu", config, jnp.float32)
    with pytest.raises(ValueError, match="attention='pallas' needs a TPU"):
        resolve_attention("pallas", "cuda", config, jnp.bfloat16)
    with pytest.raises(ValueError, match="cannot run this model: .*float16"):
        resolve_attention("pallas", "tpu", config, jnp.float16)
    with pytest.raises(ValueError, match="needs a TPU"):
        jaxgen.Generator(jaxgen_tiny_model("llama"), attention="pallas")
    assert attention.describe_attention(config, "tpu", jnp.bfloat16).startswith("pallas (")
    assert "Pallas kernel not used: Pallas TPU attention is used with bfloat16/float32 only" in \
        attention.describe_attention(config, "tpu", jnp.float16)
    assert "Pallas" not in attention.describe_attention(config, "cpu", jnp.float32)
    # The test-only interpret switch lets "pallas" resolve off a TPU ("auto" still never picks it).
    monkeypatch.setattr(attention, "_PALLAS_INTERPRET", True)
    assert resolve_attention("pallas", "cpu", config, jnp.float32) == "pallas"
    assert resolve_attention("auto", "cpu", config, jnp.float32) == "flash"


@pytest.fixture
def pallas_interpret(monkeypatch):
    """Lets Generator(attention="pallas") run on the CPU with the kernel in interpret mode
    (compiled programs are dropped before and after: the switch is read at trace time)."""
    monkeypatch.setattr(attention, "_PALLAS_INTERPRET", True)
    jax.clear_caches()
    yield
    jax.clear_caches()


# gemma2: sliding layers (window 4-6 in the tiny models) and soft-capping, GQA; llama: full attention.
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_whole_model_pallas_matches_flash(arch, jaxgen_tiny_model, pallas_interpret, monkeypatch):
    from jaxgen.model import decoder

    windows = []  # one entry per layer traced through the kernel

    def traced_kernel(q, k, v, lengths, spec, interpret=None):
        windows.append(spec.window)
        return pallas_self_attention(q, k, v, lengths, spec, interpret)

    monkeypatch.setattr(decoder, "pallas_self_attention", traced_kernel)
    path = jaxgen_tiny_model(arch)
    pallas = jaxgen.Generator(path, attention="pallas")
    assert pallas.attention == "pallas"
    flash = jaxgen.Generator(path, attention="flash")
    rng = np.random.default_rng(0)
    batch = [rng.integers(4, 200, size=n).tolist() for n in (19, 7, 1)]
    ref = flash.forward_batch(batch)
    got = pallas.forward_batch(batch)
    diff = max(float(np.abs(np.asarray(got)[i, :n] - np.asarray(ref)[i, :n]).max())
               for i, n in enumerate(map(len, batch)))
    assert diff <= 1e-4, f"{arch}: pallas vs flash max |logit diff| {diff:.3g}"
    assert len(windows) == pallas.config.num_layers
    assert (None in windows) and (arch != "gemma2" or any(w is not None for w in windows))
