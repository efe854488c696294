"""Prompt-lookup speculative decoding (`prompt_lookup_tokens=K`, jaxgen.decoding.speculative):
exactly greedy search's output on the tiny models of generation_fixtures.py (llama: full
attention; gemma3: sliding-window rings of 4 slots, so drafts are capped at 3 tokens and rejected
tokens' ring slots must be restored), and the draft lookup itself."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from generation_fixtures import SCORE_TOLERANCE, ModelPair, gen_pair  # noqa: F401 (gen_pair is a fixture)

from jaxgen.decoding.speculative import find_draft


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def pair(request, gen_pair) -> ModelPair:
    return gen_pair(request.param)


def repetitive(pair: ModelPair, seed: int, unit: int, times: int):
    body = pair.prompt(seed, unit + 1)[1:]
    return ["<bos>"] + body * times


def greedy_output(pair: ModelPair, prompts, **kwargs):
    return pair.jaxgen.generate_batch(prompts, return_scores=True, **kwargs)


def assert_same(pair: ModelPair, prompts, k: int = 5, **kwargs):
    plain = greedy_output(pair, prompts, **kwargs)
    fast = greedy_output(pair, prompts, prompt_lookup_tokens=k, **kwargs)
    for i, (a, b) in enumerate(zip(plain, fast)):
        assert b.sequences_ids == a.sequences_ids, f"prompt {i}: {prompts[i]}"
        np.testing.assert_allclose(b.scores, a.scores, atol=SCORE_TOLERANCE)


def test_batch_1_with_and_without_repetitions(pair):
    assert_same(pair, [repetitive(pair, 1, 6, 4)], max_length=40)
    assert_same(pair, [pair.prompt(2, 17)], max_length=40)


def test_batch_4_mixed(pair):
    prompts = [repetitive(pair, 3, 5, 3), pair.prompt(4, 9), repetitive(pair, 5, 3, 6), pair.prompt(6, 2)]
    assert_same(pair, prompts, max_length=48)
    assert_same(pair, prompts, k=2, max_length=30, include_prompt_in_result=False, end_token=[])


def test_static_prompt_min_length_and_penalties(pair):
    static = repetitive(pair, 7, 4, 2)
    prompts = [pair.prompt(8, 5, bos=False), repetitive(pair, 9, 3, 3)[1:]]
    assert_same(pair, prompts, max_length=32, static_prompt=static, include_prompt_in_result=False)
    assert_same(pair, prompts, max_length=24, min_length=20, repetition_penalty=1.3, no_repeat_ngram_size=3)


def test_long_generation_crosses_live_bounds(gen_pair):
    """Positions past 512 make the loop grow its live cache bound between segments."""
    import dataclasses

    import jaxgen

    pair = gen_pair("llama")
    # 560 positions pass the tiny model's 256 trained ones: a Generator that allows it on purpose.
    wide = jaxgen.Generator(pair.jaxgen_dir, context_length=1024)
    try:
        wide_pair = dataclasses.replace(pair, jaxgen=wide)
        assert_same(wide_pair, [repetitive(pair, 10, 8, 60)], k=8, max_length=80, include_prompt_in_result=False)
    finally:
        wide.unload_model()


@pytest.mark.parametrize("kwargs, what", [(dict(sampling_topk=5), "random sampling"),
                                          (dict(beam_size=2), "beam search"),
                                          (dict(return_logits_vocab=True), "return_logits_vocab"),
                                          (dict(logits_processors=[lambda l, g, s: l]), "logits_processors")])
def test_unsupported_options(gen_pair, kwargs, what):
    pair = gen_pair("llama")
    with pytest.raises(ValueError, match=f"prompt_lookup_tokens .* does not support {what}"):
        pair.jaxgen.generate_batch([pair.prompt(1, 5)], max_length=4, prompt_lookup_tokens=3, **kwargs)
    with pytest.raises(TypeError, match="prompt_lookup_tokens"):
        pair.jaxgen.generate_batch([pair.prompt(1, 5)], max_length=4, prompt_lookup_tokens=1.5)


def test_find_draft():
    context = jnp.asarray(np.array([
        [1, 2, 3, 4, 5, 9, 2, 3, 7, 2, 3, 0, 0],  # suffix (2, 3): latest earlier match at 6 -> 7, 2, 3
        [1, 2, 3, 4, 5, 1, 2, 3, 0, 0, 0, 0, 0],  # suffix (1, 2, 3) at 0 -> 4, 5, 1, 2 (K = 4)
        [5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no repeated token: no draft
        [4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # suffix (4) at 0 -> 4 (stops at the context's end)
    ], np.int32))
    length = jnp.asarray(np.array([11, 8, 4, 2], np.int32))
    draft, n = find_draft(context, length, 4, 3, 1)
    assert np.asarray(n).tolist() == [3, 4, 0, 1]
    d = np.asarray(draft)
    assert d[0, :3].tolist() == [7, 2, 3] and d[1].tolist() == [4, 5, 1, 2] and d[3, 0] == 4


def test_drafts_are_accepted(pair, monkeypatch):
    """On a repetitive prompt the loop emits several tokens per pass (the speculation is not idle;
    on gemma3 rejected drafts' ring slots are restored, or later outputs would differ)."""
    import jaxgen.runtime.generation as generation

    states = []
    original = generation.lookup_decode

    def spy(*args, **kwargs):
        states.append(original(*args, **kwargs))
        return states[-1]

    monkeypatch.setattr(generation, "lookup_decode", spy)
    prompt = repetitive(pair, 11, 6, 5)
    plain = pair.jaxgen.generate_batch([prompt], max_length=40, include_prompt_in_result=False, end_token=[])
    fast = pair.jaxgen.generate_batch([prompt], max_length=40, include_prompt_in_result=False, end_token=[],
                                      prompt_lookup_tokens=6)
    assert fast[0].sequences_ids == plain[0].sequences_ids
    final = states[-1]
    assert int(final.rows.gen_len[0]) == 40
    assert int(final.accepted[0]) > 0 and int(final.rows.step) < 40
    assert int(final.rows.step) + int(final.accepted[0]) == 40
