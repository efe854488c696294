"""jaxgen.model.experts' grouped product against the plain definition (every expert on every
token, weighted by the routing), at decode and prefill sizes: one token, a batch of 16 whose
experts' shares fill the smaller row buckets, and more tokens than a tile holds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.model import experts as X
from jaxgen.model.config import ModelConfig
from jaxgen.model.decoder import gated_mlp

D, F, E, K = 32, 24, 8, 2


def _layer(seed: int):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.3)

    return {"router": {"weight": w(D, E)}, "expert_gate": {"weight": [w(D, F) for _ in range(E)]},
            "expert_up": {"weight": [w(D, F) for _ in range(E)]}, "expert_down": {"weight": [w(F, D) for _ in range(E)]}}


def _reference(config, x, lp):
    weights, chosen = X.route(config, x, lp)
    out = jnp.zeros_like(x)
    for e in range(E):
        y = gated_mlp(x, X._expert(lp["expert_gate"], e), X._expert(lp["expert_up"], e),
                      X._expert(lp["expert_down"], e), config.activation)
        out = out + y * jnp.sum(jnp.where(chosen == e, weights, 0.0), axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_grouped_product_equals_every_expert_weighted(tokens):
    config = ModelConfig(architecture="test", vocab_size=16, hidden_size=D, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, intermediate_size=F, mlp="experts", num_experts=E, experts_per_token=K,
                         expert_intermediate_size=F)
    lp = _layer(tokens)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((tokens, D), dtype=np.float32))
    got = jax.jit(lambda x: X.experts_mlp(config, x[None], lp)[0])(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(config, x, lp)), atol=2e-5, rtol=1e-5)
    _, chosen = X.route(config, x, lp)
    rows = X.tile_rows(tokens)
    _, tile_expert, tile_count, used, _ = X.tile_plan(chosen, E, rows)
    counts = np.bincount(np.asarray(chosen).ravel(), minlength=E)
    per_expert = np.zeros(E, int)
    np.add.at(per_expert, np.asarray(tile_expert)[:int(used)], np.asarray(tile_count)[:int(used)])
    assert (per_expert == counts).all() and (np.asarray(tile_count)[int(used):] == 0).all()
    if tokens == 16:  # most tiles run on fewer rows than the tile holds
        assert X.row_buckets(rows, E) == (4, 8, 16) and np.median(counts) <= 8
