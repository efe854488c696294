"""The GGUF converter on the llama.cpp architectures beyond llama/gemma: qwen2, qwen3, gptneox,
falcon, phi2, starcoder, bloom, mpt, qwen2moe, qwen3moe.

Each test builds a tiny random transformers model, writes it as a GGUF file the way llama.cpp's
convert_hf_to_gguf.py lays out that architecture (fused q|k|v regrouped into query heads, key
heads, value heads; experts stacked; the shared-expert gate squeezed), some tensors stored as F16
or Q8_0 with the round trip put back into the torch model so that it stays the exact reference,
converts it and compares logits with the torch model. An architecture the `gguf` package
describes but jaxgen does not convert is a ValueError naming it.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import torch  # noqa: E402

VOCAB = 160
TOL = 1e-4  # float32 throughout: measured ~1e-6


def _tokens():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    types = [3, 3, 3, 2] + [1] * (VOCAB - 4)
    return tokens, [0.0] * 4 + [-float(i) for i in range(4, VOCAB)], types


def _regroup_qkv(w: np.ndarray, heads: int, kv_heads: int, hd: int, layout: str) -> np.ndarray:
    """llama.cpp's regrouping of a fused [out, ...] q|k|v tensor into q heads, k heads, v heads:
    `per_head` (GPT-NeoX: q|k|v of each head) or `per_group` (Falcon: the group's query heads,
    then its key and value)."""
    if layout == "per_head":
        g = w.reshape(heads, 3, hd, *w.shape[1:])
        return np.concatenate([g[:, i].reshape(heads * hd, *w.shape[1:]) for i in range(3)])
    g = w.reshape(kv_heads, heads // kv_heads + 2, hd, *w.shape[1:])
    q = g[:, :-2].reshape(heads * hd, *w.shape[1:])
    k = g[:, -2].reshape(kv_heads * hd, *w.shape[1:])
    v = g[:, -1].reshape(kv_heads * hd, *w.shape[1:])
    return np.concatenate([q, k, v])


# ---------------------------------------------------------------------------- tiny models
def _gptneox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, rotary_pct=0.5, rotary_emb_base=500.0, max_position_embeddings=64,
                        use_parallel_residual=False, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(cfg)


def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                       new_decoder_architecture=True, max_position_embeddings=64, tie_word_embeddings=False)
    return FalconForCausalLM(cfg)


def _falcon_7b():
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       multi_query=True, parallel_attn=True, max_position_embeddings=64)
    return FalconForCausalLM(cfg)


def _phi2():
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, partial_rotary_factor=0.5, max_position_embeddings=64)
    return PhiForCausalLM(cfg)


def _starcoder():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    cfg = GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True)
    return GPTBigCodeForCausalLM(cfg)


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    # 6 heads: slopes of a head count that is not a power of two
    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6))


def _mpt():
    from transformers import MptConfig, MptForCausalLM

    return MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=2, max_seq_len=64))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return Qwen2ForCausalLM(cfg)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return Qwen3ForCausalLM(cfg)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return MixtralForCausalLM(cfg)


def _qwen2moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    # layer 1 dense (mlp_only_layers), a shared expert, top-2 of 4 without renormalisation
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1],
                         max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return Qwen2MoeForCausalLM(cfg)


def _qwen3moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                         max_position_embeddings=64)
    return Qwen3MoeForCausalLM(cfg)


# name -> (GGUF architecture, builder)
MODELS = {"gptneox": ("gptneox", _gptneox), "falcon": ("falcon", _falcon), "falcon-7b": ("falcon", _falcon_7b),
          "phi2": ("phi2", _phi2), "starcoder": ("starcoder", _starcoder), "bloom": ("bloom", _bloom),
          "mpt": ("mpt", _mpt), "qwen2": ("qwen2", _qwen2), "qwen3": ("qwen3", _qwen3),
          "qwen2moe": ("qwen2moe", _qwen2moe), "qwen3moe": ("qwen3moe", _qwen3moe), "mixtral": ("llama", _mixtral)}

# HF tensor name (after the model prefix, layer part "L.") -> GGUF name (after "blk.N.")
_TOP = {"embed_in": "token_embd", "embed_out": "output", "final_layer_norm": "output_norm",  # gptneox
        "word_embeddings": "token_embd", "ln_f": "output_norm", "lm_head": "output",  # falcon, starcoder
        "wte": "token_embd", "wpe": "position_embd",  # starcoder
        "embed_tokens": "token_embd", "final_layernorm": "output_norm", "norm": "output_norm",  # phi, qwen
        "word_embeddings_layernorm": "token_embd_norm", "norm_f": "output_norm"}  # bloom, mpt
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "ln_attn": "attn_norm",
          "ln_mlp": "attn_norm_2", "ln_1": "attn_norm", "ln_2": "ffn_norm",
          "attention.query_key_value": "attn_qkv", "self_attention.query_key_value": "attn_qkv",
          "attn.c_attn": "attn_qkv", "attention.dense": "attn_output", "self_attention.dense": "attn_output",
          "attn.c_proj": "attn_output", "self_attn.dense": "attn_output", "self_attn.o_proj": "attn_output",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
          "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
          "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
          "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
          "self_attention.query_key_value": "attn_qkv", "norm_1": "attn_norm", "norm_2": "ffn_norm",
          "attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output", "ffn.up_proj": "ffn_up",
          "ffn.down_proj": "ffn_down"}
_SKIPPED = ("inv_freq", "masked_bias", "attention.bias")


def _gguf_tensors(model, arch: str):
    """(GGUF name, float32 array, setter putting a round-tripped array back into the model)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    hd = cfg.hidden_size // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if arch == "falcon":
        kv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1
    out = []
    tied = getattr(cfg, "tie_word_embeddings", False)
    for key, param in model.state_dict().items():
        if key.endswith(_SKIPPED) or (key == "lm_head.weight" and tied):
            continue
        parts = key.split(".")
        kind = parts[-1]
        block = next((p for p in ("layers", "h", "blocks") if p in parts), None)
        if block is not None:
            at = parts.index(block)
            bid, stem = parts[at + 1], ".".join(parts[at + 2:-1])
            if stem == "mlp.experts":  # fused [E, 2F, D] / [E, D, F]
                w = param.detach().numpy()
                if kind == "gate_up_proj":
                    f = w.shape[1] // 2
                    out.append((f"blk.{bid}.ffn_gate_exps.weight", w[:, :f], lambda a, p=param, f=f: p[:, :f].copy_(a)))
                    out.append((f"blk.{bid}.ffn_up_exps.weight", w[:, f:], lambda a, p=param, f=f: p[:, f:].copy_(a)))
                else:
                    out.append((f"blk.{bid}.ffn_down_exps.weight", w, lambda a, p=param: p.copy_(a)))
                continue
            name = f"blk.{bid}.{_LAYER[stem]}.{kind}"
        else:
            top = parts[-2]
            name = f"{_TOP[top]}.{kind}"
        w = param.detach().numpy()
        if name.endswith(("attn_qkv.weight", "attn_qkv.bias")) and arch in ("gptneox", "bloom", "falcon"):
            layout = "per_group" if arch == "falcon" else "per_head"
            out.append((name, _regroup_qkv(w, heads, kv, hd, layout), None))
            continue
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp's LlamaModel.permute: rotate-half pairs interleaved per head
            n = heads if ".attn_q." in name else kv
            w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
            out.append((name, w, None))
            continue
        if name.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(-1)  # llama.cpp squeezes the [1, D] gate
        out.append((name, w, lambda a, p=param: p.copy_(a.reshape(p.shape))))
    return out


def _write_gguf(model, arch: str, path: str) -> None:
    cfg = model.config
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(heads)
    if arch == "falcon":
        writer.add_head_count_kv(cfg.num_kv_heads if cfg.new_decoder_architecture else 1)
    elif arch == "starcoder":
        writer.add_head_count_kv(1)
    else:
        writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    if arch.startswith("qwen") or arch == "llama":
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        if getattr(cfg, "head_dim", None):
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
    if arch == "llama":  # Mixtral: feed_forward_length is the experts' width, as llama.cpp writes it
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe"):
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    elif not arch.startswith("qwen") and arch != "llama":
        eps = getattr(cfg, "layer_norm_eps", None) or getattr(cfg, "layer_norm_epsilon", None) or 1e-5
        writer.add_layer_norm_eps(eps)
        if arch != "falcon":  # llama.cpp derives Falcon's from the tensor shapes
            writer.add_feed_forward_length(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    if arch in ("gptneox", "phi2"):
        factor = cfg.rope_parameters["partial_rotary_factor"]
        writer.add_rope_dimension_count(int(factor * (hidden // heads)))
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "gptneox":
        writer.add_parallel_residual(cfg.use_parallel_residual)
    if arch == "mpt":
        writer.add_max_alibi_bias(8.0)
    tokens, scores, types = _tokens()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    with torch.no_grad():
        for name, w, put_back in _gguf_tensors(model, arch):
            w = np.ascontiguousarray(w, dtype=np.float32)
            if put_back is not None and name.endswith("_exps.weight"):
                qtype = gguf.GGMLQuantizationType.Q8_0
            elif put_back is not None and name.endswith(("ffn_up.weight", "ffn_down.weight")):
                qtype = gguf.GGMLQuantizationType.F16
            else:
                qtype = gguf.GGMLQuantizationType.F32
            stored = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, stored, raw_dtype=qtype)
            if qtype != gguf.GGMLQuantizationType.F32:
                back = gguf.quants.dequantize(stored, qtype).reshape(w.shape)
                put_back(torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", list(MODELS))
def test_tiny_llama_cpp_files_match_transformers(name, tmp_path):
    from jaxgen import Generator
    from jaxgen.converters import GGUFConverter
    from jaxgen.model.config import ModelConfig

    arch, build = MODELS[name]
    torch.manual_seed(0)
    model = build().float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / f"{name}.gguf")
    _write_gguf(model, arch, path)
    out = GGUFConverter(path).convert(str(tmp_path / "jaxgen"))
    config = ModelConfig.load(out)
    assert config.architecture == arch
    if arch in ("qwen2moe", "qwen3moe", "llama"):
        assert config.mlp == "experts" and config.num_experts == 4 and config.experts_per_token == 2
        assert config.normalize_expert_weights == (arch != "qwen2moe")
        assert config.expert_intermediate_size == 32
        assert config.dense_layers == ((1,) if arch == "qwen2moe" else ())
        assert config.shared_expert_intermediate_size == (48 if arch == "qwen2moe" else 0)
    if name == "falcon-7b":
        assert config.num_kv_heads == 1 and config.shared_block_norm
    if arch == "starcoder":
        assert config.position_embedding == "learned" and config.num_kv_heads == 1
    if arch in ("bloom", "mpt"):
        assert config.position_embedding == "alibi" and config.embedding_norm == (arch == "bloom")
        assert config.norm_bias == (arch == "bloom")
    if arch == "qwen3":
        assert config.qk_norm == "head"

    rng = np.random.default_rng(0)
    ids = [rng.integers(4, VOCAB, n).tolist() for n in (12, 7, 3)]
    ours = np.asarray(Generator(out).forward_batch(ids))
    for row, seq in enumerate(ids):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq])).logits[0].numpy()
        diff = np.abs(ours[row, :len(seq)] - ref).max()
        assert diff < TOL, f"{name} row {row}: max |logit diff| {diff}"


@pytest.mark.parametrize("arch", ["gptj", "stablelm", "starcoder2", "olmo2"])
def test_unconverted_architecture_is_a_value_error_naming_it(arch, tmp_path):
    from jaxgen.converters import GGUFConverter

    path = str(tmp_path / f"{arch}.gguf")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=f"architecture '{arch}' is not supported"):
        GGUFConverter(path).convert(str(tmp_path / "out"))
