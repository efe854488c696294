"""Shared prefixes computed once (jaxgen.runtime.prefix_cache, jaxgen.runtime.scoring): score_batch
with the prefix cache gives the scores and greedy flags of the same Generator without it, within
one call (rows sharing few-shot examples and contexts) and across calls (cached states), on a
model with full attention (llama) and one with sliding-window rings (gemma3, window 4: every
shared prefix is longer than the window); and the cache's own rules (keys, LRU, budgets)."""

from __future__ import annotations

import numpy as np
import pytest

from generation_fixtures import ModelPair, gen_pair  # noqa: F401


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def engines(request, gen_pair):  # noqa: F811
    """(pair, Generator with the prefix cache, Generator without it) on one tiny model."""
    import jaxgen

    pair: ModelPair = gen_pair(request.param)
    return pair, jaxgen.Generator(pair.jaxgen_dir), jaxgen.Generator(pair.jaxgen_dir, prefix_cache=False)


def _items(pair: ModelPair, seed: int, contexts: int = 3, answers: int = 4):
    """Rows like a few-shot multiple-choice task: 70 shared "shot" tokens, then per item a
    40-token question and `answers` continuations of 1-5 tokens. With blocks of 32 tokens, the
    items share 2 blocks and each item's rows a third one (shots and question)."""
    shots = pair.prompt(seed, 70)
    rows = []
    for c in range(contexts):
        question = pair.prompt(seed * 100 + c, 40, bos=False)
        for a in range(answers):
            rows.append(shots + question + pair.prompt(seed * 1000 + c * 10 + a, 1 + a % 5, bos=False))
    return rows


def _assert_same(got, want, greedy: bool = True):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        np.testing.assert_allclose(g.log_probs, w.log_probs, atol=1e-4, rtol=1e-4)
        if greedy:
            assert g.greedy == w.greedy


def test_shared_prefixes_score_as_without_sharing(engines):
    pair, shared, plain = engines
    shared.prefix_cache.clear()
    rows = _items(pair, 1) + [pair.prompt(7, 20), pair.prompt(8, 1)]  # an unshared row, a 1-token row
    before = dict(shared.prefix_cache.stats)
    got = shared.score_batch(rows, return_greedy=True)
    _assert_same(got, plain.score_batch(rows, return_greedy=True))
    stats = shared.prefix_cache.stats
    # the shots' first 64 tokens once, then each context's first 96
    assert stats["inserted"] > before["inserted"] and shared.prefix_cache.count(static=False) >= 1
    assert plain.prefix_cache.count() == 0

    # Across calls: the contexts' states are cached; new answers reuse them.
    hits = stats["hits"]
    more = _items(pair, 1, answers=6)[4:]
    _assert_same(shared.score_batch(more, return_greedy=True), plain.score_batch(more, return_greedy=True))
    assert shared.prefix_cache.stats["hits"] > hits


def test_per_row_offsets_return_the_continuations(engines):
    pair, shared, plain = engines
    rows = _items(pair, 2, contexts=2, answers=3)
    offsets = [len(r) - 1 - (1 + i % 3) for i, r in enumerate(rows)]
    full = plain.score_batch(rows, return_greedy=True)
    for generator in (shared, plain):
        generator.prefix_cache.clear()
        got = generator.score_batch(rows, return_greedy=True, offset=offsets)
        for g, f, k in zip(got, full, offsets):
            assert g.tokens == f.tokens[k:]
            np.testing.assert_allclose(g.log_probs, f.log_probs[k:], atol=1e-4, rtol=1e-4)
            assert g.greedy == f.greedy[k:]
    # Prefix states made for offsets past them have no scores; a later call that needs them still gets them.
    _assert_same(shared.score_batch(rows, return_greedy=True), full)
    with pytest.raises(ValueError, match="offset has 1 entries for 6 sequences"):
        shared.score_batch(rows, offset=[0])
    with pytest.raises(ValueError, match=r"offset\[1\] must be an int >= 0"):
        shared.score_batch(rows[:2], offset=[0, -1])


def test_sub_batches_and_asynchronous_calls_share_the_cache(engines):
    pair, shared, plain = engines
    rows = _items(pair, 3, contexts=2)
    want = plain.score_batch(rows)
    got = shared.score_batch(rows, max_batch_size=3, asynchronous=True)
    _assert_same([f.result() for f in got], want, greedy=False)


def _assert_same_generations(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.sequences_ids == w.sequences_ids
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_generation_from_shared_prefixes(engines):
    """Greedy generations (the slot scheduler, static sub-batches, beam search, a static prompt,
    generate_iterable) from prompts that share few-shot tokens equal those without sharing."""
    pair, shared, plain = engines
    shared.prefix_cache.clear()
    prompts = [r[:-2] for r in _items(pair, 4, contexts=2, answers=2)]
    static = pair.prompt(40, 40)
    for options in (dict(max_length=6), dict(max_length=6, static_prompt=static),
                    dict(max_length=5, beam_size=2, num_hypotheses=2), dict(max_length=6, return_end_token=True)):
        options = dict(options, return_scores=True, include_prompt_in_result=False)
        want = plain.generate_batch(prompts, **options)
        assert any(r.sequences_ids[0] for r in want)
        inserted = shared.prefix_cache.stats["inserted"]
        _assert_same_generations(shared.generate_batch(prompts, **options), want)
        assert shared.prefix_cache.stats["inserted"] > inserted or shared.prefix_cache.stats["hits"]
        _assert_same_generations(shared.generate_batch(prompts, max_batch_size=2, **options), want)
    options = dict(max_length=6, return_scores=True, include_prompt_in_result=False)
    got = list(shared.generate_iterable(iter(prompts), max_batch_size=2, **options))
    _assert_same_generations(got, plain.generate_batch(prompts, **options))


def test_prefix_cache_argument():
    import jaxgen

    with pytest.raises(TypeError, match="prefix_cache"):
        jaxgen.Generator("unused", prefix_cache="yes")
    with pytest.raises(TypeError, match="prefix_cache"):
        jaxgen.Generator("unused", prefix_cache=-1)


# ---------------------------------------------------------------------------- the cache's rules
class _Array:
    def __init__(self, n):
        self.size, self.dtype = n, np.dtype(np.float32)


def _entry(device, tokens, nbytes=400, static=False, scores=False):
    from jaxgen.model.decoder import KVCache
    from jaxgen.runtime.prefix_cache import PrefixEntry

    cache = KVCache((_Array(nbytes // 8),), (_Array(nbytes // 8),), 64)
    lp = np.zeros((len(tokens) - 1,), np.float32) if scores else None
    return PrefixEntry(device, tuple(tokens), cache, lp, None if lp is None else lp > 0, static)


def test_longest_whole_block_prefix_lru_and_budgets():
    from jaxgen.runtime.prefix_cache import PrefixCache, block_keys, exact_key

    assert len(block_keys(list(range(10)), 4)) == 2
    assert block_keys(list(range(8)), 4) == block_keys(list(range(12)), 4)[:2]
    assert exact_key(list(range(8)), 4) == block_keys(list(range(8)), 4)[-1]
    assert exact_key(list(range(9)), 4) != exact_key(list(range(8)), 4)

    cache = PrefixCache(block=4, max_bytes=1000, static_entries=1)
    seq = list(range(20))
    cache.put(_entry("cpu:0", seq[:4]))
    cache.put(_entry("cpu:0", seq[:12]))
    assert cache.longest("cpu:0", seq, 20).length == 12
    assert cache.longest("cpu:0", seq, 11).length == 4  # no longer than the limit
    assert cache.longest("cpu:1", seq, 20) is None  # per device
    assert cache.longest("cpu:0", seq, 20, need_scores=True) is None
    assert cache.longest("cpu:0", [99] + seq[1:], 20) is None
    cache.put(_entry("cpu:0", seq[:8], scores=True))
    assert cache.longest("cpu:0", seq, 20, need_scores=True).length == 8
    # 3 entries x 400 bytes > 1000: the least recently used (the 12-token one: the 4-token one was found last) went
    assert cache.count() == 2 and cache.nbytes("cpu:0") == 800
    assert cache.longest("cpu:0", seq, 20).length == 8 and cache.longest("cpu:0", seq, 7).length == 4
    cache.put(_entry("cpu:1", seq[:4]))  # another device's budget
    assert cache.count() == 3
    # static prompts: any length, exact lookups, at most static_entries per device
    cache.put(_entry("cpu:0", seq[:5], nbytes=8, static=True))
    cache.put(_entry("cpu:0", seq[:6], nbytes=8, static=True))
    assert cache.get("cpu:0", seq[:5]) is None and cache.get("cpu:0", seq[:6]).length == 6
    assert cache.count(static=True) == 1
    # an entry without scores does not replace one with them
    kept = cache.put(_entry("cpu:0", seq[:8]))
    assert kept.has_scores
    cache.clear(static=True)
    assert cache.count(static=True) == 0 and cache.count() == 3
    cache.clear()
    assert cache.count() == 0
