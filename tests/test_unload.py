"""unload_model / load_model (CTranslate2 §1.2)."""

import numpy as np
import pytest

import jaxgen

from tests.multidevice_worker import PROMPTS, build


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("unload") / "model")
    build(directory)
    return jaxgen.Generator(directory)


def test_unload_to_cpu_on_cpu_does_nothing(generator):
    generator.unload_model(to_cpu=True)
    assert generator.model_is_loaded
    assert generator.generate_batch(PROMPTS[:1], max_length=2)[0].sequences_ids


def test_unload_then_load_gives_the_same_answers(generator):
    before = generator.generate_batch(PROMPTS, max_length=6, return_scores=True)
    generator.unload_model()
    assert not generator.model_is_loaded
    for call in (lambda: generator.generate_batch(PROMPTS), lambda: generator.score_batch(PROMPTS),
                 lambda: generator.forward_batch(PROMPTS)):
        with pytest.raises(RuntimeError, match="unloaded"):
            call()
    generator.load_model()
    assert generator.model_is_loaded
    after = generator.generate_batch(PROMPTS, max_length=6, return_scores=True)
    for a, b in zip(before, after):
        assert a.sequences_ids == b.sequences_ids
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_unload_clears_the_static_prompt_cache(generator):
    generator.generate_batch(PROMPTS[:1], max_length=2, static_prompt=["<s>", "t9"])
    assert generator.prefix_cache.count(static=True)
    generator.unload_model()
    assert not generator.prefix_cache.count()
    generator.load_model()
