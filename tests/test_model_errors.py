"""Clear errors for a bad model directory and bad forward_batch / score_batch inputs; the
Generator keeps answering afterwards."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxgen

from tests.multidevice_worker import PROMPTS, build


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("errors") / "model")
    build(directory)
    return directory


@pytest.fixture(scope="module")
def generator(model_dir):
    return jaxgen.Generator(model_dir)


def _copy(model_dir: str, tmp_path) -> str:
    target = str(tmp_path / "copy")
    shutil.copytree(model_dir, target)
    return target


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        jaxgen.Generator(str(tmp_path / "nowhere"))


def test_wrong_path_type():
    with pytest.raises(TypeError, match="model_path"):
        jaxgen.Generator(42)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "vocabulary.json"])
def test_missing_file_is_named(model_dir, tmp_path, name):
    copy = _copy(model_dir, tmp_path)
    os.remove(os.path.join(copy, name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        jaxgen.Generator(copy)


def test_bad_json(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    with open(os.path.join(copy, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        jaxgen.Generator(copy)


def test_unknown_format_version(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    path = os.path.join(copy, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["format_version"] = 99
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="format_version 99"):
        jaxgen.Generator(copy)


def test_tensor_of_the_wrong_shape(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    path = os.path.join(copy, "model.safetensors")
    tensors = load_file(path)
    tensors["layers.0.q.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"layers\.0\.q\.weight has shape \(3, 3\)"):
        jaxgen.Generator(copy)


def test_corrupt_weights_file(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    with open(os.path.join(copy, "model.safetensors"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        jaxgen.Generator(copy)


@pytest.mark.parametrize("bad, error, message", [
    ([[]], ValueError, "is empty"),
    ([[1, 10_000]], ValueError, "out of range"),
    ([[-1, 2]], ValueError, "out of range"),
    ([["<s>", 5]], TypeError, "all str or all int"),
    ("<s> t5", TypeError, "list of token lists"),
    ([None], TypeError, "must be a list of tokens"),
    ([], ValueError, "at least one sequence"),
])
def test_forward_batch_bad_inputs(generator, bad, error, message):
    reference = np.asarray(generator.forward_batch([[1, 5, 9]]))
    with pytest.raises(error, match=message):
        generator.forward_batch(bad)
    np.testing.assert_array_equal(np.asarray(generator.forward_batch([[1, 5, 9]])), reference)


@pytest.mark.parametrize("bad, error, message", [
    ([[1, 10_000]], ValueError, "out of range"),
    ([["<s>", 5]], TypeError, "all str or all int"),
    ("<s> t5", TypeError, "list of token lists"),
])
def test_score_batch_bad_inputs(generator, bad, error, message):
    reference = generator.score_batch(PROMPTS)
    with pytest.raises(error, match=message):
        generator.score_batch(bad)
    again = generator.score_batch(PROMPTS)
    assert [r.log_probs for r in again] == [r.log_probs for r in reference]


def test_forward_batch_dense_input_needs_lengths(generator):
    with pytest.raises(ValueError, match="lengths vector is required"):
        generator.forward_batch(np.ones((2, 3), np.int32))
    out = generator.forward_batch(np.array([[1, 5, 9], [1, 8, 0]], np.int32), lengths=[3, 2])
    assert out.shape == (2, 3, generator.config.vocab_size)
