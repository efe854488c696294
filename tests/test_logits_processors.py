"""User logits processors (`logits_processors=[fn, ...]`, jaxgen.decoding.custom) on the tiny llama
of generation_fixtures.py: bans, forced sequences, the `generated` / `step` arguments, errors."""

from __future__ import annotations

import collections

import jax.numpy as jnp
import numpy as np
import pytest

from generation_fixtures import UNK, ModelPair, gen_pair  # noqa: F401 (gen_pair is a fixture)

from jaxgen.decoding.custom import GENERATED_FILL


@pytest.fixture(scope="module")
def pair(gen_pair) -> ModelPair:
    return gen_pair("llama")


def prompts(pair: ModelPair, n: int = 4):
    return [pair.prompt(700 + i, 3 + 4 * i) for i in range(n)]


def generated_ids(results):
    return [h for r in results for h in r.sequences_ids]


def most_common_token(pair: ModelPair, **kwargs) -> int:
    out = pair.jaxgen.generate_batch(prompts(pair), max_length=16, include_prompt_in_result=False, end_token=[],
                                     **kwargs)
    counts = collections.Counter(t for ids in generated_ids(out) for t in ids)
    return counts.most_common(1)[0][0]


def banning(token: int):
    def ban(logits, generated, step):
        return logits.at[:, token].set(-jnp.inf)
    return ban


@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam"])
def test_banned_token_never_generated(pair, mode):
    kwargs = {"greedy": {}, "sampling": dict(sampling_topk=0, random_seed=3),
              "beam": dict(beam_size=3)}[mode]
    token = most_common_token(pair, **kwargs)
    ban = banning(token)
    out = pair.jaxgen.generate_batch(prompts(pair) * 2, max_length=16, include_prompt_in_result=False,
                                     end_token=[], logits_processors=[ban], **kwargs)
    ids = generated_ids(out)
    assert sum(len(x) for x in ids) == 8 * 16
    assert all(token not in x for x in ids)


FORCED = [10, 11, 12, 13, 14, 15, 16, 17]


def force_sequence(logits, generated, step):
    target = jnp.asarray(FORCED, jnp.int32)[jnp.minimum(step, len(FORCED) - 1)]
    forced = jnp.where(jnp.arange(logits.shape[1]) == target, 0.0, -jnp.inf).astype(logits.dtype)
    return jnp.broadcast_to(forced, logits.shape)


@pytest.mark.parametrize("kwargs", [{}, dict(sampling_topk=0, random_seed=1), dict(beam_size=2)])
def test_forced_sequence(pair, kwargs):
    out = pair.jaxgen.generate_batch(prompts(pair), max_length=len(FORCED), include_prompt_in_result=False,
                                     logits_processors=[force_sequence], **kwargs)
    assert all(r.sequences_ids[0] == FORCED for r in out)


def test_generated_and_step_arguments(pair):
    """Forces token 4 + step, read back from `generated` (its fill count) and checked against step."""
    def from_history(logits, generated, step):
        filled = jnp.sum(generated == GENERATED_FILL, axis=1)  # N - step on running rows
        seen = generated.shape[1] - filled
        previous = jnp.where(step > 0, generated[:, jnp.maximum(step - 1, 0)], 3)
        target = jnp.where(seen == step, previous + 1, 0)  # 0 (<pad>) if the contract broke
        return jnp.where(jnp.arange(logits.shape[1])[None, :] == target[:, None], 0.0, -1e9).astype(jnp.float32)

    out = pair.jaxgen.generate_batch(prompts(pair), max_length=6, include_prompt_in_result=False,
                                     logits_processors=[from_history])
    assert all(r.sequences_ids[0] == [4, 5, 6, 7, 8, 9] for r in out)
    steps = list(pair.jaxgen.generate_tokens(prompts(pair)[0], max_length=6, logits_processors=[from_history]))
    assert [s.token_id for s in steps] == [4, 5, 6, 7, 8, 9]


def test_processors_run_after_builtin_ones_and_in_order(pair):
    """A processor sees the logits after CTranslate2's processors (disable_unk's ban) and the
    processors compose in list order."""
    def unk_banned_marker(logits, generated, step):
        banned = logits[:, UNK] <= jnp.finfo(jnp.float32).min
        target = jnp.where(banned, 5, 6)
        return jnp.where(jnp.arange(logits.shape[1])[None, :] == target[:, None], 0.0, -1e9).astype(jnp.float32)

    for disable_unk, expected in ((True, 5), (False, 6)):
        out = pair.jaxgen.generate_batch(prompts(pair), max_length=3, include_prompt_in_result=False,
                                         disable_unk=disable_unk, logits_processors=[unk_banned_marker])
        assert all(r.sequences_ids[0] == [expected] * 3 for r in out)

    def boost(logits, generated, step):
        return logits.at[:, 7].set(1e4)

    out = pair.jaxgen.generate_batch(prompts(pair), max_length=4, include_prompt_in_result=False,
                                     logits_processors=[boost, banning(7)])
    assert all(7 not in r.sequences_ids[0] for r in out)
    out = pair.jaxgen.generate_batch(prompts(pair), max_length=4, include_prompt_in_result=False,
                                     logits_processors=[banning(7), boost])
    assert all(r.sequences_ids[0] == [7] * 4 for r in out)


def test_generate_iterable_with_processor(pair):
    token = most_common_token(pair)
    results = list(pair.jaxgen.generate_iterable(prompts(pair), max_batch_size=2, max_length=16,
                                                 include_prompt_in_result=False, end_token=[],
                                                 logits_processors=[banning(token)]))
    assert len(results) == 4 and all(token not in r.sequences_ids[0] for r in results)


def raising(logits, generated, step):
    raise RuntimeError("boom")


def wrong_shape(logits, generated, step):
    return logits[:, :-1]


def wrong_dtype(logits, generated, step):
    return logits.astype(jnp.int32)


@pytest.mark.parametrize("fn, message", [(raising, "raising raised RuntimeError: boom"),
                                         (wrong_shape, "wrong_shape must return float32 logits of shape"),
                                         (wrong_dtype, "wrong_dtype must return float32 logits")])
def test_bad_processor_is_named_and_generator_stays_usable(pair, fn, message):
    before = pair.jaxgen.generate_batch(prompts(pair), max_length=5)
    with pytest.raises(ValueError, match=message):
        pair.jaxgen.generate_batch(prompts(pair), max_length=5, logits_processors=[fn])
    with pytest.raises(ValueError, match=message):
        pair.jaxgen.generate_tokens(prompts(pair)[0], max_length=5, logits_processors=[fn])
    after = pair.jaxgen.generate_batch(prompts(pair), max_length=5)
    assert [r.sequences_ids for r in after] == [r.sequences_ids for r in before]


def test_processor_shape_error_inside_the_loop_is_named(pair):
    """A processor that only breaks at the loop's real batch size still gets a named error."""
    def batch_dependent(logits, generated, step):
        return logits if logits.shape[0] == 3 else logits[:, :3]  # the loop pads 3 rows to 4

    with pytest.raises(ValueError, match="batch_dependent must return float32 logits"):
        pair.jaxgen.generate_batch(prompts(pair, 4)[:3], max_length=5, logits_processors=[batch_dependent])
    assert len(pair.jaxgen.generate_batch(prompts(pair), max_length=3)) == 4


@pytest.mark.parametrize("value, error", [(banning(5), TypeError), ([3], TypeError), ("fn", TypeError)])
def test_bad_processor_lists(pair, value, error):
    with pytest.raises(error, match="logits_processors"):
        pair.jaxgen.generate_batch(prompts(pair), max_length=5, logits_processors=value)


def test_identity_processor_keeps_greedy_results(pair):
    plain = pair.jaxgen.generate_batch(prompts(pair), max_length=12, return_scores=True)
    same = pair.jaxgen.generate_batch(prompts(pair), max_length=12, return_scores=True,
                                      logits_processors=[lambda logits, generated, step: logits])
    assert [r.sequences_ids for r in same] == [r.sequences_ids for r in plain]
    np.testing.assert_allclose([r.scores for r in same], [r.scores for r in plain], atol=1e-5)
