"""Tiny random HF checkpoints of GPT-NeoX, StableLM, GPT-J, CodeGen, Phi-2, StarCoder2, GPTBigCode (parallel residual blocks, partial and interleaved rotary, fused and multi-query projections).

Each builder returns (model class, config) like those of hf_models.py, small enough (hidden 64,
2-3 layers, a few hundred tokens) to run in a second, with every option of the family that the
converter maps set to a value that matters on 12-token sequences.
"""

from __future__ import annotations

from typing import Callable, Dict

# Special token ids of every tiny model (hf_models.PAD, EOS, BOS; not imported: hf_models imports us).
_TOKENS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
# hidden 64, 4 heads of 16, 2 layers, an MLP of 128, 64 positions
_NEOX_SIZES = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=64, initializer_range=0.1, **_TOKENS)
_GPT_SIZES = dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1, **_TOKENS)


def _gpt_neox(parallel: bool, pct: float, bias: bool, theta: float):
    def build():
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        cfg = GPTNeoXConfig(use_parallel_residual=parallel, rotary_pct=pct, rotary_emb_base=theta,
                            attention_bias=bias, hidden_act="gelu", **_NEOX_SIZES)
        return GPTNeoXForCausalLM, cfg

    return build


def _stablelm(parallel: bool, qkv_bias: bool, kv_heads: int):
    def build():
        from transformers import StableLmConfig, StableLmForCausalLM

        cfg = StableLmConfig(use_parallel_residual=parallel, use_qkv_bias=qkv_bias, num_key_value_heads=kv_heads,
                             partial_rotary_factor=0.25, rope_theta=500.0, **_NEOX_SIZES)
        return StableLmForCausalLM, cfg

    return build


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    return GPTJForCausalLM, GPTJConfig(rotary_dim=8, activation_function="gelu_new", **_GPT_SIZES)


def _codegen():
    from transformers import CodeGenConfig, CodeGenForCausalLM

    return CodeGenForCausalLM, CodeGenConfig(rotary_dim=8, n_ctx=64, **_GPT_SIZES)


def _phi():
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(partial_rotary_factor=0.5, num_key_value_heads=2, hidden_act="gelu_new", **_NEOX_SIZES)
    return PhiForCausalLM, cfg


def _starcoder2(window, use_bias: bool, tied: bool):
    def build():
        from transformers import Starcoder2Config, Starcoder2ForCausalLM

        cfg = Starcoder2Config(num_key_value_heads=2, sliding_window=window, use_bias=use_bias,
                               tie_word_embeddings=tied, rope_theta=1000.0, **_NEOX_SIZES)
        return Starcoder2ForCausalLM, cfg

    return build


def _gpt_bigcode(multi_query: bool, tied: bool):
    def build():
        from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

        cfg = GPTBigCodeConfig(multi_query=multi_query, tie_word_embeddings=tied, n_inner=96, **_GPT_SIZES)
        return GPTBigCodeForCausalLM, cfg

    return build


BUILDERS: Dict[str, Callable] = {
    "gpt_neox": _gpt_neox(parallel=True, pct=0.25, bias=True, theta=10000.0),
    "gpt_neox-sequential": _gpt_neox(parallel=False, pct=0.5, bias=False, theta=100.0),
    "stablelm": _stablelm(parallel=False, qkv_bias=True, kv_heads=2),
    "stablelm-parallel": _stablelm(parallel=True, qkv_bias=False, kv_heads=4),
    "gptj": _gptj,
    "codegen": _codegen,
    "phi": _phi,
    "starcoder2": _starcoder2(window=4, use_bias=True, tied=True),
    "starcoder2-nobias": _starcoder2(window=None, use_bias=False, tied=False),
    "gpt_bigcode": _gpt_bigcode(multi_query=True, tied=True),
    "gpt_bigcode-mha": _gpt_bigcode(multi_query=False, tied=False),
}

EXPECTED_CONFIG: Dict[str, dict] = {
    "gpt_neox": dict(block="parallel", shared_block_norm=False, norm_type="layer", mlp="plain", activation="gelu",
                     rotary_dim=4, rope_theta=10000.0, attention_bias=True, attention_out_bias=True,
                     tie_word_embeddings=False, num_kv_heads=4),
    "gpt_neox-sequential": dict(block="sequential", rotary_dim=8, rope_theta=100.0, attention_bias=False,
                                attention_out_bias=False, mlp_bias=True),
    "stablelm": dict(block="sequential", norm_type="layer", mlp="gated", activation="silu", rotary_dim=4,
                     rope_theta=500.0, attention_bias=True, attention_out_bias=False, num_kv_heads=2),
    "stablelm-parallel": dict(block="parallel", shared_block_norm=True, attention_bias=False, num_kv_heads=4),
    "gptj": dict(block="parallel", shared_block_norm=True, activation="gelu_tanh", rotary_dim=8,
                 attention_bias=False, mlp_bias=True, lm_head_bias=True, tie_word_embeddings=False),
    "codegen": dict(block="parallel", shared_block_norm=True, rotary_dim=8, lm_head_bias=True),
    "phi": dict(block="parallel", shared_block_norm=True, rotary_dim=8, num_kv_heads=2, attention_bias=True,
                attention_out_bias=True, mlp_bias=True, lm_head_bias=True),
    "starcoder2": dict(block="sequential", norm_type="layer", mlp="plain", activation="gelu_tanh", num_kv_heads=2,
                       sliding_window=4, layer_types=("sliding", "sliding"), attention_bias=True,
                       tie_word_embeddings=True, rope_theta=1000.0),
    "starcoder2-nobias": dict(sliding_window=None, attention_bias=False, attention_out_bias=False, mlp_bias=False,
                              norm_bias=True, tie_word_embeddings=False),
    "gpt_bigcode": dict(num_kv_heads=1, position_embedding="learned", intermediate_size=96, mlp="plain",
                        activation="gelu_tanh", tie_word_embeddings=True),
    "gpt_bigcode-mha": dict(num_kv_heads=4, position_embedding="learned", tie_word_embeddings=False),
}
