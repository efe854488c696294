"""Checkpoint forms of the parallel-residual families (converters/loaders/parallel.py) that
save_pretrained of transformers 5 no longer writes but hub checkpoints carry, and the options the
converter refuses. The families themselves run against HF in tests/test_architectures.py."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jaxgen  # noqa: E402
from jaxgen.converters import TransformersConverter  # noqa: E402
from jaxgen.model.config import ModelConfig  # noqa: E402


def _copy(src: str, dst: str, edit_config) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    edit_config(config)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return dst


def test_gpt_neox_pythia_style_checkpoint(hf_tiny_model, tmp_path):
    """Pythia / StableLM tuned alpha: rotary_pct and rotary_emb_base at the top level of
    config.json (no rope_parameters); and the head under its other name (save_pretrained writes
    embed_out, as hub checkpoints have it; lm_head is the module's name)."""
    from safetensors.numpy import load_file, save_file

    tiny = hf_tiny_model("gpt_neox-sequential")  # rotary_pct 0.5 and base 100, neither the default

    def old_style(config):
        params = config.pop("rope_parameters")
        config.update(rotary_pct=params["partial_rotary_factor"], rotary_emb_base=params["rope_theta"])

    src = _copy(tiny.path, str(tmp_path / "hf"), old_style)
    weights_path = os.path.join(src, "model.safetensors")
    weights = load_file(weights_path)
    weights["lm_head.weight"] = weights.pop("embed_out.weight")
    save_file(weights, weights_path, metadata={"format": "pt"})

    path = TransformersConverter(src).convert(str(tmp_path / "jaxgen"))
    config = ModelConfig.load(path)
    assert (config.rotary_dim, config.rope_theta, config.block) == (8, 100.0, "sequential")
    batch = tiny.batch()
    got = jaxgen.Generator(path).forward_batch(batch)
    want = tiny.logits(batch)
    diff = max(np.abs(np.asarray(got)[i, :len(s)] - want[i, :len(s)]).max() for i, s in enumerate(batch))
    assert diff <= 1e-3


@pytest.mark.parametrize("arch", ["stablelm", "phi"])
def test_qk_layernorm_is_refused_by_name(arch, hf_tiny_model, tmp_path):
    src = _copy(hf_tiny_model(arch).path, str(tmp_path / "hf"), lambda c: c.update(qk_layernorm=True))
    with pytest.raises(ValueError, match="qk_layernorm"):
        TransformersConverter(src).convert(str(tmp_path / "jaxgen"))
    assert not os.path.exists(tmp_path / "jaxgen" / "config.json")
