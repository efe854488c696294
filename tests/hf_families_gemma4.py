"""Tiny random HF checkpoint of Gemma 4's text decoder (`gemma4_text`), with every Gemma 4 idea the
converter maps set to a value that matters on 12-token sequences: sliding and full layers (the
full ones with their own head dim 32, one KV head, keys equal to values, proportional rotary
embeddings on a quarter of the frequencies), the last two layers reusing earlier layers' keys and
values with double-wide MLPs, per-layer inputs, layer scalars other than 1 (a buffer, which
hf_models.build does not perturb: set here), final soft-capping. `gemma4_text-moe`: the
26B-A4B-style layer, a gated MLP and 4 routed experts (top 2) side by side, without per-layer
inputs or shared KV layers.
"""

from __future__ import annotations

from typing import Callable, Dict

BUILDERS: Dict[str, Callable] = {}
EXPECTED_CONFIG: Dict[str, dict] = {}

_TOKENS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # hf_models.PAD, EOS, BOS
_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _tamed():
    from transformers import Gemma4ForCausalLM

    class TamedGemma4(Gemma4ForCausalLM):
        """Gemma 4 with layer scalars other than 1 (checkpoints store trained values), and, like a
        trained model, sublayers that add small updates to the residual stream: post-sublayer norm
        weights of 0.2 and q norms of 0.5 (attention scale 1 on normed q and k gives near one-hot
        attention on 16-dim heads otherwise). Untamed, int8's weight rounding alone moves these
        random logits by more than 1 in exact arithmetic, so int8 could not be checked."""

        def __init__(self, config):
            super().__init__(config)
            for i, layer in enumerate(self.model.layers):
                layer.layer_scalar.fill_(0.7 + 0.2 * i)
                layer.self_attn.q_norm.weight.data.fill_(0.5)
                for n in (layer.post_attention_layernorm, layer.post_feedforward_layernorm,
                          getattr(layer, "post_per_layer_input_norm", None)):
                    if n is not None:
                        n.weight.data.fill_(0.2)

    return TamedGemma4


def _gemma4_text():
    from transformers import Gemma4TextConfig

    cfg = Gemma4TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=len(_TYPES), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=300, layer_types=list(_TYPES), sliding_window=4, final_logit_softcapping=5.0,
        max_position_embeddings=64, initializer_range=0.1, **_TOKENS)
    return _tamed(), cfg


def _gemma4_text_moe():
    from transformers import Gemma4TextConfig

    cfg = Gemma4TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        final_logit_softcapping=5.0, max_position_embeddings=64, initializer_range=0.1, **_TOKENS)
    return _tamed(), cfg


BUILDERS.update({"gemma4_text": _gemma4_text, "gemma4_text-moe": _gemma4_text_moe})
EXPECTED_CONFIG.update({
    "gemma4_text": dict(full_head_dim=32, full_kv_heads=1, kv_sources=(0, 1, 0, 1), value_norm=True,
                        intermediate_sizes=(96, 96, 192, 192), per_layer_input_size=8, layer_scale=True,
                        norm_offset=0.0, attention_scale=1.0, final_logit_softcapping=5.0,
                        layer_types=("sliding", "full", "sliding", "full")),
    "gemma4_text-moe": dict(mlp="gated_and_experts", router="scaled", num_experts=4, experts_per_token=2,
                            expert_intermediate_size=32, per_layer_input_size=0, kv_sources=()),
})
