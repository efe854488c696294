"""Tiny random HF checkpoints of Mixtral, Qwen2-MoE, Qwen3-MoE (mixtures of experts) and OLMo 2, Granite, SmolLM3.

Each builder returns (model class, config) like those of hf_models.py, small enough (hidden 64,
2-3 layers, a few hundred tokens) to run in a second, with every option of the family that the
converter maps set to a value that matters on 12-token sequences.
"""

from __future__ import annotations

from typing import Callable, Dict

BUILDERS: Dict[str, Callable] = {}
EXPECTED_CONFIG: Dict[str, dict] = {}

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64, initializer_range=0.1, pad_token_id=0, bos_token_id=2, eos_token_id=1)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=300, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                        sliding_window=6, **SMALL)
    return MixtralForCausalLM, cfg


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    # layer 1 is a dense MLP (mlp_only_layers); top-3 of 6 experts without renormalisation; a shared expert
    cfg = Qwen2MoeConfig(vocab_size=300, num_hidden_layers=3, num_experts=6, num_experts_per_tok=3,
                         moe_intermediate_size=48, shared_expert_intermediate_size=80, mlp_only_layers=[1],
                         norm_topk_prob=False, **SMALL)
    return Qwen2MoeForCausalLM, cfg


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=300, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=48, norm_topk_prob=True, **SMALL)
    return Qwen3MoeForCausalLM, cfg


def _olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2ForCausalLM, Olmo2Config(vocab_size=300, num_hidden_layers=2, **SMALL)


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=300, num_hidden_layers=2, embedding_multiplier=3.0, residual_multiplier=0.5,
                        attention_multiplier=0.2, logits_scaling=0.5, **SMALL)
    return GraniteForCausalLM, cfg


def _smollm3():
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    cfg = SmolLM3Config(vocab_size=300, num_hidden_layers=4, no_rope_layer_interval=2, **SMALL)
    return SmolLM3ForCausalLM, cfg


BUILDERS.update({"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmo2": _olmo2,
                 "granite": _granite, "smollm3": _smollm3})
EXPECTED_CONFIG.update({
    "mixtral": dict(mlp="experts", num_experts=4, experts_per_token=2, expert_intermediate_size=128,
                    normalize_expert_weights=True, layer_types=("sliding",) * 2, sliding_window=6),
    "qwen2_moe": dict(mlp="experts", num_experts=6, experts_per_token=3, expert_intermediate_size=48,
                      shared_expert_intermediate_size=80, dense_layers=(1,), normalize_expert_weights=False,
                      attention_bias=True),
    "qwen3_moe": dict(mlp="experts", num_experts=8, experts_per_token=2, qk_norm="head",
                      normalize_expert_weights=True),
    "olmo2": dict(norm_placement="output", qk_norm="full"),
    "granite": dict(embedding_scale=3.0, residual_scale=0.5, attention_scale=0.2, logit_scale=2.0),
    "smollm3": dict(nope_layers=(1, 3), tie_word_embeddings=True),
})
