"""Gemma 4 text decoders (`gemma4_text`, and the text decoder of the multimodal `gemma4`).

What Gemma 4 adds to Gemma 3, each a `ModelConfig` value of the one decoder:
- full-attention layers with their own head dim and KV heads (`global_head_dim`,
  `num_global_key_value_heads`, or `per_layer_config`): `full_head_dim`, `full_kv_heads`;
- values RMS-normed per head without a weight: `value_norm`; norms multiply by their weight
  (no Gemma offset), attention scale 1 (q and k are normed);
- "proportional" rotary embeddings on full layers (a fraction of the frequencies, the rest 0);
- keys equal to values on full layers (`attention_k_eq_v`): v_proj is k_proj, copied at conversion;
- the last `num_kv_shared_layers` layers attend to the keys and values of the last earlier layer
  of their type: `kv_sources` (their MLPs twice as wide with `use_double_wide_mlp`:
  `intermediate_sizes`);
- per-layer inputs (`hidden_size_per_layer_input`): `per_layer_input_size`;
- a stored scalar per layer (`layer_scalar`): `layer_scale`;
- the mixture-of-experts block (`enable_moe_block`, 26B-A4B): a gated MLP and routed experts side
  by side, each output normed (`mlp="gated_and_experts"`), routed on the residual stream by a
  router that RMS-norms and scales its input and scales each chosen expert's weight
  (`router="scaled"`).
Refused with an error naming it: bidirectional attention.
"""

from __future__ import annotations

from typing import List

from jaxgen.converters.hf_loader import (HFConfig, Spec, activation, common_sizes, find_prefix, float_or_none,
                                         layer_types, register_loader, rope)
from jaxgen.converters.loaders.moe import map_experts
from jaxgen.converters.safetensors_reader import SafetensorsReader
from jaxgen.model.config import default_embedding_scale

GEMMA4_TEXT_DEFAULTS = dict(
    vocab_size=262144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
    rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, sliding_window=512,
    final_logit_softcapping=None, use_bidirectional_attention=None, vocab_size_per_layer_input=262144,
    hidden_size_per_layer_input=256, attention_k_eq_v=False, num_kv_shared_layers=0, enable_moe_block=False,
    use_double_wide_mlp=False, global_head_dim=512, num_global_key_value_heads=None, num_experts=None,
    top_k_experts=None, moe_intermediate_size=None)
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}}


def kv_sources(types: List[str], shared: int) -> tuple:
    """Per layer, the layer whose keys and values it attends to: the last `shared` layers take
    those of the last earlier layer of their type (HF's `kv_sharing_modes`)."""
    n = len(types)
    first = n - shared
    if shared == 0:
        return tuple(range(n))
    if first <= 0 or set(types[first:]) - set(types[:first]):
        raise ValueError(f"num_kv_shared_layers ({shared}) leaves no earlier layer of each shared layer's type")
    last = {t: i for i, t in enumerate(types[:first])}
    return tuple(i if i < first else last[types[i]] for i in range(n))


def _full_layer_shape(hf: HFConfig, types: List[str], head_dim: int, kv_heads: int):
    """(full_head_dim, full_kv_heads) from `per_layer_config` (saved configs) or `global_head_dim`
    and `num_global_key_value_heads` (read like HF's __post_init__); None where equal to the
    sliding layers'."""
    per_layer = hf.cfg.get("per_layer_config")
    if isinstance(per_layer, dict):
        shapes = set()
        for i, t in enumerate(types):
            entry = per_layer.get(str(i), per_layer.get(i)) or {}
            unknown = sorted(set(entry) - {"head_dim", "num_key_value_heads"})
            if unknown:
                raise ValueError(f"per_layer_config of layer {i} sets {unknown}: not supported")
            shape = (entry.get("head_dim", head_dim), entry.get("num_key_value_heads", kv_heads))
            if t == "sliding_attention" and shape != (head_dim, kv_heads):
                raise ValueError(f"per_layer_config gives sliding layer {i} its own attention shape: not supported")
            if t == "full_attention":
                shapes.add(shape)
        if len(shapes) > 1:
            raise ValueError(f"per_layer_config gives full layers different attention shapes {sorted(shapes)}")
        full = shapes.pop() if shapes else (head_dim, kv_heads)
    else:
        global_kv = hf.get("num_global_key_value_heads") if hf.get("attention_k_eq_v") else None
        full = (int(hf.get("global_head_dim")), int(global_kv) if global_kv is not None else kv_heads)
    return (full[0] if full[0] != head_dim else None), (full[1] if full[1] != kv_heads else None)


@register_loader("gemma4_text", defaults=GEMMA4_TEXT_DEFAULTS)
@register_loader("gemma4", defaults=GEMMA4_TEXT_DEFAULTS)  # HFConfig reads its text_config
def gemma4(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    if hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional Gemma 4 attention (use_bidirectional_attention) is not a decoder")
    multimodal = hf.model_type == "gemma4"
    prefix = find_prefix(weights, ["model.language_model.", "model."] if multimodal else ["model.", ""],
                         "embed_tokens.weight")

    def ignore(name: str) -> bool:
        return (name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"
                or (multimodal and not name.startswith(prefix)))

    spec = Spec(weights, prefix + "embed_tokens.weight", ignore)
    sizes = common_sizes(hf)
    num_layers, hd, kv_heads = sizes["num_layers"], sizes["head_dim"], sizes["num_kv_heads"]
    vocab_size = weights.shape(prefix + "embed_tokens.weight")[0]
    max_positions = int(hf.get("max_position_embeddings"))

    types = list(hf.cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                               for i in range(num_layers)])
    types[-1] = "full_attention"  # as HF forces it
    hf.cfg = dict(hf.cfg, layer_types=types)
    kinds, window = layer_types(hf, num_layers, hf.get("sliding_window"))
    full_hd, full_kv = _full_layer_shape(hf, types, hd, kv_heads)
    sources = kv_sources(types, int(hf.get("num_kv_shared_layers") or 0))
    k_eq_v = bool(hf.get("attention_k_eq_v"))
    double = bool(hf.get("use_double_wide_mlp"))
    widths = tuple(sizes["intermediate_size"] * (2 if double and sources[i] != i else 1) for i in range(num_layers))
    ple = int(hf.get("hidden_size_per_layer_input") or 0)
    moe = {}
    if hf.get("enable_moe_block"):
        moe = dict(mlp="gated_and_experts", router="scaled", num_experts=int(hf.require("num_experts")),
                   experts_per_token=int(hf.require("top_k_experts")),
                   expert_intermediate_size=int(hf.require("moe_intermediate_size")), normalize_expert_weights=True)

    rope_cfg = dict(hf.cfg.get("rope_parameters") or DEFAULT_ROPE)
    full_rope = dict(rope_cfg.get("full_attention") or {})
    proportional = full_rope.get("rope_type") == "proportional"
    if proportional:  # hf_loader.rope reads the rest; the proportion stays a parameter of the type
        rope_cfg["full_attention"] = {k: v for k, v in full_rope.items() if k != "rope_type"}
    hf.cfg = dict(hf.cfg, rope_parameters=rope_cfg)
    rope_fields = rope(hf, hd, max_positions)
    if proportional:
        rope_fields.update(rotary_dim=None, rope_scaling=dict(
            rope_type="proportional", partial_rotary_factor=float(full_rope.get("partial_rotary_factor", 1.0)),
            factor=float(full_rope.get("factor", 1.0))))

    # tensors
    spec.add("embed.weight", prefix + "embed_tokens.weight")
    spec.add("final_norm.weight", prefix + "norm.weight")
    tied = bool(hf.get("tie_word_embeddings")) or "lm_head.weight" not in weights
    if not tied:
        spec.add("lm_head.weight", "lm_head.weight", transpose=True)
    if ple:
        if int(hf.get("vocab_size_per_layer_input")) != vocab_size:
            raise ValueError(f"vocab_size_per_layer_input ({hf.get('vocab_size_per_layer_input')}) differs from the "
                             f"vocabulary ({vocab_size}): not supported")
        spec.add("per_layer_embed.weight", prefix + "embed_tokens_per_layer.weight")
        spec.add_linear("per_layer_model_proj", prefix + "per_layer_model_projection")
        spec.add("per_layer_model_norm.weight", prefix + "per_layer_projection_norm.weight")
    bias = False
    layer_scale = False
    for i in range(num_layers):
        p, c = f"{prefix}layers.{i}.", f"layers.{i}."
        spec.add(c + "attn_norm.weight", p + "input_layernorm.weight")
        spec.add(c + "post_attn_norm.weight", p + "post_attention_layernorm.weight")
        spec.add(c + "mlp_norm.weight", p + "pre_feedforward_layernorm.weight")
        spec.add(c + "post_mlp_norm.weight", p + "post_feedforward_layernorm.weight")
        bias |= spec.add_linear(c + "q", p + "self_attn.q_proj")
        spec.add_linear(c + "o", p + "self_attn.o_proj")
        spec.add(c + "q_norm.weight", p + "self_attn.q_norm.weight")
        if sources[i] == i:
            spec.add_linear(c + "k", p + "self_attn.k_proj")
            value = p + "self_attn.k_proj" if k_eq_v and kinds[i] == "full" else p + "self_attn.v_proj"
            spec.add_linear(c + "v", value)
            spec.add(c + "k_norm.weight", p + "self_attn.k_norm.weight")
        for name in ("gate", "up", "down"):
            spec.add_linear(c + name, p + f"mlp.{name}_proj")
        if moe:
            spec.add(c + "router.weight", p + "router.proj.weight", transpose=True)
            spec.add(c + "router_scale.weight", p + "router.scale")
            spec.add(c + "router_expert_scale.weight", p + "router.per_expert_scale")
            map_experts(spec, p, c, moe["num_experts"], ("gate_proj", "up_proj", "down_proj"))
            spec.add(c + "mlp_norm_2.weight", p + "pre_feedforward_layernorm_2.weight")
            spec.add(c + "post_mlp_norm_1.weight", p + "post_feedforward_layernorm_1.weight")
            spec.add(c + "post_mlp_norm_2.weight", p + "post_feedforward_layernorm_2.weight")
        if ple:
            spec.add_linear(c + "per_layer_gate", p + "per_layer_input_gate")
            spec.add_linear(c + "per_layer_proj", p + "per_layer_projection")
            spec.add(c + "per_layer_norm.weight", p + "post_per_layer_input_norm.weight")
        if spec.has(p + "layer_scalar"):
            spec.add(c + "layer_scale.weight", p + "layer_scalar")
            layer_scale = True
    if layer_scale and not all(f"layers.{i}.layer_scale.weight" in spec.tensors for i in range(num_layers)):
        raise ValueError("checkpoint has layer_scalar for some layers only")

    spec.config_fields = dict(
        architecture=hf.model_type, vocab_size=vocab_size, **sizes,
        norm_type="rms", norm_eps=float(hf.get("rms_norm_eps")), norm_offset=0.0,
        norm_placement="sandwich", qk_norm="head", value_norm=True, layer_scale=layer_scale,
        per_layer_input_size=ple, activation=activation(hf.get("hidden_activation") or "gelu_pytorch_tanh",
                                                        hf.model_type),
        mlp="gated", intermediate_sizes=widths if len(set(widths)) > 1 else (), attention_scale=1.0,
        attention_bias=bias, attention_out_bias=bias, layer_types=kinds,
        sliding_window=int(window) if window else None, full_head_dim=full_hd, full_kv_heads=full_kv,
        kv_sources=sources if sources != tuple(range(num_layers)) else (),
        position_embedding="rope", max_position_embeddings=max_positions, **rope_fields,
        embedding_scale=default_embedding_scale(sizes["hidden_size"]), tie_word_embeddings=tied,
        final_logit_softcapping=float_or_none(hf.get("final_logit_softcapping")),
    )
    spec.config_fields.update(moe)
    return spec
