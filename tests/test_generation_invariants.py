"""Invariants of jaxgen's generation (jaxgen alone; spec §3, §5.7, §5.9, §8, §11).

Uses the tiny random Llama of generation_fixtures.py. Results are compared exactly for ids and
within SCORE_TOLERANCE for scores (batch shapes change float rounding, not decisions: the parity
tests check that these paths are decisive).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from generation_fixtures import (EOS, SCORE_TOLERANCE, ModelPair, compile_cache_sizes, gen_pair,  # noqa: F401
                                 ids_of)

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def pair(gen_pair) -> ModelPair:
    return gen_pair("llama")


@pytest.fixture(scope="module")
def jg(pair):
    return pair.jaxgen


def batch(pair: ModelPair, lengths=(10, 4, 7), seed=10, bos=True):
    return [pair.prompt(seed + i, n, bos=bos) for i, n in enumerate(lengths)]


def assert_results_equal(actual, expected, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.sequences_ids == e.sequences_ids, f"{what} example {i}"
        assert a.sequences == e.sequences, f"{what} example {i}"
        np.testing.assert_allclose(a.scores, e.scores, atol=SCORE_TOLERANCE, err_msg=f"{what} example {i}")


# ---------------------------------------------------------------------------- batching invariants
@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("options", [
    {"include_prompt_in_result": True, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
    {"include_prompt_in_result": False},
], ids=["with_prompt_penalties", "without_prompt"])
def test_batch_equals_prompts_one_at_a_time(pair, jg, beam_size, options):
    """(With include_prompt_in_result=False and penalties a batch legitimately differs: the
    force-decoded tails of longer prompts enter their penalty history, spec §5.3.)"""
    prompts = batch(pair)
    kwargs = dict(options, beam_size=beam_size, max_length=MAX_LENGTH, return_scores=True)
    together = jg.generate_batch(prompts, **kwargs)
    alone = [jg.generate_batch([p], **kwargs)[0] for p in prompts]
    assert_results_equal(together, alone, str(kwargs))


@pytest.mark.parametrize("max_batch_size,batch_type", [(1, "examples"), (2, "examples"), (16, "tokens")])
def test_max_batch_size_does_not_change_results(pair, jg, max_batch_size, batch_type):
    prompts = batch(pair, (10, 4, 7, 5, 3))
    for kwargs in ({"include_prompt_in_result": True, "repetition_penalty": 1.2},
                   {"include_prompt_in_result": False, "beam_size": 3}):
        kwargs = dict(kwargs, max_length=MAX_LENGTH, return_scores=True)
        reference = jg.generate_batch(prompts, **kwargs)
        split = jg.generate_batch(prompts, max_batch_size=max_batch_size, batch_type=batch_type, **kwargs)
        assert_results_equal(split, reference, f"{max_batch_size} {batch_type} {kwargs}")


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("cache", [True, False])
def test_static_prompt_equals_concatenated_prompt(pair, jg, beam_size, cache):
    static = pair.prompt(50, 6)
    prompts = batch(pair, (3, 3, 3), seed=51, bos=False)  # equal lengths: same penalty history
    kwargs = dict(include_prompt_in_result=False, beam_size=beam_size, max_length=MAX_LENGTH, return_scores=True,
                  repetition_penalty=1.2)
    with_static = jg.generate_batch(prompts, static_prompt=static, cache_static_prompt=cache, **kwargs)
    concatenated = jg.generate_batch([static + p for p in prompts], **kwargs)
    assert_results_equal(with_static, concatenated, "static prompt")


def test_static_prompt_first_token_invariant(pair, jg):
    """Spec §5.9 upstream test: generate_batch([[t0]], static_prompt=P, max_length=M-1) repeats the
    continuation of generate_batch([P], include_prompt_in_result=False, max_length=M) (t0 its first token)."""
    static = pair.prompt(52, 6)
    full = jg.generate_batch([static], include_prompt_in_result=False, max_length=12, end_token=[])[0].sequences[0]
    out = jg.generate_batch([full[:1]], static_prompt=static, max_length=11, end_token=[])[0].sequences[0]
    assert out == full


def test_length1_prompts_are_treated_uniformly(pair, jg):
    """Spec §11 Q1 (deliberate difference): CTranslate2 returns the longer prompts' tails, counted in
    max_length, when a sub-batch has a length-1 prompt and include_prompt_in_result=False; jaxgen
    excludes every prompt and counts new tokens only, whatever the batching."""
    prompts = [["<bos>"], pair.prompt(60, 8), pair.prompt(61, 1, bos=False)]
    kwargs = dict(include_prompt_in_result=False, max_length=6, end_token=[], return_scores=True)
    for max_batch_size in (0, 2):
        out = jg.generate_batch(prompts, max_batch_size=max_batch_size, **kwargs)
        assert [len(r.sequences_ids[0]) for r in out] == [6, 6, 6]
        assert_results_equal(out, [jg.generate_batch([p], **kwargs)[0] for p in prompts], "Q1")


# ---------------------------------------------------------------------------- streaming invariants
def test_generate_tokens_yields_generate_batch_plus_end_token(pair, jg):
    prompts = batch(pair)
    kwargs = dict(max_length=MAX_LENGTH, repetition_penalty=1.1)
    steps = list(jg.generate_tokens(prompts, **kwargs))
    results = jg.generate_batch(prompts, include_prompt_in_result=False, **kwargs)
    with_end = jg.generate_batch(prompts, include_prompt_in_result=False, return_end_token=True, **kwargs)
    stopped_on_end = 0
    for i, (r, e) in enumerate(zip(results, with_end)):
        streamed = [s for s in steps if s.batch_id == i]
        assert [s.step for s in streamed] == sorted(s.step for s in streamed)
        tokens = [s.token_id for s in streamed]
        assert tokens == e.sequences_ids[0]
        assert [s.token for s in streamed] == e.sequences[0]
        if tokens[-1] == EOS:
            stopped_on_end += 1
            assert tokens[:-1] == r.sequences_ids[0]
        else:
            assert tokens == r.sequences_ids[0]
        assert [s.is_last for s in streamed] == [False] * (len(streamed) - 1) + [True]
        assert all(s.log_prob is None and s.hypothesis_id == 0 for s in streamed)
    assert stopped_on_end and stopped_on_end < len(prompts)


def test_score_invariants(pair, jg):
    """Spec §5.7: sum(step.log_prob)/len(steps) == scores[0] (include_prompt_in_result=False), and
    the include_prompt_in_result True/False relation for a non-BOS prompt."""
    prompts = batch(pair)
    steps = list(jg.generate_tokens(prompts, max_length=MAX_LENGTH, return_log_prob=True))
    results = jg.generate_batch(prompts, max_length=MAX_LENGTH, include_prompt_in_result=False, return_scores=True)
    for i, r in enumerate(results):
        log_probs = [s.log_prob for s in steps if s.batch_id == i]
        assert sum(log_probs) / len(log_probs) == pytest.approx(r.scores[0], abs=1e-5)

    prompt = pair.prompt(62, 5, bos=False)
    m = 20
    without = jg.generate_batch([prompt], max_length=m - len(prompt), include_prompt_in_result=False,
                                return_scores=True, end_token=[])[0]
    with_prompt = jg.generate_batch([prompt], max_length=m - 1, return_scores=True, end_token=[])[0]
    assert prompt + without.sequences[0] == with_prompt.sequences[0]
    assert without.scores[0] * len(without.sequences[0]) == pytest.approx(
        with_prompt.scores[0] * (len(with_prompt.sequences[0]) - 1), abs=1e-4)


# ---------------------------------------------------------------------------- sampling
def _top_sets(logits: np.ndarray, k: int):
    return set(np.argsort(-logits)[:k].tolist())


def test_topk_sampling_draws_only_from_the_top_k(pair, jg):
    prompt = pair.prompt(70, 6)
    logits = np.asarray(jg.forward_batch([prompt]))[0, -1]
    k = 3
    drawn = []
    for seed in range(8):
        out = jg.generate_batch([prompt] * 8, max_length=1, sampling_topk=k, random_seed=seed,
                                include_prompt_in_result=False, end_token=[])
        drawn += [r.sequences_ids[0][0] for r in out]
    assert set(drawn) <= _top_sets(logits, k)
    assert len(set(drawn)) >= 2  # it does sample

    # Every step of longer samples, with temperature, against the raw logits of the sampled prefix.
    out = jg.generate_batch([prompt] * 8, max_length=8, sampling_topk=2, sampling_temperature=1.5, random_seed=1,
                            include_prompt_in_result=False, end_token=[])
    sequences = [prompt + r.sequences[0] for r in out]
    path_logits = np.asarray(jg.forward_batch(sequences))
    for seq, lg in zip(sequences, path_logits):
        chosen = ids_of(pair, seq[len(prompt):])
        for t, token in enumerate(chosen):
            assert token in _top_sets(lg[len(prompt) - 1 + t], 2)


def test_topp_sampling_draws_only_from_the_nucleus(pair, jg):
    prompt = pair.prompt(71, 6)
    logits = np.asarray(jg.forward_batch([prompt]))[0, -1].astype(np.float64)
    temperature, p = 0.8, 0.6
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[before < p].tolist())
    drawn = set()
    for seed in range(4):
        out = jg.generate_batch([prompt] * 8, max_length=1, sampling_topk=0, sampling_topp=p,
                                sampling_temperature=temperature, random_seed=seed, include_prompt_in_result=False)
        drawn |= {r.sequences_ids[0][0] for r in out if r.sequences_ids[0]}
    assert drawn <= nucleus and len(drawn) >= 2


def test_random_seed(pair, jg):
    prompts = batch(pair)
    kwargs = dict(max_length=16, sampling_topk=0, sampling_temperature=1.2, end_token=[], return_scores=True)
    first = jg.generate_batch(prompts, random_seed=7, **kwargs)
    assert_results_equal(jg.generate_batch(prompts, random_seed=7, **kwargs), first, "same seed")
    others = [jg.generate_batch(prompts, random_seed=seed, **kwargs) for seed in (8, 9)]
    assert all([r.sequences_ids for r in o] != [r.sequences_ids for r in first] for o in others)
    # num_hypotheses > 1 with sampling: independent samples, sorted by score.
    out = jg.generate_batch(prompts, random_seed=3, num_hypotheses=3, **kwargs)
    for r in out:
        assert len(r.sequences) == 3 and len({tuple(s) for s in r.sequences_ids}) > 1
        assert r.scores == sorted(r.scores, reverse=True)


def test_temperature_zero_is_greedy(pair, jg):
    prompts = batch(pair)
    greedy = jg.generate_batch(prompts, max_length=MAX_LENGTH, return_scores=True)
    zero = jg.generate_batch(prompts, max_length=MAX_LENGTH, return_scores=True, sampling_topk=0,
                             sampling_temperature=0, random_seed=5)
    assert_results_equal(zero, greedy, "temperature 0")


# ---------------------------------------------------------------------------- concurrency / async
def test_concurrent_calls_from_four_threads(pair, jg):
    prompts = batch(pair)
    static = pair.prompt(80, 4)
    calls = [
        lambda: jg.generate_batch(prompts, max_length=MAX_LENGTH, return_scores=True),
        lambda: jg.generate_batch(prompts, max_length=MAX_LENGTH, beam_size=3, return_scores=True),
        lambda: jg.generate_batch(prompts, max_length=MAX_LENGTH, static_prompt=static, include_prompt_in_result=False,
                                  return_scores=True),
        lambda: jg.generate_batch(prompts[:1], max_length=MAX_LENGTH, repetition_penalty=1.5, return_scores=True),
    ]
    serial = [call() for call in calls]
    outputs = [[None] * 3 for _ in calls]
    errors = []

    def worker(index):
        try:
            for repeat in range(3):
                outputs[index][repeat] = calls[index]()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for index, expected in enumerate(serial):
        for got in outputs[index]:
            assert_results_equal(got, expected, f"thread {index}")


def test_asynchronous_returns_futures(pair, jg):
    prompts = batch(pair)
    expected = jg.generate_batch(prompts, max_length=MAX_LENGTH, return_scores=True)
    futures = jg.generate_batch(prompts, max_length=MAX_LENGTH, return_scores=True, asynchronous=True,
                                max_batch_size=2)
    assert len(futures) == len(prompts)
    assert all(hasattr(f, "result") and hasattr(f, "done") for f in futures)
    assert_results_equal([f.result() for f in futures], expected, "asynchronous")
    assert all(f.done() for f in futures)
    scores = jg.score_batch(prompts, asynchronous=True)
    assert [s.result().tokens for s in scores] == [p[1:] for p in prompts]


def test_callback_returning_true_stops_its_entry(pair, jg):
    prompts = batch(pair)
    kwargs = dict(max_length=MAX_LENGTH, end_token=[], return_scores=True)
    full = jg.generate_batch(prompts, **kwargs)
    seen = []

    def callback(step):
        seen.append((step.batch_id, step.step, step.is_last))
        return step.batch_id == 0 and step.step == 12

    out = jg.generate_batch(prompts, callback=callback, **kwargs)
    # <bos> is not returned, so token i of the result is loop step i: steps 0..12 are kept.
    assert out[0].sequences_ids[0] == full[0].sequences_ids[0][:13]
    assert out[1].sequences_ids == full[1].sequences_ids and out[2].sequences_ids == full[2].sequences_ids
    assert max(s for b, s, _ in seen if b == 0) == 12
    # The prompt is force-decoded (include_prompt_in_result=True): its tokens are steps too.
    assert [s for b, s, _ in seen if b == 1][:3] == [0, 1, 2]
    assert not any(last for b, s, last in seen if b == 0)  # stopped by the callback, not the last step


def test_close_stops_decoding(pair, jg):
    """close() makes the job stop at its next step; no callback runs after close() returns."""
    release = threading.Event()
    calls = []

    def callback(step):
        calls.append(step.step)
        if step.step == 2:
            release.wait(timeout=30)

    stream = jg.generate_tokens(pair.prompt(90, 5), max_length=64, end_token=[], callback=callback)
    assert [next(stream).step, next(stream).step] == [0, 1]
    threading.Timer(0.2, release.set).start()
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 30
    assert calls == [0, 1, 2]
    time.sleep(0.2)
    assert calls == [0, 1, 2] and jg.num_active_batches == 0


def test_async_generate_tokens_does_not_block_the_event_loop(pair, jg):
    """The worker waits (at step 1) for an event that only an asyncio task sets: a bridge that
    blocked the event loop while waiting for tokens (CTranslate2's, spec §11 Q7) would stall
    until the timeout."""
    prompt = pair.prompt(91, 5)
    kwargs = dict(max_length=16, end_token=[], return_log_prob=True)
    expected = [(s.step, s.token_id, s.log_prob) for s in jg.generate_tokens(prompt, **kwargs)]
    released = threading.Event()
    waited = []

    def callback(step):
        if step.step == 1:
            waited.append(released.wait(timeout=20))

    async def main():
        async def release():
            await asyncio.sleep(0.05)
            released.set()

        task = asyncio.create_task(release())
        got = [(s.step, s.token_id, s.log_prob) async for s in jg.async_generate_tokens(prompt, callback=callback,
                                                                                        **kwargs)]
        await task
        return got

    assert asyncio.run(main()) == expected
    assert waited == [True]


def test_iterables_keep_input_order(pair, jg):
    prompts = batch(pair, (3, 9, 5, 2, 7, 4, 6), seed=100)
    kwargs = dict(max_length=MAX_LENGTH, return_scores=True)
    expected = jg.generate_batch(prompts, **kwargs)
    got = list(jg.generate_iterable(iter(prompts), max_batch_size=2, **kwargs))
    assert_results_equal(got, expected, "generate_iterable")
    got = list(jg.generate_iterable(iter(prompts), max_batch_size=8, batch_type="tokens", **kwargs))
    assert_results_equal(got, expected, "generate_iterable tokens")
    scores = jg.score_batch(prompts)
    for got, want in zip(jg.score_iterable(iter(prompts), max_batch_size=2), scores):
        assert got.tokens == want.tokens
        np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-5)
    assert list(jg.generate_iterable(iter([]))) == []


def test_clear_static_prompt_cache(pair, jg):
    static = pair.prompt(95, 5)
    prompts = batch(pair, (3, 2), seed=96, bos=False)
    kwargs = dict(static_prompt=static, max_length=8, return_scores=True)
    jg.clear_static_prompt_cache()
    first = jg.generate_batch(prompts, **kwargs)
    assert jg.prefix_cache.count(static=True) == 1
    jg.generate_batch(prompts, cache_static_prompt=False, **dict(kwargs, static_prompt=static[:4]))
    assert jg.prefix_cache.count(static=True) == 1  # cache_static_prompt=False stores nothing
    jg.clear_static_prompt_cache()
    assert jg.prefix_cache.count(static=True) == 0
    assert_results_equal(jg.generate_batch(prompts, **kwargs), first, "after clear")


# ---------------------------------------------------------------------------- compilation
def test_changing_options_does_not_recompile(pair, jg):
    prompt = [pair.prompt(97, 6)]
    # Warm up: one greedy and one sampling call (different compiled loops by design).
    jg.generate_batch(prompt, max_length=8)
    jg.generate_batch(prompt, max_length=8, sampling_topk=5, random_seed=0)
    before = compile_cache_sizes()
    assert before
    variations = [
        dict(max_length=1), dict(max_length=17), dict(max_length=64), dict(max_length=40, min_length=30),
        dict(min_length=3, max_length=9), dict(repetition_penalty=1.7), dict(repetition_penalty=0.5),
        dict(sampling_topk=2, random_seed=1), dict(sampling_topk=64, random_seed=2),
        dict(sampling_topk=17, sampling_temperature=0.3, random_seed=3),
        dict(sampling_topk=9, sampling_temperature=2.5, sampling_topp=0.4, random_seed=4),
        dict(sampling_topk=33, sampling_topp=0.9, repetition_penalty=1.3, min_length=5, max_length=50,
             random_seed=5),
    ]
    for kwargs in variations:
        kwargs.setdefault("max_length", 32)  # (the default, 512, is another shape bucket)
        jg.generate_batch(prompt, **kwargs)
        assert compile_cache_sizes() == before, f"{kwargs} recompiled"


def test_callback_logits_per_row(pair, jg):
    """Spec §11 Q4 (deliberate difference): with return_logits_vocab every callback step carries its
    own row's [V] processed logits -- those GenerationResult.logits holds for that step."""
    prompts = batch(pair, (5, 5, 5), seed=110)
    steps = []
    out = jg.generate_batch(prompts, max_length=6, include_prompt_in_result=False, return_logits_vocab=True,
                            repetition_penalty=1.3, callback=steps.append)
    assert len(steps) == sum(len(r.logits[0]) for r in out) > 0
    for s in steps:
        assert s.logits is not None and np.asarray(s.logits).shape == (len(jg.vocabulary),)
        np.testing.assert_array_equal(np.asarray(s.logits), np.asarray(out[s.batch_id].logits[0][s.step]))
        assert int(np.argmax(np.asarray(s.logits))) == s.token_id
