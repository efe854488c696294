"""`jaxgen.functional`: the public pure functions (load_model, forward, embed, log_probs).

Tiny random models of generation_fixtures.py (llama: full attention; gemma3: sliding windows,
qk-norm, embedding scale), float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generation_fixtures import ModelPair, gen_pair  # noqa: F401 (gen_pair is a fixture)

from jaxgen import functional as F


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def pair(request, gen_pair) -> ModelPair:
    return gen_pair(request.param)


@pytest.fixture(scope="module")
def model(pair) -> F.Model:
    return F.load_model(pair.jaxgen_dir, device="cpu")


def batch(pair: ModelPair, lengths=(13, 7, 20)):
    """Right-padded ids [B, T] (padding is a real token id, not 0, so masking is tested) and lengths."""
    seqs = [[pair.jaxgen.vocabulary.id_of(t) for t in pair.prompt(500 + i, n)] for i, n in enumerate(lengths)]
    width = max(lengths)
    tokens = np.full((len(seqs), width), 9, np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    return seqs, jnp.asarray(tokens), jnp.asarray(np.array(lengths, np.int32))


def test_config_is_hashable_and_static(model):
    assert {model.config: 1}[model.config] == 1
    assert model.config == F.Config(model.config.model, model.config.dtype, model.config.attention,
                                    model.config.chunk)
    assert model.config.vocab_size == model.config.model.vocab_size
    leaves = jax.tree_util.tree_leaves(model.params)
    assert leaves and all(isinstance(a, jax.Array) for a in leaves)


def test_log_probs_equal_score_batch(pair, model):
    seqs, tokens, lengths = batch(pair)
    lp = np.asarray(F.log_probs(model.params, model.config, tokens, lengths))
    assert lp.shape == (3, tokens.shape[1] - 1) and lp.dtype == np.float32
    for i, result in enumerate(pair.jaxgen.score_batch(seqs)):
        n = len(seqs[i]) - 1
        np.testing.assert_allclose(lp[i, :n], result.log_probs, atol=1e-4, rtol=0)
        assert np.all(lp[i, n:] == 0)


def test_forward_matches_forward_batch_and_embeddings(pair, model):
    seqs, tokens, lengths = batch(pair)
    logits = F.forward(model.params, model.config, tokens, lengths)
    assert logits.shape == (3, tokens.shape[1], model.config.vocab_size) and logits.dtype == jnp.float32
    reference = pair.jaxgen.forward_batch(seqs)
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(np.asarray(logits[i, :len(s)]), np.asarray(reference[i, :len(s)]),
                                   atol=1e-4, rtol=1e-5)
    emb = F.embed(model.params, model.config, tokens)
    assert emb.shape == tokens.shape + (model.config.hidden_size,)
    via_embeddings = F.forward(model.params, model.config, None, lengths, embeddings=emb)
    np.testing.assert_allclose(np.asarray(via_embeddings), np.asarray(logits), atol=1e-5, rtol=1e-5)


def test_jit_with_static_config(pair, model):
    _, tokens, lengths = batch(pair)
    jitted = jax.jit(F.log_probs, static_argnums=1)
    np.testing.assert_allclose(np.asarray(jitted(model.params, model.config, tokens, lengths)),
                               np.asarray(F.log_probs(model.params, model.config, tokens, lengths)), atol=1e-5)
    fwd = jax.jit(F.forward, static_argnums=1)
    assert fwd(model.params, model.config, tokens, lengths).shape[:2] == tokens.shape


def test_grad_params_matches_finite_difference(pair, model):
    _, tokens, lengths = batch(pair, lengths=(9, 6))

    def loss(params):
        return jnp.sum(F.log_probs(params, model.config, tokens, lengths))

    params = model.params
    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves)))
    assert norm > 0
    direction = jax.tree_util.tree_map(lambda g: g / norm, grads)
    eps = 1e-3
    shifted = lambda sign: jax.tree_util.tree_map(lambda p, d: p + sign * eps * d, params, direction)  # noqa: E731
    jloss = jax.jit(loss)
    numeric = (float(jloss(shifted(1))) - float(jloss(shifted(-1)))) / (2 * eps)
    # The directional derivative along g / |g| is |g|.
    assert numeric == pytest.approx(norm, rel=2e-2)


def test_grad_embeddings_finite_and_nonzero(pair, model):
    _, tokens, lengths = batch(pair, lengths=(9, 6))
    emb = F.embed(model.params, model.config, tokens)

    def loss(e):
        logits = F.forward(model.params, model.config, None, lengths, embeddings=e)
        lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
        mask = jnp.arange(tokens.shape[1] - 1)[None, :] < (lengths - 1)[:, None]
        return jnp.sum(jnp.where(mask, picked, 0.0))

    g = jax.grad(loss)(emb)
    assert g.shape == emb.shape
    assert bool(jnp.all(jnp.isfinite(g)))
    # every real input position but the last of each row influences some later prediction
    per_position = np.asarray(jnp.abs(g).sum(-1))
    assert np.all(per_position[0, :8] > 0) and np.all(per_position[1, :5] > 0)
    # padding positions influence nothing
    assert np.all(per_position[1, 6:] == 0)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="tokens must have shape"):
        F.forward(model.params, model.config, jnp.zeros((4,), jnp.int32), jnp.ones((4,), jnp.int32))
    with pytest.raises(TypeError, match="integer ids"):
        F.forward(model.params, model.config, jnp.zeros((1, 4)), jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="lengths must have shape"):
        F.log_probs(model.params, model.config, jnp.zeros((2, 4), jnp.int32), jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="embeddings must have shape"):
        F.forward(model.params, model.config, None, jnp.ones((1,), jnp.int32), embeddings=jnp.zeros((1, 4, 3)))
    with pytest.raises(TypeError, match="Config"):
        F.log_probs(model.params, model.config.model, jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32))
    with pytest.raises(TypeError, match="device"):
        F.load_model("unused", device=3)


def test_from_generator_shares_weights_and_config(pair, model):
    """from_generator gives the Generator's own arrays (no copy) and the config load_model gives."""
    generated = F.from_generator(pair.jaxgen)
    assert generated.config == model.config
    assert generated.vocabulary == model.vocabulary
    ours = jax.tree_util.tree_leaves(generated.params)
    held = jax.tree_util.tree_leaves(pair.jaxgen._pool.replicas[0].params)
    assert len(ours) == len(held) and all(a is b for a, b in zip(ours, held))
    seqs, tokens, lengths = batch(pair)
    np.testing.assert_array_equal(np.asarray(F.log_probs(generated.params, generated.config, tokens, lengths)),
                                  np.asarray(F.log_probs(model.params, model.config, tokens, lengths)))
    with pytest.raises(TypeError, match="jaxgen.Generator"):
        F.from_generator(model)
