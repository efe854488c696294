"""Inputs past the model's context (config.max_position_embeddings, 512 for the tiny CLI model):
every entry point raises ValueError naming both lengths before any work, the Generator stays
usable, and Generator(context_length=N) lifts the limit on purpose."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgen.runtime.options import GenerationOptions, positions_fed

CONTEXT = 512  # the tiny CLI model's max_position_embeddings


@pytest.fixture(scope="module")
def generator(cli_tiny_model):
    import jaxgen

    gen = jaxgen.Generator(cli_tiny_model)
    assert gen.context_length == gen.config.max_position_embeddings == CONTEXT
    return gen


def _prompt(gen, n: int):
    """<bos> and n - 1 copies of an ordinary token."""
    return ["<bos>"] + [gen.vocabulary.tokens[10]] * (n - 1)


def _still_works(gen):
    out = gen.generate_batch([_prompt(gen, 3)], max_length=2, include_prompt_in_result=False)
    assert len(out[0].sequences_ids[0]) == 2


def test_positions_fed_counts_as_ctranslate2():
    """include_prompt_in_result=True: max_length counts the prompt but its first token."""
    assert positions_fed(10, GenerationOptions(max_length=20, include_prompt_in_result=False)) == 29
    assert positions_fed(10, GenerationOptions(max_length=20)) == 20  # 21 tokens, the last one not fed
    assert positions_fed(30, GenerationOptions(max_length=20)) == 29  # the prompt is longer than max_length
    assert positions_fed(10, GenerationOptions(max_length=20), static_length=5) == 25


@pytest.mark.parametrize("kwargs, n, fed", [
    (dict(max_length=20, include_prompt_in_result=False), 500, 519),  # 500 + 20 - 1
    (dict(max_length=600), 10, 600),  # max_length counts the prompt: 601 tokens, the last one not fed
    (dict(max_length=20, include_prompt_in_result=False, beam_size=2), 500, 519),
    (dict(max_length=20, include_prompt_in_result=False, static_prompt=["<bos>"] * 10), 500, 529),
])
def test_generate_batch(generator, kwargs, n, fed):
    with pytest.raises(ValueError, match=f"feeds the model {fed} positions, past its context length of {CONTEXT}"):
        generator.generate_batch([_prompt(generator, 3), _prompt(generator, n)], **kwargs)
    _still_works(generator)


def test_generate_batch_names_the_prompt(generator):
    with pytest.raises(ValueError, match=r"start_tokens\[1\] \(513 tokens\) with max_length=1"):
        generator.generate_batch([_prompt(generator, 3), _prompt(generator, 513)], max_length=1,
                                 include_prompt_in_result=False)


def test_generate_batch_at_the_limit_runs(generator):
    """500 + 13 - 1 = 512 positions: allowed, and runs."""
    out = generator.generate_batch([_prompt(generator, 500)], max_length=13, include_prompt_in_result=False,
                                   end_token=[])
    assert len(out[0].sequences_ids[0]) == 13


def test_generate_tokens(generator):
    """The error comes from the call itself, not from iterating."""
    with pytest.raises(ValueError, match=f"feeds the model 519 positions, past its context length of {CONTEXT}"):
        generator.generate_tokens(_prompt(generator, 500), max_length=20)
    _still_works(generator)


@pytest.mark.parametrize("extra", [{}, {"beam_size": 2}])  # the slot scheduler, and static sub-batches
def test_generate_iterable(generator, extra):
    """The slot scheduler yields the results before the bad prompt, then raises; static sub-batches
    (read in chunks, as CTranslate2 does) raise for the chunk that holds it."""
    prompts = [_prompt(generator, 3), _prompt(generator, 500), _prompt(generator, 4)]
    results = generator.generate_iterable(iter(prompts), max_batch_size=1, max_length=20,
                                          include_prompt_in_result=False, **extra)
    done = []
    with pytest.raises(ValueError, match=f"519 positions, past its context length of {CONTEXT}"):
        for result in results:
            done.append(result)
    assert len(done) == (0 if extra else 1)
    _still_works(generator)


def test_score_batch(generator):
    long = _prompt(generator, 514)  # 513 positions fed (the last token is only a target)
    with pytest.raises(ValueError, match=rf"tokens\[1\] \(514 tokens after max_input_length\) feeds the model "
                                         rf"513 positions, past its context length of {CONTEXT}"):
        generator.score_batch([_prompt(generator, 5), long], max_input_length=0)
    out = generator.score_batch([long], max_input_length=513)  # truncated: 512 positions
    assert len(out[0].log_probs) == 512
    _still_works(generator)


def test_forward_batch(generator):
    with pytest.raises(ValueError, match=rf"inputs\[0\] \(513 tokens\) feeds the model 513 positions"):
        generator.forward_batch([_prompt(generator, 513), _prompt(generator, 2)])
    ids = np.full((2, 520), 10, np.int32)
    with pytest.raises(ValueError, match=f"513 positions, past its context length of {CONTEXT}"):
        generator.forward_batch(ids, lengths=[4, 513])
    assert generator.forward_batch(ids, lengths=[4, 512]).shape[1] == 512


def test_context_length_opt_in(cli_tiny_model, generator):
    """Generator(context_length=N) runs past max_position_embeddings (RoPE extrapolation)."""
    import jaxgen

    extended = jaxgen.Generator(cli_tiny_model, context_length=1024)
    assert extended.context_length == 1024
    out = extended.generate_batch([_prompt(generator, 500)], max_length=20, include_prompt_in_result=False,
                                  end_token=[])
    assert len(out[0].sequences_ids[0]) == 20
    with pytest.raises(ValueError, match="past its context length of 1024"):
        extended.forward_batch([_prompt(generator, 1025)])


@pytest.mark.parametrize("value, error", [(0, ValueError), (True, TypeError), (1.5, TypeError), ("8", TypeError)])
def test_context_length_checked(cli_tiny_model, value, error):
    import jaxgen

    with pytest.raises(error, match="context_length"):
        jaxgen.Generator(cli_tiny_model, context_length=value)
