"""GPT-2: learned positions, LayerNorm, Conv1D weights ([in, out]) with q|k|v fused on the output axis."""

from __future__ import annotations

from jaxgen.converters.hf_loader import HFConfig, Spec, activation, find_prefix, register_loader
from jaxgen.converters.safetensors_reader import SafetensorsReader

GPT2_DEFAULTS = dict(tie_word_embeddings=True, n_positions=1024, layer_norm_epsilon=1e-05, activation_function='gelu_new', scale_attn_weights=True, n_inner=None)


@register_loader("gpt2", defaults=GPT2_DEFAULTS)
def gpt2(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    prefix = find_prefix(weights, ["transformer.", ""], "wte.weight")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx are not supported")

    def ignore(name: str) -> bool:
        return name == "lm_head.weight" or name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")

    spec = Spec(weights, prefix + "wte.weight", ignore)
    hidden = int(hf.require("n_embd", "hidden_size"))
    heads = int(hf.require("n_head", "num_attention_heads"))
    num_layers = int(hf.require("n_layer", "num_hidden_layers"))
    inner = int(hf.get("n_inner") or 4 * hidden)
    vocab_size, positions = weights.shape(prefix + "wte.weight")[0], weights.shape(prefix + "wpe.weight")[0]
    spec.add("embed.weight", prefix + "wte.weight")
    spec.add("pos_embed.weight", prefix + "wpe.weight")
    spec.add("final_norm.weight", prefix + "ln_f.weight")
    spec.add("final_norm.bias", prefix + "ln_f.bias")
    tied = bool(hf.get("tie_word_embeddings")) or "lm_head.weight" not in weights
    if not tied:
        spec.add("lm_head.weight", "lm_head.weight", transpose=True)
    for i in range(num_layers):
        p, c = f"{prefix}h.{i}.", f"layers.{i}."
        for canonical, hf_name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            spec.add(c + canonical + ".weight", p + hf_name + ".weight")
            spec.add(c + canonical + ".bias", p + hf_name + ".bias")
        # Conv1D weights are already [in, out]; c_attn is q|k|v fused on the output axis.
        spec.add_split([c + "q.weight", c + "k.weight", c + "v.weight"], p + "attn.c_attn.weight",
                       [hidden] * 3, axis=1, transpose=False)
        spec.add_split([c + "q.bias", c + "k.bias", c + "v.bias"], p + "attn.c_attn.bias", [hidden] * 3,
                       axis=0, transpose=False)
        spec.add_linear(c + "o", p + "attn.c_proj", transpose=False)
        spec.add_linear(c + "up", p + "mlp.c_fc", transpose=False)
        spec.add_linear(c + "down", p + "mlp.c_proj", transpose=False)
    spec.config_fields = dict(
        architecture="gpt2", vocab_size=vocab_size, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=inner,
        norm_type="layer", norm_eps=float(hf.get("layer_norm_epsilon") or 1e-5),
        activation=activation(hf.get("activation_function") or "gelu_new", "gpt2"), mlp="plain",
        attention_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        attention_bias=True, attention_out_bias=True, mlp_bias=True,
        position_embedding="learned", max_position_embeddings=positions, tie_word_embeddings=tied,
    )
    return spec
