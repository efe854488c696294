"""Llama-style decoders: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3 (the text decoder of
the multimodal checkpoint), gemma3_text, phi3 (fused qkv and gate_up)."""

from __future__ import annotations

from typing import Callable, Optional

from jaxgen.converters.hf_loader import (HFConfig, Spec, activation, common_sizes, find_prefix, float_or_none,
                                         layer_types, register_loader, rope)
from jaxgen.converters.safetensors_reader import SafetensorsReader
from jaxgen.model.config import default_embedding_scale

MlpMapper = Callable[[Spec, str, str, int], bool]
# How the families differ from Llama in their norms (see ModelConfig.norm_placement / qk_norm).
NORM_PLACEMENTS = {"gemma2": "sandwich", "gemma3": "sandwich", "gemma3_text": "sandwich", "olmo2": "output"}
QK_NORMS = {"qwen3": "head", "qwen3_moe": "head", "gemma3": "head", "gemma3_text": "head", "olmo2": "full"}

LLAMA_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-06, hidden_act='silu', rope_theta=10000.0)
MISTRAL_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-06, hidden_act='silu', rope_theta=10000.0, sliding_window=4096)
QWEN2_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-06, hidden_act='silu', rope_theta=10000.0, use_sliding_window=False, sliding_window=4096, max_window_layers=28)
QWEN3_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-06, hidden_act='silu', rope_theta=10000.0, use_sliding_window=False, sliding_window=4096, max_window_layers=28)
GEMMA_DEFAULTS = dict(tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-06, hidden_act='gelu_pytorch_tanh', rope_theta=10000.0, head_dim=256)
GEMMA2_DEFAULTS = dict(tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-06, hidden_activation='gelu_pytorch_tanh', rope_theta=10000.0, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
GEMMA3_TEXT_DEFAULTS = dict(tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-06, hidden_activation='gelu_pytorch_tanh', rope_theta=1000000.0, rope_local_base_freq=10000.0, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None)
PHI3_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-05, hidden_act='silu', rope_theta=10000.0, sliding_window=None)


@register_loader("llama", defaults=LLAMA_DEFAULTS)
@register_loader("mistral", defaults=MISTRAL_DEFAULTS)
@register_loader("qwen2", defaults=QWEN2_DEFAULTS)
@register_loader("qwen3", defaults=QWEN3_DEFAULTS)
@register_loader("gemma", defaults=GEMMA_DEFAULTS)
@register_loader("gemma2", defaults=GEMMA2_DEFAULTS)
@register_loader("gemma3_text", defaults=GEMMA3_TEXT_DEFAULTS)
@register_loader("phi3", defaults=PHI3_DEFAULTS)
@register_loader("gemma3", defaults=GEMMA3_TEXT_DEFAULTS)  # HFConfig reads its text_config
def llama_like(hf: HFConfig, weights: SafetensorsReader, map_mlp: Optional[MlpMapper] = None, **fields) -> Spec:
    """llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3(_text), phi3, and the families that differ
    from them only in their MLP (`map_mlp(spec, hf_prefix, canonical_prefix, layer)` maps one layer's
    MLP and returns whether it has biases; default: a gated MLP) or in `ModelConfig` values
    (`fields` override the derived ones): see jaxgen.converters.loaders.moe."""
    mt = hf.model_type
    gemma = mt in ("gemma", "gemma2", "gemma3", "gemma3_text")
    gemma3 = mt in ("gemma3", "gemma3_text")
    placement = NORM_PLACEMENTS.get(mt, "pre")
    sandwich = placement == "sandwich"
    if gemma3 and hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional Gemma 3 encoders (use_bidirectional_attention) are not decoders")

    candidates = ["model.", ""]
    if mt == "gemma3":
        candidates = ["model.language_model.", "language_model.model.", "model."]
    prefix = find_prefix(weights, candidates, "embed_tokens.weight")
    head_candidates = ["lm_head.weight", "language_model.lm_head.weight"]

    def ignore(name: str) -> bool:
        return (name.endswith("rotary_emb.inv_freq") or name in head_candidates
                or (mt == "gemma3" and not name.startswith(prefix)))

    spec = Spec(weights, prefix + "embed_tokens.weight", ignore)
    sizes = common_sizes(hf)
    num_layers, hd = sizes["num_layers"], sizes["head_dim"]
    vocab_size = weights.shape(prefix + "embed_tokens.weight")[0]
    max_positions = int(hf.get("max_position_embeddings") or 8192)

    # sliding windows
    if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "smollm3"):
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if window is not None and hf.cfg.get("layer_types") is None:
            first = int(hf.get("max_window_layers") or 0)
            hf.cfg = dict(hf.cfg, layer_types=["sliding_attention" if i >= first else "full_attention"
                                               for i in range(num_layers)])
    elif mt == "gemma2":
        window = hf.get("sliding_window")
        if hf.cfg.get("layer_types") is None:
            hf.cfg = dict(hf.cfg, layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention"
                                               for i in range(num_layers)])
    elif gemma3:
        window = hf.get("sliding_window")
        if hf.cfg.get("layer_types") is None:
            pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
            hf.cfg = dict(hf.cfg, layer_types=["sliding_attention" if (i + 1) % pattern else "full_attention"
                                               for i in range(num_layers)])
    elif mt in ("mistral", "phi3", "mixtral"):
        window = hf.get("sliding_window")
    else:
        window = None
    kinds, window = layer_types(hf, num_layers, window)

    activation_key = "hidden_activation" if mt in ("gemma2", "gemma3", "gemma3_text") else "hidden_act"
    act = activation(hf.get(activation_key) or hf.get("hidden_act") or "silu", mt)

    attention_scale = None
    if mt in ("gemma2", "gemma3", "gemma3_text"):
        attention_scale = float(hf.get("query_pre_attn_scalar")) ** -0.5

    # tensors
    spec.add("embed.weight", prefix + "embed_tokens.weight")
    spec.add("final_norm.weight", prefix + "norm.weight")
    head = next((n for n in head_candidates if n in weights), None)
    tied = bool(hf.get("tie_word_embeddings")) or head is None
    if not tied:
        spec.add("lm_head.weight", head, transpose=True)

    q_out, kv_out = sizes["num_heads"] * hd, sizes["num_kv_heads"] * hd
    biases = {"qkv": False, "o": False, "mlp": False}
    qk_norm = QK_NORMS.get(mt, "none")
    for i in range(num_layers):
        p, c = f"{prefix}layers.{i}.", f"layers.{i}."
        if placement != "output":
            spec.add(c + "attn_norm.weight", p + "input_layernorm.weight")
        if mt == "phi3":
            spec.add_split([c + "q.weight", c + "k.weight", c + "v.weight"], p + "self_attn.qkv_proj.weight",
                           [q_out, kv_out, kv_out], axis=0, transpose=True)
            spec.add_split([c + "gate.weight", c + "up.weight"], p + "mlp.gate_up_proj.weight",
                           [sizes["intermediate_size"]] * 2, axis=0, transpose=True)
            biases["mlp"] |= spec.add_linear(c + "down", p + "mlp.down_proj")
        else:
            for name in ("q", "k", "v"):
                biases["qkv"] |= spec.add_linear(c + name, p + f"self_attn.{name}_proj")
            biases["mlp"] |= (map_mlp or map_gated_mlp)(spec, p + "mlp.", c, i)
        biases["o"] |= spec.add_linear(c + "o", p + "self_attn.o_proj")
        if qk_norm != "none":
            spec.add(c + "q_norm.weight", p + "self_attn.q_norm.weight")
            spec.add(c + "k_norm.weight", p + "self_attn.k_norm.weight")
        if sandwich:
            spec.add(c + "post_attn_norm.weight", p + "post_attention_layernorm.weight")
            spec.add(c + "mlp_norm.weight", p + "pre_feedforward_layernorm.weight")
            spec.add(c + "post_mlp_norm.weight", p + "post_feedforward_layernorm.weight")
        elif placement == "output":
            spec.add(c + "post_attn_norm.weight", p + "post_attention_layernorm.weight")
            spec.add(c + "post_mlp_norm.weight", p + "post_feedforward_layernorm.weight")
        else:
            spec.add(c + "mlp_norm.weight", p + "post_attention_layernorm.weight")

    spec.config_fields = dict(
        architecture=mt, vocab_size=vocab_size, **sizes,
        norm_type="rms", norm_eps=float(hf.get("rms_norm_eps") or 1e-6), norm_offset=1.0 if gemma else 0.0,
        norm_placement=placement, qk_norm=qk_norm,
        activation=act, mlp="gated", attention_scale=attention_scale,
        attn_logit_softcapping=float_or_none(hf.get("attn_logit_softcapping")) if mt == "gemma2" else None,
        attention_bias=biases["qkv"], attention_out_bias=biases["o"], mlp_bias=biases["mlp"],
        layer_types=kinds, sliding_window=int(window) if window else None,
        position_embedding="rope", max_position_embeddings=max_positions,
        **rope(hf, hd, max_positions),
        embedding_scale=default_embedding_scale(sizes["hidden_size"]) if gemma else None,
        tie_word_embeddings=tied,
        final_logit_softcapping=float_or_none(hf.get("final_logit_softcapping")) if sandwich else None,
    )
    spec.config_fields.update(fields)
    return spec


def map_gated_mlp(spec: Spec, hf_prefix: str, canonical: str, layer: int) -> bool:
    """A gated MLP stored as gate_proj / up_proj / down_proj; returns whether it has biases."""
    bias = False
    for name in ("gate", "up", "down"):
        bias |= spec.add_linear(canonical + name, hf_prefix + f"{name}_proj")
    return bias
