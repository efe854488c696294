"""The slot scheduler (continuous batching, `jaxgen.runtime.scheduler`) against static sub-batches.

Tiny random models of generation_fixtures.py; a second Generator on the same model directory with
`continuous_batching=False` is the static reference. Ids are compared exactly, scores within
SCORE_TOLERANCE (batch shapes change float rounding, not decisions).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from generation_fixtures import SCORE_TOLERANCE, ModelPair, gen_pair  # noqa: F401

import jaxgen


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def pair(request, gen_pair) -> ModelPair:
    return gen_pair(request.param)


@pytest.fixture(scope="module")
def static(pair):
    return jaxgen.Generator(pair.jaxgen_dir, continuous_batching=False)


def prompts_of(pair: ModelPair, n: int = 10, seed: int = 300):
    """Prompts of 1..~40 tokens (Gemma 3's test window is shorter than the longest)."""
    lengths = [1 + (7 * i) % 41 for i in range(n)]
    return [pair.prompt(seed + i, length) for i, length in enumerate(lengths)]


def spread_end_tokens(pair: ModelPair, static, prompts, max_length: int):
    """End tokens that make greedy outputs stop after different numbers of steps."""
    free = static.generate_batch(prompts, max_length=max_length, end_token=[], include_prompt_in_result=False)
    ends = set()
    for i, r in enumerate(free):
        ids = r.sequences_ids[0]
        if ids:
            ends.add(pair.tokens[ids[(3 * i) % len(ids)]])
    return sorted(ends)[:3]


def assert_same(actual, expected, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.sequences_ids == e.sequences_ids, f"{what}: example {i}"
        np.testing.assert_allclose(a.scores, e.scores, atol=SCORE_TOLERANCE, err_msg=f"{what}: example {i}")


@pytest.mark.parametrize("options", [
    pytest.param(dict(include_prompt_in_result=False), marks=pytest.mark.slow),  # the other two cover it
    dict(include_prompt_in_result=True, repetition_penalty=1.2, no_repeat_ngram_size=3, min_length=3),
    dict(include_prompt_in_result=False, static_prompt_len=6),
], ids=["plain", "prompt-penalties-min-length", "static-prompt"])
def test_greedy_equals_static_batching(pair, static, options):
    jg = pair.jaxgen
    options = dict(options)
    prompts = prompts_of(pair)
    if options.pop("static_prompt_len", 0):
        options["static_prompt"] = pair.prompt(77, 6)
        prompts = [p[1:] or [pair.tokens[9]] for p in prompts]  # <bos> opens the static prompt
    max_length = 48 if options.get("include_prompt_in_result") else 20
    end = spread_end_tokens(pair, static, prompts, max_length)
    kwargs = dict(options, max_length=max_length, end_token=end, return_scores=True)
    before = jg.scheduler_stats
    expected = static.generate_batch(prompts, max_batch_size=3, **kwargs)
    lengths = {len(r.sequences_ids[0]) for r in expected}
    assert len(lengths) >= 3, lengths  # outputs of mixed lengths
    assert_same(jg.generate_batch(prompts, max_batch_size=3, **kwargs), expected, "generate_batch, 3 slots")
    assert_same(list(jg.generate_iterable(prompts, max_batch_size=4, **kwargs)), expected, "generate_iterable")
    after = jg.scheduler_stats
    assert after["prompts"] - before["prompts"] == 2 * len(prompts)
    assert after["refills"] - before["refills"] >= 4  # finished slots were refilled
    assert after["prefill_seconds"] > before["prefill_seconds"]
    assert after["utilisation"] == after["tokens"] / after["slot_steps"] and 0 < after["utilisation"] <= 1


def test_refilled_slots_run_fewer_steps(pair, static):
    """One long row and many short ones: static batches wait for their longest row, the
    scheduler's slots do not."""
    jg = pair.jaxgen
    prompts = prompts_of(pair, n=8, seed=400)
    kwargs = dict(max_length=24, end_token=[], include_prompt_in_result=False)
    lengths = [24] + [2] * 7
    before = jg.scheduler_stats
    per_row = [jg.generate_batch([p], max_batch_size=2, **dict(kwargs, max_length=n))[0] for p, n in zip(prompts, lengths)]
    mid = jg.scheduler_stats
    together = _generate_with_lengths(jg, prompts, lengths, kwargs)
    after = jg.scheduler_stats
    assert [r.sequences_ids for r in together] == [r.sequences_ids for r in per_row]
    assert mid["steps"] - before["steps"] == sum(lengths)  # one prompt at a time
    # Two slots: the long row runs 24 steps while the other slot serves the 7 short rows.
    assert after["steps"] - mid["steps"] <= 24 + 2


def test_last_rows_move_to_a_smaller_batch(pair, static):
    """Eight slots, one long row: once the short rows are done and nothing waits, the long row
    runs on in a batch of one (same tokens)."""
    jg = pair.jaxgen
    prompts = prompts_of(pair, n=8, seed=450)
    kwargs = dict(end_token=[], include_prompt_in_result=False, return_scores=True)
    lengths = [30] + [3] * 7
    expected = [static.generate_batch([p], max_length=n, **kwargs)[0] for p, n in zip(prompts, lengths)]
    before = jg.scheduler_stats
    futures = [jg.generate_batch([p], max_batch_size=8, asynchronous=True, max_length=n, **kwargs)[0]
               for p, n in zip(prompts, lengths)]
    assert_same([f.result() for f in futures], expected, "after shrinking")
    after = jg.scheduler_stats
    # The long row's tail ran narrower than 8 slots. (Whether a shrink is counted depends on when the
    # asynchronous calls reach the worker: a long row that starts alone runs narrow from the start; on a
    # loaded machine that happened, and `shrinks` stayed put.)
    assert after["slot_steps"] - before["slot_steps"] < 8 * 30


def test_the_tail_shrinks_through_finer_batches(pair, static):
    """Twelve slots, rows ending at different steps and nothing waiting: each chunk ends as soon as
    the running rows fit a smaller batch (12 -> 8 -> 6 -> 4 -> 3 -> 2 -> 1 here), so the tail's
    slot-steps follow the running rows, and the answers stay those of static batching."""
    jg = pair.jaxgen
    prompts = prompts_of(pair, n=12, seed=470)
    kwargs = dict(end_token=[], include_prompt_in_result=False, return_scores=True)
    lengths = [4 * (i + 1) for i in range(12)]  # row i runs 4(i + 1) steps
    expected = [static.generate_batch([p], max_length=n, **kwargs)[0] for p, n in zip(prompts, lengths)]
    before = jg.scheduler_stats
    with jg._scheduler._cond:  # submitted together: the worker admits all twelve at once
        futures = [jg.generate_batch([p], max_batch_size=12, asynchronous=True, max_length=n, **kwargs)[0]
                   for p, n in zip(prompts, lengths)]
    assert_same([f.result() for f in futures], expected, "the shrinking tail")
    after = jg.scheduler_stats
    slot_steps = after["slot_steps"] - before["slot_steps"]
    tokens = after["tokens"] - before["tokens"]
    assert tokens == sum(lengths)
    assert after["shrinks"] - before["shrinks"] >= 5
    # Twelve slots for all 48 steps would be 576 slot-steps; the tail's batches keep them near the work.
    assert slot_steps <= 1.25 * tokens, (slot_steps, tokens)


def test_slot_batch_sizes():
    from jaxgen.runtime.batching import slot_batch, smaller_slot_batch

    assert [slot_batch(n, 64) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 64)] == \
        [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 64]
    assert slot_batch(17, 20) == 20 and slot_batch(70, 64) == 70  # capped at the width; a bigger request
    assert slot_batch(300, 512) == 320 and smaller_slot_batch(320) == 256
    for n in range(1, 300):
        size = slot_batch(n, 1000)
        assert size >= n and size <= max(1.5 * n, n + 1) + 63 * (n > 256)
        assert smaller_slot_batch(size) < n  # the next size down no longer holds n rows


def _generate_with_lengths(jg, prompts, lengths, kwargs):
    """Concurrent asynchronous calls (one per max_length) share the slots of one session."""
    futures = [jg.generate_batch([p], max_batch_size=2, asynchronous=True, **dict(kwargs, max_length=n))[0]
               for p, n in zip(prompts, lengths)]
    return [f.result() for f in futures]


def test_iterable_keeps_input_order(pair, static):
    jg = pair.jaxgen
    prompts = prompts_of(pair, n=12, seed=500)
    kwargs = dict(max_length=12, include_prompt_in_result=False, end_token=spread_end_tokens(pair, static, prompts, 12))
    expected = [static.generate_batch([p], **kwargs)[0] for p in prompts]
    seen = list(jg.generate_iterable(iter(prompts), max_batch_size=3, **kwargs))
    assert [r.sequences_ids for r in seen] == [r.sequences_ids for r in expected]


def test_sampling_is_reproducible_per_prompt_whatever_the_width(pair, static):
    jg = pair.jaxgen
    prompts = prompts_of(pair, n=9, seed=600)
    kwargs = dict(max_length=10, sampling_topk=0, sampling_temperature=1.5, random_seed=11, end_token=[],
                  include_prompt_in_result=False, num_hypotheses=2)
    wide = jg.generate_batch(prompts, max_batch_size=9, **kwargs)
    narrow = list(jg.generate_iterable(prompts, max_batch_size=2, **kwargs))
    static_batches = static.generate_batch(prompts, max_batch_size=4, **kwargs)
    alone = [jg.generate_batch([p], **kwargs)[0] for p in prompts[:1]]
    for name, other in (("iterable width 2", narrow), ("static sub-batches", static_batches)):
        assert [r.sequences_ids for r in other] == [r.sequences_ids for r in wide], name
    assert alone[0].sequences_ids == wide[0].sequences_ids
    assert len({tuple(r.sequences_ids[0]) for r in wide}) > 1  # it does sample
    other_seed = jg.generate_batch(prompts, max_batch_size=9, **dict(kwargs, random_seed=12))
    assert [r.sequences_ids for r in other_seed] != [r.sequences_ids for r in wide]


def test_bad_prompt_in_iterable_names_its_index(pair):
    jg = pair.jaxgen
    good = prompts_of(pair, n=3, seed=700)
    items = good + [["<bos>", 5]] + prompts_of(pair, n=2, seed=710)
    out = []
    with pytest.raises(TypeError, match=r"start_tokens\[3\]"):
        for result in jg.generate_iterable(items, max_batch_size=2, max_length=6, include_prompt_in_result=False):
            out.append(result)
    assert len(out) == 3
    expected = jg.generate_batch(good, max_length=6, include_prompt_in_result=False)
    assert [r.sequences_ids for r in out] == [r.sequences_ids for r in expected]
    with pytest.raises(ValueError, match=r"start_tokens\[1\] has no decoder start token"):
        list(jg.generate_iterable([good[0], []], max_batch_size=2, max_length=4))
    # The Generator is still usable.
    assert jg.generate_batch(good[:1], max_length=4)[0].sequences_ids


def test_closing_the_iterable_stops_decoding(pair):
    jg = pair.jaxgen
    prompts = prompts_of(pair, n=40, seed=800)
    before = jg.scheduler_stats
    stream = jg.generate_iterable(prompts, max_batch_size=2, max_length=200, end_token=[],  # 41 + 200 <= 256
                                  include_prompt_in_result=False, min_length=1)
    first = next(stream)
    assert first.sequences_ids[0]
    stream.close()
    deadline = time.time() + 30
    while jg.num_active_batches and time.time() < deadline:
        time.sleep(0.05)
    assert jg.num_active_batches == 0
    steps = jg.scheduler_stats["steps"]
    time.sleep(0.3)
    assert jg.scheduler_stats["steps"] == steps
    # 40 prompts x 200 tokens were never decoded: at most a few chunks ran after close().
    assert jg.scheduler_stats["tokens"] - before["tokens"] < 40 * 200 // 4


def test_threads_share_slots_and_get_their_own_answers(pair, static):
    jg = pair.jaxgen
    groups = [prompts_of(pair, n=3, seed=900 + 10 * t) for t in range(4)]
    kwargs = dict(max_length=10, include_prompt_in_result=False, end_token=[], return_scores=True)
    expected = [static.generate_batch(g, **kwargs) for g in groups]
    outputs, errors = [None] * 4, []

    def work(t):
        try:
            outputs[t] = jg.generate_batch(groups[t], max_batch_size=8, **kwargs)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for t in range(4):
        assert_same(outputs[t], expected[t], f"thread {t}")


def test_long_static_prompt_padded_past_the_cache(pair):
    """A static prompt whose cached state is padded to more positions than the generation's
    cache (130 tokens -> 256 -> 288 in prefill chunks of 96; the generation needs 256) is cut
    to the cache, on both paths."""
    system = pair.prompt(55, 130)
    prompts = [pair.prompt(56, 3, bos=False)]
    kwargs = dict(max_length=4, include_prompt_in_result=False, end_token=[])
    expected = pair.jaxgen.generate_batch([system + prompts[0]], **kwargs)[0].sequences_ids
    for continuous in (True, False):
        jg = jaxgen.Generator(pair.jaxgen_dir, prefill_chunk=96, continuous_batching=continuous)
        assert jg.generate_batch(prompts, static_prompt=system, **kwargs)[0].sequences_ids == expected
