"""TransformersConverter: tiny random HF checkpoints of every supported architecture, converted and
compared with the HF torch logits on a mixed-length (right-padded) batch.

Tolerances (logits of these tiny models have a standard deviation of about 1.1):
  float32:  max |jaxgen - HF| <= 1e-4 over every valid position (measured <= 5e-6).
  bfloat16: max |jaxgen - HF float32| <= 0.25 (measured <= 0.14).
  int8:     max |jaxgen - HF float32| <= 0.4 (measured <= 0.28: int8 weights, float32 activations
            quantized per row for int8 x int8 -> int32 products; <= 0.26 with weights alone).
  For both low-precision types the next-token argmax must agree with HF float32 on >= 99% of the
  *decisive* positions, those whose HF top-1/top-2 margin exceeds DECISIVE_MARGIN (0.1 for bfloat16,
  0.2 for int8, the typical per-position error), and such positions must be at least a quarter of
  all. Random tiny models have many near-ties, where an argmax flip says nothing about correctness;
  a flip on a decisive position does. (Measured: 100% agreement on decisive positions.)
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_models  # noqa: E402

import jaxgen  # noqa: E402
from jaxgen.converters import TransformersConverter  # noqa: E402
from jaxgen.model.checkpoint import load_model_dir  # noqa: E402
from jaxgen.model.config import ModelConfig  # noqa: E402

# Not in `make test-fast` (every architecture against transformers in torch); `make test` runs it.
pytestmark = pytest.mark.slow

ARCHS = list(hf_models.ARCHITECTURES)
FLOAT32_TOLERANCE = 1e-4
# compute_type -> (max abs logit error, decisive top-2 margin)
LOW_PRECISION = {"bfloat16": (0.25, 0.1), "int8": (0.4, 0.2)}


def _valid_rows(logits: np.ndarray, batch) -> np.ndarray:
    """[B, T, V] -> [positions, V] keeping only each row's valid positions."""
    return np.concatenate([np.asarray(logits)[i, :len(s)] for i, s in enumerate(batch)])


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("arch", ARCHS)
def test_float32_parity(arch, hf_tiny_model, jaxgen_tiny_model):
    tiny = hf_tiny_model(arch)
    batch = tiny.batch()
    reference = tiny.logits(batch)
    generator = jaxgen.Generator(jaxgen_tiny_model(arch))
    assert generator.config.weight_dtype == "float32"
    got = np.asarray(generator.forward_batch(batch))
    assert got.shape == (len(batch), max(map(len, batch)), tiny.vocab_size)
    diff = np.abs(_valid_rows(got, batch) - _valid_rows(reference, batch)).max()
    assert diff <= FLOAT32_TOLERANCE, f"{arch}: float32 max abs logit difference {diff:.3g}"


GREEDY_STEPS = 16


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_hf_generate(arch, hf_tiny_model, jaxgen_tiny_model):
    """Greedy decoding (prefill, then the KV-cache decode loop) gives HF `generate`'s tokens for
    GREEDY_STEPS new tokens, the end token forbidden in both so that every step is compared."""
    tiny = hf_tiny_model(arch)
    generator = jaxgen.Generator(jaxgen_tiny_model(arch))
    vocabulary = generator.vocabulary
    scaling = generator.config.rope_scaling_dict
    # HF switches longrope to its long factors once a sequence passes the original context (16
    # positions in the tiny phi3), for the tokens of that step only; jaxgen keeps the short
    # factors (see decoder.rope_inv_freq), so phi3 is compared within the original context.
    limit = scaling.get("original_max_position_embeddings") if scaling.get("rope_type") == "longrope" else None
    for prompt in tiny.batch(3)[:2]:
        steps = GREEDY_STEPS if limit is None else min(GREEDY_STEPS, limit - len(prompt))
        reference = hf_models.greedy_reference(tiny.model, prompt, steps)
        result = generator.generate_batch([vocabulary.to_tokens(prompt)], max_length=steps, min_length=steps,
                                          include_prompt_in_result=False)
        assert result[0].sequences_ids[0] == reference, f"{arch}: greedy tokens differ from HF generate"


@pytest.mark.parametrize("compute_type", list(LOW_PRECISION))
@pytest.mark.parametrize("arch", ARCHS)
def test_low_precision_parity(arch, compute_type, hf_tiny_model, jaxgen_tiny_model):
    tolerance, margin_threshold = LOW_PRECISION[compute_type]
    tiny = hf_tiny_model(arch)
    batch = tiny.batch(0) + tiny.batch(1) + tiny.batch(2)  # 96 positions
    reference = _valid_rows(tiny.logits(batch), batch)
    generator = jaxgen.Generator(jaxgen_tiny_model(arch), compute_type=compute_type)
    got = _valid_rows(generator.forward_batch(batch), batch)
    diff = np.abs(got - reference).max()
    assert diff <= tolerance, f"{arch} {compute_type}: max abs logit difference {diff:.3g} > {tolerance}"
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > margin_threshold
    assert decisive.mean() >= 0.25, f"{arch}: too few decisive positions ({decisive.mean():.2f})"
    agree = (got.argmax(-1) == reference.argmax(-1))[decisive].mean()
    assert agree >= 0.99, f"{arch} {compute_type}: argmax agreement {agree:.3f} on decisive positions"


# ---------------------------------------------------------------------------- config values
EXPECTED_CONFIG = {
    "gpt2": dict(norm_type="layer", position_embedding="learned", mlp="plain", activation="gelu_tanh",
                 attention_bias=True, attention_out_bias=True, mlp_bias=True, tie_word_embeddings=True,
                 max_position_embeddings=64, add_bos_token=False),
    "llama": dict(rope_theta=500000.0, tie_word_embeddings=False, norm_eps=1e-5, activation="silu",
                  rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                ("original_max_position_embeddings", 16), ("rope_type", "llama3"))),
    "mistral": dict(layer_types=("sliding",) * 2, sliding_window=4),
    "qwen2": dict(layer_types=("full", "sliding", "sliding"), sliding_window=4, attention_bias=True,
                  attention_out_bias=False, tie_word_embeddings=True),
    "qwen3": dict(qk_norm="head", norm_offset=0.0, attention_bias=False, layer_types=("full",) * 2),
    "gemma": dict(norm_offset=1.0, embedding_scale=8.0, activation="gelu_tanh", attention_scale=None,
                  tie_word_embeddings=True),
    "gemma2": dict(layer_types=("sliding", "full") * 2, sliding_window=4, attention_scale=24 ** -0.5,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, norm_placement="sandwich", qk_norm="none"),
    "gemma3_text": dict(layer_types=("sliding", "sliding", "full", "sliding"), rope_theta=1e6,
                        rope_local_theta=1e4, rope_scaling=(("factor", 2.0), ("rope_type", "linear")),
                        qk_norm="head", attention_scale=20 ** -0.5, final_logit_softcapping=None),
    "gemma3": dict(architecture="gemma3", layer_types=("sliding", "sliding", "full", "sliding"),
                   rope_local_theta=1e4, qk_norm="head", embedding_scale=8.0),
    "phi3": dict(rotary_dim=8, sliding_window=6, tie_word_embeddings=False),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_config_values(arch, jaxgen_tiny_model):
    config = ModelConfig.load(jaxgen_tiny_model(arch))
    for key, value in EXPECTED_CONFIG[arch].items():
        actual = getattr(config, key)
        if isinstance(value, float):
            assert actual == pytest.approx(value), key
        else:
            assert actual == value, key
    assert (config.bos_token, config.eos_token, config.unk_token, config.pad_token) == (
        "<bos>", "<eos>", "<unk>", "<pad>")
    if arch == "phi3":
        scaling = config.rope_scaling_dict
        assert scaling["rope_type"] == "longrope"
        assert scaling["attention_factor"] == pytest.approx(np.sqrt(1 + np.log(64 / 16) / np.log(16)))


# ---------------------------------------------------------------------------- vocabulary and files
def test_vocabulary_from_tokenizer_json(hf_tiny_model, jaxgen_tiny_model):
    tiny = hf_tiny_model("gemma")
    path = jaxgen_tiny_model("gemma")
    config, _, vocabulary = load_model_dir(path)
    assert len(vocabulary) == config.vocab_size == tiny.vocab_size
    assert vocabulary[:5] == ["<pad>", "<eos>", "<bos>", "<unk>", "w4"]
    n = tiny.tokenizer_vocab_size
    assert vocabulary[n - 1] == f"w{n - 1}"
    assert vocabulary[n:] == [f"<extra_id_{i}>" for i in range(tiny.vocab_size - n)]  # CTranslate2's filler
    assert config.add_bos_token is True
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["eos_token"]["content"] == "<eos>"


def test_vocabulary_from_sentencepiece(hf_tiny_model, jaxgen_tiny_model):
    import sentencepiece as spm

    tiny = hf_tiny_model("llama")
    path = jaxgen_tiny_model("llama")
    assert not os.path.exists(os.path.join(tiny.path, "tokenizer.json"))
    _, _, vocabulary = load_model_dir(path)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    assert vocabulary[:sp.GetPieceSize()] == [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    assert vocabulary[sp.GetPieceSize()] == "<extra_id_0>"
    assert len(vocabulary) == tiny.vocab_size


# ---------------------------------------------------------------------------- storage types
@pytest.mark.parametrize("quantization", ["int8", "bfloat16", "float16"])
def test_quantization_writes_dtype(quantization, hf_tiny_model, tmp_path):
    import ml_dtypes

    tiny = hf_tiny_model("qwen2")
    out = TransformersConverter(tiny.path).convert(str(tmp_path / "model"), quantization=quantization)
    config, flat, _ = load_model_dir(out)
    assert config.weight_dtype == quantization
    float_type = {"int8": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[quantization]
    for name, array in flat.items():
        module, kind = name.split(".")[-2:]
        if module.endswith("norm"):
            expected = np.float32
        elif quantization == "int8" and kind == "weight":
            expected = np.int8
        elif kind == "weight_scale":
            expected = np.float32
        else:
            expected = float_type
        assert array.dtype == np.dtype(expected), name
    if quantization == "int8":
        assert "layers.0.q.weight_scale" in flat and "embed.weight_scale" in flat
    # A converted model still computes the right thing.
    batch = tiny.batch()
    reference = _valid_rows(tiny.logits(batch), batch)
    got = _valid_rows(jaxgen.Generator(out).forward_batch(batch), batch)
    assert np.abs(got - reference).max() <= 0.4


def test_bfloat16_sharded_checkpoint(tmp_path):
    """A bf16 checkpoint split into several safetensors files keeps its type and its values."""
    import torch

    tiny = hf_models.build("qwen3", str(tmp_path / "hf"), seed=1, dtype=torch.bfloat16, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(tiny.path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(tiny.path) if f.endswith(".safetensors")]) > 1
    out = TransformersConverter(tiny.path).convert(str(tmp_path / "model"))
    config, flat, _ = load_model_dir(out)
    assert config.weight_dtype == "bfloat16"
    state = {k: v.to(torch.bfloat16).float().numpy() for k, v in tiny.model.state_dict().items()}
    np.testing.assert_array_equal(flat["embed.weight"].astype(np.float32), state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(flat["layers.1.k.weight"].astype(np.float32),
                                  state["model.layers.1.self_attn.k_proj.weight"].T)
    assert flat["layers.0.q_norm.weight"].dtype == np.float32
    # The reference model holds the bf16-rounded weights in float32: float32 compute matches it.
    batch = tiny.batch()
    got = jaxgen.Generator(out, compute_type="float32").forward_batch(batch)
    diff = np.abs(_valid_rows(got, batch) - _valid_rows(tiny.logits(batch), batch)).max()
    assert diff <= FLOAT32_TOLERANCE


# ---------------------------------------------------------------------------- errors
def test_unsupported_architecture(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "bert", "architectures": ["BertModel"]}, f)
    with pytest.raises(ValueError, match=r"model configuration bert \(supported configurations are: .*llama"):
        TransformersConverter(str(tmp_path)).convert(str(tmp_path / "out"))


def test_existing_output_directory(hf_tiny_model, tmp_path):
    tiny = hf_tiny_model("gemma")
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(RuntimeError, match="already exists"):
        TransformersConverter(tiny.path).convert(str(out))
    assert (out / "stale.txt").exists()
    TransformersConverter(tiny.path).convert(str(out), force=True)
    assert not (out / "stale.txt").exists()
    assert ModelConfig.load(str(out)).architecture == "gemma"


def test_unmapped_tensor_is_an_error(hf_tiny_model, tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "hf"
    shutil.copytree(hf_tiny_model("mistral").path, src)
    save_file({"model.layers.0.mlp.expert_gate.weight": np.zeros((4, 64), np.float32)}, str(src / "extra.safetensors"))
    with pytest.raises(ValueError, match="expert_gate"):
        TransformersConverter(str(src)).load()


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        TransformersConverter(str(tmp_path / "nope")).load()


# ---------------------------------------------------------------------------- command line
def test_convert_cli(hf_tiny_model, tmp_path, capsys):
    import argparse

    from jaxgen.convert_cli import add_convert_parser

    parser = argparse.ArgumentParser(prog="jaxgen")
    add_convert_parser(parser.add_subparsers(dest="command"))
    tiny = hf_tiny_model("gpt2")
    out = tmp_path / "model"
    args = parser.parse_args(["convert", "--from", "transformers", tiny.path, "-o", str(out),
                              "--quantization", "int8"])
    assert args.func(args) == 0
    assert ModelConfig.load(str(out)).weight_dtype == "int8"
    assert str(out) in capsys.readouterr().out
    args = parser.parse_args(["convert", "--from", "transformers", tiny.path, "-o", str(out)])
    assert args.func(args) == 2  # exists, no --force: a usage error, like every CLI error
    assert "already exists" in capsys.readouterr().err
    args = parser.parse_args(["convert", "--from", "transformers", tiny.path, "-o", str(out), "--force"])
    assert args.func(args) == 0
    assert ModelConfig.load(str(out)).weight_dtype == "float32"


def test_progress_callback(hf_tiny_model, tmp_path):
    calls = []
    TransformersConverter(hf_tiny_model("gemma").path, progress=lambda d, t: calls.append((d, t))).load()
    total = calls[-1][1]
    assert calls == [(i, total) for i in range(1, total + 1)]


# ---------------------------------------------------------------------------- older config styles
def _legacy_config(arch: str, cfg: dict) -> dict:
    """Rewrites a transformers-5 config.json the way transformers 4.x checkpoints store it."""
    cfg = dict(cfg)
    cfg["torch_dtype"] = cfg.pop("dtype")
    if arch == "llama":
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        rope["type"] = rope.pop("rope_type")
        cfg["rope_scaling"] = rope
    elif arch == "phi3":
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        rope.pop("rope_type")
        rope.pop("original_max_position_embeddings")
        cfg["rope_scaling"] = dict(rope, type="su")  # Phi-3's original name of longrope
    elif arch in ("gemma2", "qwen2"):
        del cfg["layer_types"]  # derived from the alternating pattern / max_window_layers
    elif arch == "gemma3_text":
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": rope["full_attention"]["factor"]}
    elif arch == "gemma3":
        cfg["text_config"] = _legacy_config("gemma3_text", dict(cfg["text_config"], dtype="float32"))
    return cfg


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2", "qwen2", "gemma3_text", "gemma3"])
def test_legacy_config_format(arch, hf_tiny_model, tmp_path):
    """transformers 4.x configs (rope_theta/rope_scaling/rope_local_base_freq, no layer_types) and
    the 4.x multimodal Gemma 3 tensor names convert to the same model."""
    from safetensors.numpy import load_file, save_file

    tiny = hf_tiny_model(arch)
    src = tmp_path / "hf"
    shutil.copytree(tiny.path, src)
    with open(src / "config.json") as f:
        cfg = json.load(f)
    with open(src / "config.json", "w") as f:
        json.dump(_legacy_config(arch, cfg), f)
    if arch == "gemma3":  # 4.x: language_model.model.*, vision_tower.*, multi_modal_projector.*
        tensors = load_file(str(src / "model.safetensors"))
        renamed = {}
        for name, array in tensors.items():
            if name.startswith("model.language_model."):
                name = "language_model.model." + name[len("model.language_model."):]
            elif name.startswith("model."):
                name = name[len("model."):]
            renamed[name] = array
        save_file(renamed, str(src / "model.safetensors"))
    new = TransformersConverter(tiny.path).load()
    old = TransformersConverter(str(src)).load()
    assert old.config == new.config
    assert old.vocabulary == new.vocabulary
    assert sorted(old.flat) == sorted(new.flat)
    for name in new.flat:
        np.testing.assert_array_equal(old.flat[name], new.flat[name], err_msg=name)


def test_add_bos_token_and_added_tokens_fallbacks(hf_tiny_model, tmp_path):
    """Without tokenizer_config's add_bos_token, tokenizer.json's post-processor decides; a
    sentencepiece-only checkpoint takes added tokens from tokenizer_config's added_tokens_decoder."""
    src = tmp_path / "json"
    shutil.copytree(hf_tiny_model("mistral").path, src)
    with open(src / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<eos>"}, f)
    assert TransformersConverter(str(src)).load().config.add_bos_token is True  # "<bos> $A" template

    tiny = hf_tiny_model("llama")
    src = tmp_path / "sp"
    shutil.copytree(tiny.path, src)
    n = tiny.tokenizer_vocab_size
    with open(src / "tokenizer_config.json", "w") as f:
        json.dump({"add_bos_token": False, "added_tokens_decoder": {str(n + 1): {"content": "<tool>"}}}, f)
    model = TransformersConverter(str(src)).load()
    assert model.config.add_bos_token is False
    assert model.vocabulary[n:n + 3] == ["<extra_id_0>", "<tool>", "<extra_id_1>"]
