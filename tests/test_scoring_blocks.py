"""score_batch's log-probabilities are computed over vocabulary blocks with a running
log-sum-exp (`jaxgen.decoding.scoring.target_log_prob`): they must equal log_softmax over the
whole vocabulary, for tied and untied heads, biases, final soft-capping and int8 weights, with a
last block that overlaps the one before it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.decoding import scoring
from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import compute_logits


@pytest.mark.parametrize("tied,softcap,int8", [(True, None, False), (False, 30.0, False), (True, None, True)])
def test_blocked_target_log_prob_equals_full_log_softmax(tied, softcap, int8, monkeypatch):
    monkeypatch.setattr(scoring, "VOCAB_BLOCK", 256)  # 1000 columns: 4 blocks, the last overlapping
    monkeypatch.setattr(scoring, "VOCAB_BLOCK_INT8", 256)  # the int8 head's own block size
    v, d = 1000, 32
    config = ModelConfig(architecture="test", vocab_size=v, hidden_size=d, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, intermediate_size=64, tie_word_embeddings=tied, final_logit_softcapping=softcap)
    rng = np.random.default_rng(0)
    if tied:
        w = rng.standard_normal((v, d)).astype(np.float32)
        embed = {"weight": jnp.asarray(w)}
        if int8:
            embed = {"weight": jnp.asarray(np.clip(w * 40, -127, 127).astype(np.int8)),
                     "weight_scale": jnp.asarray(rng.random(v).astype(np.float32) / 40)}
        params = {"embed": embed}
    else:
        params = {"lm_head": {"weight": jnp.asarray(rng.standard_normal((d, v)).astype(np.float32)),
                              "bias": jnp.asarray(rng.standard_normal(v).astype(np.float32))}}
    hidden = jnp.asarray(rng.standard_normal((3, 5, d)).astype(np.float32))
    # The first and last columns, and columns on both sides of the overlapped block's boundary.
    targets = jnp.asarray(np.concatenate([[v - 1, 0, 743, 744, 767, 768], rng.integers(0, v, 9)]).reshape(3, 5))
    got = jax.jit(lambda p, h, t: scoring.target_log_prob(p, config, h, t))(params, hidden, targets)
    full = jax.nn.log_softmax(compute_logits(params, config, hidden), axis=-1)
    ref = jnp.take_along_axis(full, targets[..., None], axis=-1)[..., 0]
    assert float(jnp.abs(got - ref).max()) < 1e-4
