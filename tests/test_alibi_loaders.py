"""What the OPT/BLOOM/MPT/Falcon loaders (converters/loaders/alibi.py) do beyond the parity runs of
test_architectures.py: checkpoint settings transformers ignores but the original code honours,
OPT's LayerNorms without parameters, and the clear errors for settings jaxgen does not run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_models  # noqa: E402

from jaxgen.converters import TransformersConverter  # noqa: E402
from jaxgen.converters.hf_loader import alibi_slopes  # noqa: E402
from jaxgen.model.config import ModelConfig  # noqa: E402


def _edited_copy(tiny, tmp_path, **changes) -> str:
    """A copy of a tiny checkpoint with config.json keys changed (nested dicts merged)."""
    path = str(tmp_path / "hf")
    shutil.copytree(tiny.path, path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for key, value in changes.items():
        config[key] = dict(config.get(key) or {}, **value) if isinstance(value, dict) else value
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return path


def test_mpt_alibi_bias_max_and_logit_scale_follow_the_checkpoint(hf_tiny_model, tmp_path):
    path = _edited_copy(hf_tiny_model("mpt"), tmp_path, attn_config={"alibi_bias_max": 16},
                        logit_scale="inv_sqrt_d_model")
    config = ModelConfig.load(TransformersConverter(path).convert(str(tmp_path / "out")))
    assert config.alibi_slopes == alibi_slopes(6, 16.0, interleave_extra=False)
    assert config.alibi_slopes != alibi_slopes(6, 8.0, interleave_extra=False)
    assert config.logit_scale == pytest.approx(48 ** -0.5)


@pytest.mark.parametrize("arch, changes, message", [
    ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ("mpt", {"attn_config": {"clip_qkv": 6.0}}, "clip_qkv"),
    ("mpt", {"attn_config": {"qk_ln": True}}, "qk_ln"),
    ("mpt", {"no_bias": False}, "no_bias"),
    ("falcon", {"parallel_attn": False}, "parallel_attn"),
])
def test_unsupported_settings_are_value_errors_naming_them(arch, changes, message, hf_tiny_model, tmp_path):
    path = _edited_copy(hf_tiny_model(arch), tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        TransformersConverter(path).convert(str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_opt_layer_norms_without_parameters_match_hf(tmp_path):
    """layer_norm_elementwise_affine=False: HF's LayerNorms have no tensors; jaxgen's get weight 1
    and bias 0."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    import jaxgen

    cfg = OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, layer_norm_elementwise_affine=False, init_std=0.1,
                    pad_token_id=hf_models.PAD, bos_token_id=hf_models.BOS, eos_token_id=hf_models.EOS)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg).eval()
    assert not any("layer_norm" in name for name, _ in model.named_parameters())
    model.save_pretrained(str(tmp_path / "hf"))
    hf_models.write_tokenizer_json(str(tmp_path / "hf"), 280)
    out = TransformersConverter(str(tmp_path / "hf")).convert(str(tmp_path / "out"))
    batch = [[5, 9, 17, 33, 60, 7, 8], [11, 12, 13]]
    ours = np.asarray(jaxgen.Generator(out).forward_batch(batch))
    for row, seq in enumerate(batch):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq])).logits[0].numpy()
        assert np.abs(ours[row, :len(seq)] - ref).max() < 1e-3


_TP_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np, jaxgen
path, batch = sys.argv[1], json.loads(sys.argv[2])
def run(g):
    toks = [g.vocabulary.to_tokens(p) for p in batch]
    logits = np.asarray(g.forward_batch(batch))
    rows = [logits[i, :len(s)].tolist() for i, s in enumerate(batch)]
    gen = [r.sequences_ids for r in g.generate_batch(toks[1:], max_length=8, static_prompt=toks[0][:4],
                                                      include_prompt_in_result=False)]
    return {"logits": rows, "greedy": gen}
out = {"single": run(jaxgen.Generator(path))}
for n in (2, 4):
    out[f"tp{n}"] = run(jaxgen.Generator(path, device_index=list(range(n)), tensor_parallel=True))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # ~2.5 min on 2 shared cores (three generators compile in a subprocess)
def test_alibi_tensor_parallel_matches_one_device(hf_tiny_model, jaxgen_tiny_model):
    """Falcon-RW (ALiBi, 8 heads) sharded over 2 and 4 simulated devices: the slopes follow their
    heads to each device (logits and static-prompt greedy generation as on one device)."""
    import subprocess
    import sys

    tiny = hf_tiny_model("falcon-rw")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", _TP_SCRIPT, jaxgen_tiny_model("falcon-rw"), json.dumps(tiny.batch())],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    for n in (2, 4):
        for a, b in zip(report["single"]["logits"], report[f"tp{n}"]["logits"]):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"tensor parallel over {n} devices")
        assert report[f"tp{n}"]["greedy"] == report["single"]["greedy"]


@pytest.mark.parametrize("arch, old_style", [
    ("falcon", {"model_type": "RefinedWeb", "n_head": 4, "n_head_kv": 2, "n_layer": 2}),
    ("falcon-7b", {"model_type": "RefinedWebModel", "n_head": 4, "n_layer": 2, "multi_query": True,
                   "parallel_attn": True}),
    ("falcon-rw", {"model_type": "RefinedWebModel", "n_head": 8, "n_layer": 2, "alibi": True, "bias": True}),
])
def test_refined_web_configs_convert_like_falcon(arch, old_style, hf_tiny_model, jaxgen_tiny_model, tmp_path):
    """Falcon checkpoints published with their remote code's config (model_type RefinedWeb /
    RefinedWebModel, n_head, n_head_kv, n_layer; RefinedWeb always the new decoder architecture)
    give the same model as transformers' falcon config."""
    from safetensors.numpy import load_file

    tiny = hf_tiny_model(arch)
    path = str(tmp_path / "hf")
    shutil.copytree(tiny.path, path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for key in ("num_attention_heads", "num_kv_heads", "num_hidden_layers", "new_decoder_architecture",
                "multi_query", "parallel_attn", "alibi", "bias", "num_ln_in_parallel_attn"):
        config.pop(key, None)
    config.update(old_style, tie_word_embeddings=config.get("tie_word_embeddings", True))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    ours = TransformersConverter(path).convert(str(tmp_path / "out"))
    reference = jaxgen_tiny_model(arch)
    assert ModelConfig.load(ours).to_dict() == ModelConfig.load(reference).to_dict()
    a, b = load_file(os.path.join(ours, "model.safetensors")), load_file(os.path.join(reference, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
