"""Bad generation inputs (spec §2.1, §7): CTranslate2's exception class, a message naming the
problem, raised before any work starts (no callback, no job, also with asynchronous=True), and the
Generator answers correctly afterwards (a reference call is repeated after every bad one).

Each case also runs CTranslate2 and asserts that it raises the same class (ValueError for bad
values, TypeError for wrong types -- including negative values of its unsigned parameters).
CTranslate2 raises most ValueErrors in its worker (i.e. from `.result()` with asynchronous=True);
jaxgen validates in the calling thread, before anything is queued.
"""

from __future__ import annotations

import pytest

from generation_fixtures import EOS, ModelPair, gen_pair  # noqa: F401 (gen_pair is a fixture)

GOOD = [["<bos>", "t5", "t9", "t20"], ["<bos>", "t7"]]
GOOD_KWARGS = dict(max_length=8, return_scores=True)


@pytest.fixture(scope="module")
def pair(gen_pair) -> ModelPair:
    return gen_pair("llama")


@pytest.fixture(scope="module")
def reference(pair):
    return pair.jaxgen.generate_batch(GOOD, **GOOD_KWARGS)


def assert_still_works(pair: ModelPair, reference) -> None:
    again = pair.jaxgen.generate_batch(GOOD, **GOOD_KWARGS)
    assert [r.sequences_ids for r in again] == [r.sequences_ids for r in reference]
    assert [r.scores[0] for r in again] == pytest.approx([r.scores[0] for r in reference], abs=1e-6)
    assert pair.jaxgen.num_active_batches == 0


P = [["<bos>", "t5", "t9"]]
CASES = [
    # (id, start_tokens, kwargs, exception, message regex)
    ("empty_prompt", [["<bos>"], []], {}, ValueError, "One input has no decoder start token"),
    ("empty_prompt_no_prompt_in_result", [[]], {"include_prompt_in_result": False}, ValueError,
     "One input has no decoder start token"),  # spec §11 Q2: undefined upstream
    ("batch_type", P, {"batch_type": "sentences"}, ValueError, "Invalid batch type: sentences"),
    ("beam_size_0", P, {"beam_size": 0}, ValueError, "beam_size"),
    ("num_hypotheses_0", P, {"num_hypotheses": 0}, ValueError, "num_hypotheses"),
    ("patience_0", P, {"patience": 0}, ValueError, "patience"),
    ("patience_negative", P, {"patience": -1.0, "beam_size": 2}, ValueError, "patience"),
    ("max_length_0", P, {"max_length": 0}, ValueError, "max_length"),
    ("min_length_gt_max_length", P, {"min_length": 5, "max_length": 4}, ValueError, "min_length"),
    ("repetition_penalty_0", P, {"repetition_penalty": 0}, ValueError, "repetition_penalty"),
    ("repetition_penalty_negative", P, {"repetition_penalty": -1.5}, ValueError, "repetition_penalty"),
    ("topp_0", P, {"sampling_topp": 0, "sampling_topk": 5}, ValueError, "sampling_topp"),
    ("topp_gt_1", P, {"sampling_topp": 1.5}, ValueError, "sampling_topp"),
    ("alternative_prob_negative", P, {"return_alternatives": True, "min_alternative_expansion_prob": -0.1},
     ValueError, "min_alternative_expansion_prob"),
    ("alternative_prob_gt_1", P, {"return_alternatives": True, "min_alternative_expansion_prob": 1.5,
                                  "num_hypotheses": 2}, ValueError, "min_alternative_expansion_prob"),
    ("num_hypotheses_gt_beam", P, {"beam_size": 2, "num_hypotheses": 3}, ValueError,
     "The number of hypotheses cannot be greater than beam_size \\* patience"),
    ("num_hypotheses_gt_beam_patience", P, {"beam_size": 3, "patience": 1.5, "num_hypotheses": 6}, ValueError,
     "The number of hypotheses cannot be greater than beam_size \\* patience"),
    ("callback_with_beam", P, {"beam_size": 2, "callback": lambda step: False}, ValueError,
     "The callback function is not compatible with beam_size > 1"),
    ("topk_gt_vocabulary", P, {"sampling_topk": 161}, ValueError,
     "sampling_topk option \\(161\\) is greater than the vocabulary size \\(160\\)"),
    ("end_token_unknown", P, {"end_token": "zzz"}, ValueError, "Token zzz is not in the vocabulary"),
    ("end_token_list_unknown", P, {"end_token": ["t5", "zzz"]}, ValueError, "Token zzz is not in the vocabulary"),
    ("suppress_unknown", P, {"suppress_sequences": [["t5"], ["t6", "zzz"]]}, ValueError,
     "Token zzz is not in the vocabulary"),
    # wrong types
    ("start_tokens_str", "abc", {}, TypeError, "start_tokens"),
    ("prompt_str", ["<bos>", "t5"], {}, TypeError, "start_tokens"),
    ("prompt_ids", [[2, 5]], {}, TypeError, "start_tokens"),
    ("prompt_mixed", [["<bos>", 5]], {}, TypeError, "start_tokens"),
    ("beam_size_str", P, {"beam_size": "2"}, TypeError, "beam_size"),
    ("beam_size_negative", P, {"beam_size": -1}, TypeError, "beam_size"),
    ("max_length_float", P, {"max_length": 5.0}, TypeError, "max_length"),
    ("max_length_negative", P, {"max_length": -1}, TypeError, "max_length"),
    ("min_length_negative", P, {"min_length": -1}, TypeError, "min_length"),
    ("no_repeat_ngram_negative", P, {"no_repeat_ngram_size": -2}, TypeError, "no_repeat_ngram_size"),
    ("topk_negative", P, {"sampling_topk": -1}, TypeError, "sampling_topk"),
    ("max_batch_size_negative", P, {"max_batch_size": -1}, TypeError, "max_batch_size"),
    ("length_penalty_str", P, {"length_penalty": "1"}, TypeError, "length_penalty"),
    ("end_token_int", P, {"end_token": 5}, TypeError, "end_token"),
    ("end_token_mixed", P, {"end_token": ["t5", 3]}, TypeError, "end_token"),
    ("suppress_flat", P, {"suppress_sequences": ["t5"]}, TypeError, "suppress_sequences"),
    ("suppress_ids", P, {"suppress_sequences": [[5]]}, TypeError, "suppress_sequences"),
    ("static_prompt_str", P, {"static_prompt": "abc"}, TypeError, "static_prompt"),
    ("static_prompt_ids", P, {"static_prompt": [1, 2]}, TypeError, "static_prompt"),
    ("disable_unk_str", P, {"disable_unk": "yes"}, TypeError, "disable_unk"),
    ("callback_not_callable", P, {"callback": 5}, TypeError, "callback"),
    ("unknown_keyword", P, {"coverage_penalty": 0.1}, TypeError, "coverage_penalty"),  # Translator-only option
]


@pytest.mark.parametrize("start_tokens,kwargs,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(pair, reference, start_tokens, kwargs, exc, match):
    kwargs = dict(kwargs)
    kwargs.setdefault("max_length", 4)
    # CTranslate2 raises the same class (except Q2, whose upstream behaviour is undefined).
    with pytest.raises(exc):
        out = pair.ct2.generate_batch(start_tokens, **kwargs)
        [r.sequences for r in out]
    calls = []
    if "callback" not in kwargs and kwargs.get("beam_size", 1) == 1:
        kwargs["callback"] = calls.append
    for asynchronous in (False, True):
        with pytest.raises(exc, match=match):
            pair.jaxgen.generate_batch(start_tokens, asynchronous=asynchronous, **kwargs)
    assert calls == [] and pair.jaxgen.num_active_batches == 0  # no work started
    assert_still_works(pair, reference)


def test_bad_option_in_a_batch_of_good_prompts_starts_nothing(pair, reference):
    calls = []
    with pytest.raises(ValueError, match="Token zzz"):
        pair.jaxgen.generate_batch(GOOD * 4, max_batch_size=1, end_token=["zzz"], callback=calls.append,
                                   asynchronous=True)
    assert calls == [] and pair.jaxgen.num_active_batches == 0
    assert_still_works(pair, reference)


def test_empty_batch_is_not_validated(pair):
    """Spec §2.1: [] returns [] without validating the other arguments (as CTranslate2)."""
    for kwargs in ({"beam_size": 0}, {"batch_type": "sentences"}, {"end_token": "zzz"}):
        assert pair.ct2.generate_batch([], **kwargs) == []
        assert pair.jaxgen.generate_batch([], **kwargs) == []
    assert list(pair.jaxgen.generate_tokens([])) == list(pair.ct2.generate_tokens([])) == []


def test_values_that_are_not_errors(pair, reference):
    """Unknown prompt / static-prompt tokens map to <unk>; end-token ids are not validated;
    min_alternative_expansion_prob is only checked with return_alternatives; top-k = V is allowed."""
    jg = pair.jaxgen
    unk = jg.generate_batch([["<bos>", "zzz"]], max_length=4)
    assert unk[0].sequences_ids == jg.generate_batch([["<bos>", "<unk>"]], max_length=4)[0].sequences_ids
    static = jg.generate_batch(P, static_prompt=["yyy"], max_length=4)
    assert static[0].sequences_ids == jg.generate_batch(P, static_prompt=["<unk>"], max_length=4)[0].sequences_ids
    # An end id outside the vocabulary never matches (CTranslate2 accepts it too, but then reads
    # out of bounds: its results vary from call to call, so it is not run here).
    out = jg.generate_batch(GOOD, end_token=[100_000, -1], max_length=12, return_scores=True)
    assert_results_equal_ids(out, jg.generate_batch(GOOD, end_token=[], max_length=12, return_scores=True))
    for kwargs in ({"min_alternative_expansion_prob": 1.5}, {"sampling_topk": 160}):
        jg.generate_batch(P, max_length=4, **kwargs)
        pair.ct2.generate_batch(P, max_length=4, **kwargs)
    # num_hypotheses > beam_size * patience is allowed with return_alternatives or with sampling.
    from jaxgen.runtime.options import GenerationOptions, validate_options

    for kwargs in ({"beam_size": 2, "num_hypotheses": 3, "return_alternatives": True},
                   {"num_hypotheses": 4, "sampling_topk": 0}):
        validate_options(GenerationOptions(**kwargs), jg.vocabulary, [EOS])
        pair.ct2.generate_batch(P, max_length=4, **kwargs)
    assert_still_works(pair, reference)


def assert_results_equal_ids(actual, expected):
    assert [r.sequences_ids for r in actual] == [r.sequences_ids for r in expected]


# ---------------------------------------------------------------------------- streaming / iterables
@pytest.mark.parametrize("kwargs,exc", [
    ({"max_length": 0}, ValueError), ({"end_token": "zzz"}, ValueError), ({"sampling_topp": 2.0}, ValueError),
    ({"min_length": 9, "max_length": 3}, ValueError), ({"suppress_sequences": [["zzz"]]}, ValueError),
    ({"repetition_penalty": "1"}, TypeError), ({"batch_type": "sentences"}, ValueError),
])
def test_generate_tokens_validates_before_streaming(pair, reference, kwargs, exc):
    with pytest.raises(exc):
        list(pair.ct2.generate_tokens(P[0], **kwargs))  # CTranslate2: when iterated
    with pytest.raises(exc):
        pair.jaxgen.generate_tokens(P[0], **kwargs)  # jaxgen: when called
    with pytest.raises(ValueError, match="One input has no decoder start token"):
        pair.jaxgen.generate_tokens([["<bos>"], []])
    assert_still_works(pair, reference)


@pytest.mark.parametrize("method", ["generate_iterable", "score_iterable"])
def test_iterables_check_batching_options(pair, method):
    for kwargs, match in (({"max_batch_size": 0}, "max_batch_size must be >= 1"),
                          ({"batch_type": "sentences"}, "Invalid batch type")):
        for engine in (pair.ct2, pair.jaxgen):
            with pytest.raises(ValueError, match=match):
                list(getattr(engine, method)(iter(GOOD), **kwargs))


# ---------------------------------------------------------------------------- errors during work
class CallbackError(Exception):
    pass


def test_callback_exception_propagates(pair, reference):
    def callback(step):
        if step.step >= 2:
            raise CallbackError("stop here")

    for engine in (pair.ct2, pair.jaxgen):
        with pytest.raises(CallbackError, match="stop here"):
            engine.generate_batch(GOOD, callback=callback, max_length=8)
    assert_still_works(pair, reference)


def test_failing_sub_batch_fails_only_its_futures(pair, reference):
    """Spec §7: every future of a failed sub-batch carries its exception; others are unaffected."""
    def callback(step):
        if step.batch_id == 1:
            raise CallbackError(f"entry {step.batch_id}")

    prompts = [GOOD[0], GOOD[1], GOOD[0]]
    futures = pair.jaxgen.generate_batch(prompts, max_batch_size=1, asynchronous=True, callback=callback,
                                         **GOOD_KWARGS)
    with pytest.raises(CallbackError, match="entry 1"):
        futures[1].result()
    assert futures[0].result().sequences_ids == reference[0].sequences_ids
    assert futures[2].result().sequences_ids == reference[0].sequences_ids
    assert_still_works(pair, reference)


@pytest.mark.parametrize("kwargs", [
    {"max_length": 30, "include_prompt_in_result": False},  # positions 0 .. 100 + 30 - 2 = 128
    {"max_length": 129},  # the prompt is force-decoded: 129 steps
    pytest.param({"max_length": 30, "include_prompt_in_result": False, "beam_size": 2}, marks=pytest.mark.slow),
])
def test_position_past_learned_table(gen_pair, kwargs):
    """Spec §5.6/§7: GPT-2 (128 learned positions) raises RuntimeError when fed position 128, and
    only then (one step less is fine). jaxgen refuses such a call before any work (ValueError, its
    context-length check); with the check lifted (Generator(context_length=...)) it raises
    CTranslate2's RuntimeError."""
    import jaxgen

    pair = gen_pair("gpt2")
    prompt = [pair.prompt(80, 100, bos=False)]
    message = "No position encodings are defined for positions >= 128, but got position 128"
    ok = dict(kwargs, max_length=kwargs["max_length"] - 1)
    with pytest.raises(ValueError, match="feeds the model 129 positions, past its context length of 128"):
        pair.jaxgen.generate_batch(prompt, end_token=[], **kwargs)
    extended = jaxgen.Generator(pair.jaxgen.model_path, context_length=256)
    for engine in (pair.ct2, extended):
        with pytest.raises(RuntimeError, match=message):
            engine.generate_batch(prompt, end_token=[], **kwargs)
        engine.generate_batch(prompt, end_token=[], **ok)
    expected = pair.ct2.generate_batch(prompt, end_token=[], return_scores=True, **ok)
    actual = pair.jaxgen.generate_batch(prompt, end_token=[], return_scores=True, **ok)
    assert actual[0].sequences_ids == expected[0].sequences_ids


def test_unloaded_model(pair):
    """Spec §1.2/§7: generation on an unloaded model raises RuntimeError; after load_model() the
    results are unchanged (own Generators: the shared ones stay loaded)."""
    import time

    import ctranslate2

    import jaxgen

    engines = [ctranslate2.Generator(pair.ct2_dir, intra_threads=1), jaxgen.Generator(pair.jaxgen_dir)]
    for engine in engines:
        before = engine.generate_batch(GOOD, **GOOD_KWARGS)
        deadline = time.monotonic() + 10
        while engine.num_active_batches and time.monotonic() < deadline:  # unloading is a no-op while busy
            time.sleep(0.01)
        engine.unload_model()
        assert not engine.model_is_loaded
        for kwargs in ({}, {"beam_size": 2}, {"asynchronous": True}):
            with pytest.raises(RuntimeError, match="The model for this translator was unloaded"):
                out = engine.generate_batch(GOOD, **dict(GOOD_KWARGS, **kwargs))
                [r.result() for r in out]
        engine.load_model()
        after = engine.generate_batch(GOOD, **GOOD_KWARGS)
        assert [r.sequences_ids for r in after] == [r.sequences_ids for r in before]
