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
