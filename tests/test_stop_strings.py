"""Stop strings (`stop_strings=`): the per-token progress tables against a direct search of the
text, and generation with every search mode, the scheduler, a static prompt and streaming on the
tiny SentencePiece model (`cli_tiny_model`); one slow test on the default model.

The reference for greedy, sampling, prompt lookup, the scheduler and streaming: the output
without stop strings, cut after the first token whose text (the concatenation of the generated
tokens' texts) contains a stop string.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from jaxgen.runtime.stops import StopTables, check_stop_strings, token_texts

SP = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581Q", ":", "\u2581", "<0x0A>", "Q:", "\u2581a", "b", "ab", "a",
      "\nQ", "<0xC3>", "<0xA9>", "\u00e9", "\u2581\u2581"]
BPE = ["<|endoftext|>", "\u0120Q", ":", "\u0120", "\u010a", "Q:", "\u0120a", "b", "ab", "a", "\u010aQ",
       "\u00c3", "\u00a9", "\u00c3\u00a9", "<|im_end|>"]


def _reference_hit(texts, strings, seq):
    """Index of the first token of `seq` after which the text contains a string, else None."""
    text = b""
    for k, t in enumerate(seq):
        text += texts[t]
        if any(s.encode("utf-8") in text for s in strings):
            return k
    return None


def _table_hit(table, lengths, seq):
    progress = np.zeros(len(lengths), np.int64)
    for k, t in enumerate(seq):
        progress = np.array([table[i, min(progress[i], table.shape[1] - 1), t] for i in range(len(lengths))])
        if np.any((progress == lengths) & (lengths > 0)):
            return k
    return None


def test_token_texts_read_each_vocabulary_kind():
    sp = token_texts(SP, silent=[1])
    assert sp[4] == b" Q" and sp[7] == b"\n" and sp[14] == b"\xc3" and sp[16] == "\u00e9".encode() and sp[1] == b""
    assert sp[17] == b"  "
    bpe = token_texts(BPE)
    assert bpe[1] == b" Q" and bpe[4] == b"\n" and bpe[13] == "\u00e9".encode() and bpe[11] == b"\xc3"
    assert bpe[0] == b"<|endoftext|>"  # an added token is its text
    assert token_texts(["hello", "world"]) == [b"hello", b"world"]


@pytest.mark.parametrize("vocab", [SP, BPE], ids=["sentencepiece", "byte-level"])
def test_tables_match_a_direct_search(vocab):
    """Strings that span tokens, end inside a token, hold a multi-byte character split over byte
    tokens, overlap themselves (KMP fallbacks): the table ends exactly where the text first holds one."""
    texts = token_texts(vocab, silent=[1])
    strings = ("\nQ:", "ab", "\u00e9!", "a\u00e9", "aab", " Q:Q")
    table, lengths = StopTables(vocab, [1]).tables(strings)
    assert table.shape[0] == 8 and table.dtype == np.int8 and list(lengths[:6]) == [3, 2, 3, 3, 3, 4]
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        seq = [rng.randrange(len(vocab)) for _ in range(rng.randrange(1, 9))]
        expected = _reference_hit(texts, strings, seq)
        assert _table_hit(table, lengths, seq) == expected, seq
        hits += expected is not None
    assert hits > 200  # the sequences did exercise completions


def test_silent_tokens_do_not_advance():
    table, lengths = StopTables(SP).tables(("ab",), silent=[10])  # "b" silenced for this call
    assert _table_hit(table, lengths, [12, 10, 10, 11]) == 3
    assert _table_hit(table, lengths, [12, 10]) is None


def test_validation():
    assert check_stop_strings(None) == () and check_stop_strings("x") == ("x",)
    assert check_stop_strings(["a", "b", "a"]) == ("a", "b")
    with pytest.raises(ValueError, match=r"stop_strings\[1\] is empty"):
        check_stop_strings(["a", ""])
    with pytest.raises(TypeError, match=r"stop_strings\[0\] must be a str"):
        check_stop_strings([3])
    with pytest.raises(TypeError, match="stop_strings must be"):
        check_stop_strings({"a"})
    with pytest.raises(ValueError, match="longer than"):
        check_stop_strings(["x" * 300])


# ---------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny(cli_tiny_model):
    from jaxgen import Generator
    from jaxgen.tokenizer import load_tokenizer

    return Generator(cli_tiny_model), load_tokenizer(cli_tiny_model)


PROMPTS = ["the quick brown fox", "hello world, this is", "a static prompt is"]


def _prompts(tok):
    return [tok.encode(p, add_special_tokens=True) for p in PROMPTS]


def _texts(gen):
    return token_texts(gen.vocabulary.tokens, [gen.vocabulary.id_of("<eos>")])


def _cut(texts, ids, strings):
    k = _reference_hit(texts, strings, ids)
    return ids if k is None else ids[:k + 1]


def _pick_strings(texts, ids):
    """Stop strings from the free output: one spanning a token boundary late in the text, one
    ending inside a token (a token's first character, after a few tokens)."""
    text = b"".join(texts[t] for t in ids).decode("utf-8", "replace")
    cut = sum(len(texts[t]) for t in ids[:len(ids) // 2])
    spanning = text[cut - 2:cut + 2]
    inner = texts[ids[3]].decode("utf-8")[:1]
    return spanning, inner


FREE = dict(max_length=24, include_prompt_in_result=False, end_token=[])


@pytest.mark.parametrize("mode", [dict(), pytest.param(dict(sampling_topk=0, sampling_temperature=1.5, random_seed=7),
                                                       marks=pytest.mark.slow),
                                  dict(prompt_lookup_tokens=3)], ids=["greedy", "sampling", "prompt-lookup"])
def test_generation_stops_at_the_first_completing_token(tiny, mode):
    gen, tok = tiny
    texts = _texts(gen)
    prompts = _prompts(tok)
    free = [r.sequences_ids[0] for r in gen.generate_batch(prompts, **FREE, **mode)]
    checked = 0
    for strings_of in (lambda ids: _pick_strings(texts, ids)[:1], lambda ids: _pick_strings(texts, ids)[1:]):
        # One call (a sampled row's key depends on its index in the call), every row's strings.
        strings = [s for ids in free for s in strings_of(ids)]
        out = [r.sequences_ids[0] for r in gen.generate_batch(prompts, stop_strings=strings, **FREE, **mode)]
        for ids, got in zip(free, out):
            assert got == _cut(texts, ids, strings), (strings, ids, got)
            checked += len(got) < len(ids)
    assert checked >= 3  # stops did shorten outputs


def test_several_strings_the_earliest_wins_in_a_batch(tiny):
    gen, tok = tiny
    texts = _texts(gen)
    prompts = _prompts(tok)
    free = [r.sequences_ids[0] for r in gen.generate_batch(prompts, **FREE)]
    strings = [s for ids in free for s in _pick_strings(texts, ids)]
    out = [r.sequences_ids[0] for r in gen.generate_batch(prompts, stop_strings=strings, **FREE)]
    assert out == [_cut(texts, ids, strings) for ids in free]


def test_scheduler_and_static_batches_agree(tiny, cli_tiny_model):
    from jaxgen import Generator

    gen, tok = tiny
    texts = _texts(gen)
    prompts = _prompts(tok) * 3
    free = [r.sequences_ids[0] for r in gen.generate_batch(prompts, **FREE)]
    strings = list(_pick_strings(texts, free[0])) + [_pick_strings(texts, free[1])[0]]
    expected = [_cut(texts, ids, strings) for ids in free]
    scheduled = [r.sequences_ids[0] for r in gen.generate_iterable(prompts, max_batch_size=2, stop_strings=strings,
                                                                    **FREE)]
    assert scheduled == expected
    static = Generator(cli_tiny_model, continuous_batching=False)
    assert [r.sequences_ids[0] for r in static.generate_batch(prompts, stop_strings=strings, **FREE)] == expected


def test_static_prompt(tiny):
    gen, tok = tiny
    texts = _texts(gen)
    static = tok.encode("perplexity is the exponential", add_special_tokens=True)
    prompts = [tok.encode(" of the", add_special_tokens=False)]
    free = gen.generate_batch(prompts, static_prompt=static, **FREE)[0].sequences_ids[0]
    strings = list(_pick_strings(texts, free))
    out = gen.generate_batch(prompts, static_prompt=static, stop_strings=strings, **FREE)[0].sequences_ids[0]
    assert out == _cut(texts, free, strings) and len(out) < len(free)


def test_generate_tokens_marks_the_stop_token_last(tiny):
    gen, tok = tiny
    texts = _texts(gen)
    prompt = _prompts(tok)[0]
    free = gen.generate_batch([prompt], **FREE)[0].sequences_ids[0]
    strings = [_pick_strings(texts, free)[0]]
    steps = list(gen.generate_tokens(prompt, max_length=24, end_token=[],
                                     stop_strings=strings))
    expected = _cut(texts, free, strings)
    assert [s.token_id for s in steps] == expected
    assert [s.is_last for s in steps] == [False] * (len(expected) - 1) + [True]


def test_beam_search_hypotheses_end_at_their_first_stop(tiny):
    """Each hypothesis either ends at the token that first completes a string or runs to
    max_length without one; with strings taken from the free best hypothesis, some end early."""
    gen, tok = tiny
    texts = _texts(gen)
    prompts = _prompts(tok)
    opts = dict(FREE, beam_size=3, num_hypotheses=3)
    free = [r.sequences_ids for r in gen.generate_batch(prompts, **opts)]
    strings = [s for hyps in free for s in _pick_strings(texts, hyps[0])][:4]
    results = gen.generate_batch(prompts, stop_strings=strings, return_scores=True, **opts)
    shortened = 0
    for r in results:
        for ids in r.sequences_ids:
            k = _reference_hit(texts, strings, ids)
            assert (k == len(ids) - 1) if k is not None else len(ids) == 24, (ids, strings)
            shortened += len(ids) < 24
    assert shortened >= 2


def test_bad_stop_strings_raise_before_work_and_the_generator_stays_usable(tiny):
    gen, tok = tiny
    prompt = _prompts(tok)[0]
    with pytest.raises(ValueError, match="empty"):
        gen.generate_batch([prompt], stop_strings=[""], **FREE)
    with pytest.raises(TypeError, match="stop_strings"):
        gen.generate_batch([prompt], stop_strings=[b"x"], **FREE)
    with pytest.raises(TypeError, match="stop_strings"):
        gen.generate_iterable([prompt], stop_strings=5, **FREE)
    assert len(gen.generate_batch([prompt], stop_strings="zz", **FREE)[0].sequences_ids[0]) > 0


@pytest.mark.slow
def test_default_model_stops_on_text(default_model_dir):
    """Gemma 3 270M: stop strings that span tokens and end inside one, greedy and beam search."""
    from jaxgen import Generator
    from jaxgen.tokenizer import load_tokenizer

    gen, tok = Generator(default_model_dir), load_tokenizer(default_model_dir)
    texts = token_texts(gen.vocabulary.tokens, [gen.vocabulary.id_of(t) for t in ("<eos>", "<end_of_turn>")])
    prompt = tok.encode("Q: Name three colours.\nA: Red, green and blue.\nQ: Name three fruits.\nA:",
                        add_special_tokens=True)
    opts = dict(max_length=40, include_prompt_in_result=False)
    free = gen.generate_batch([prompt], **opts)[0].sequences_ids[0]
    text = tok.decode(free)
    strings = ["\nQ:", ", b"] if "\nQ:" in text else [text[len(text) // 2:len(text) // 2 + 3]]
    out = gen.generate_batch([prompt], stop_strings=strings, **opts)[0].sequences_ids[0]
    assert out == _cut(texts, free, strings) and len(out) < len(free)
    cut = tok.decode(out)
    assert any(cut.endswith(s) or s in cut[-len(s) - len(tok.decode(out[-1:])):] for s in strings)
    beam = gen.generate_batch([prompt], stop_strings=strings, beam_size=2, **opts)[0].sequences_ids[0]
    k = _reference_hit(texts, strings, beam)
    assert k is None or k == len(beam) - 1


def test_cli_stop(cli_tiny_model):
    """`jaxgen generate --stop` (repeatable, escapes read): the printed continuation is the
    streamed one cut after the token that completes the earliest string."""
    from test_cli import run_cli

    args = ("generate", "--model", cli_tiny_model, "--max-length", "24", "--no-echo", "the quick brown fox")
    free = run_cli(*args)
    assert free.returncode == 0, free.stderr
    text = free.stdout.rstrip("\n")
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = run_cli(*args, "--stop", stop, "--stop", "\\nzzz")
    assert cut.returncode == 0, cut.stderr
    out = cut.stdout.rstrip("\n")
    assert stop in out and text.startswith(out) and len(out) < len(text)
    assert len(out) - (out.index(stop) + len(stop)) < 10  # at most the rest of the completing token follows
