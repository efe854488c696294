"""OPT, BLOOM, MPT and Falcon: learned positions with an offset, post-norm and projected
embeddings (OPT), ALiBi (BLOOM, MPT, Falcon-RW), LayerNorm without bias (MPT), multi-query and
grouped fused q|k|v projections with parallel blocks (Falcon)."""

from __future__ import annotations

from typing import List

import ml_dtypes
import numpy as np

from jaxgen.converters.hf_loader import (HFConfig, Spec, activation, alibi_slopes, find_prefix, register_loader,
                                         rope, split_rows_per_head)
from jaxgen.converters.safetensors_reader import SafetensorsReader

OPT_DEFAULTS = dict(tie_word_embeddings=True, max_position_embeddings=2048, do_layer_norm_before=True,
                    _remove_final_layer_norm=False, word_embed_proj_dim=None, activation_function="relu",
                    enable_bias=True, layer_norm_elementwise_affine=True, ffn_dim=3072)
BLOOM_DEFAULTS = dict(tie_word_embeddings=True, layer_norm_epsilon=1e-5,
                      apply_residual_connection_post_layernorm=False)
MPT_DEFAULTS = dict(tie_word_embeddings=True, max_seq_len=2048, layer_norm_epsilon=1e-5, expansion_ratio=4,
                    no_bias=True, logit_scale=None, attn_config=None)
MPT_ATTN_DEFAULTS = dict(attn_type="multihead_attention", clip_qkv=None, softmax_scale=None, prefix_lm=False,
                         qk_ln=False, alibi=True, alibi_bias_max=8)
FALCON_DEFAULTS = dict(tie_word_embeddings=True, max_position_embeddings=2048, layer_norm_epsilon=1e-5,
                       num_ln_in_parallel_attn=None, num_kv_heads=None, alibi=False, new_decoder_architecture=False,
                       multi_query=True, parallel_attn=True, bias=False, ffn_hidden_size=None, activation="gelu",
                       rope_theta=10000.0)
# The falcon checkpoints published before transformers had the architecture (their remote code's
# configs): "RefinedWebModel" (Falcon-7B, Falcon-RW) and "RefinedWeb" (Falcon-40B, always the new
# decoder architecture), with n_head / n_head_kv / n_layer.
REFINED_WEB_MODEL_DEFAULTS = dict(FALCON_DEFAULTS, multi_query=False, parallel_attn=False)
REFINED_WEB_DEFAULTS = dict(FALCON_DEFAULTS, parallel_attn=True, new_decoder_architecture=True)
OPT_POSITION_OFFSET = 2  # OPT's learned position table starts with 2 rows no position reads


def _layer_norm(spec: Spec, canonical: str, hf_name: str) -> None:
    spec.add(canonical + ".weight", hf_name + ".weight")
    spec.add(canonical + ".bias", hf_name + ".bias")


def _tied(hf: HFConfig, weights: SafetensorsReader, spec: Spec, head: str = "lm_head.weight") -> bool:
    """Whether the head is the embedding; adds the untied head [V, E] -> lm_head [E, V]."""
    tied = bool(hf.get("tie_word_embeddings")) or head not in weights
    if not tied:
        spec.add("lm_head.weight", head, transpose=True)
    return tied


# ---------------------------------------------------------------------------- OPT
@register_loader("opt", defaults=OPT_DEFAULTS)
def opt(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """OPT: learned positions (offset 2, sliced away), pre-norm with a final norm, or post-norm
    without one (do_layer_norm_before=False: opt-350m), embeddings of word_embed_proj_dim projected
    in and out (opt-350m)."""
    prefix = find_prefix(weights, ["model.decoder.", "decoder."], "embed_tokens.weight")
    spec = Spec(weights, prefix + "embed_tokens.weight", lambda n: n == "lm_head.weight")
    hidden = int(hf.require("hidden_size"))
    heads = int(hf.require("num_attention_heads"))
    num_layers = int(hf.require("num_hidden_layers"))
    vocab_size, width = weights.shape(prefix + "embed_tokens.weight")
    pre_norm = bool(hf.get("do_layer_norm_before"))
    final_norm = pre_norm and not hf.get("_remove_final_layer_norm")
    affine = bool(hf.get("layer_norm_elementwise_affine"))

    def norm(canonical: str, hf_name: str) -> None:
        if affine:
            _layer_norm(spec, canonical, hf_name)
        else:  # a LayerNorm without parameters: weight 1, bias 0
            spec.add_derived([canonical + ".weight", canonical + ".bias"], [],
                             lambda: [np.ones(hidden, np.float32), np.zeros(hidden, np.float32)])

    spec.add("embed.weight", prefix + "embed_tokens.weight")
    table = prefix + "embed_positions.weight"
    spec.add_derived(["pos_embed.weight"], [table], lambda w: [w[OPT_POSITION_OFFSET:]])
    positions = weights.shape(table)[0] - OPT_POSITION_OFFSET
    if width != hidden:
        spec.add("embed_in.weight", prefix + "project_in.weight", transpose=True)
        spec.add("embed_out.weight", prefix + "project_out.weight", transpose=True)
    if final_norm:
        norm("final_norm", prefix + "final_layer_norm")
    tied = _tied(hf, weights, spec)
    biases = False
    for i in range(num_layers):
        p, c = f"{prefix}layers.{i}.", f"layers.{i}."
        # post-norm reads the same two norms after each residual sum instead of before each sublayer
        norm(c + "attn_norm", p + "self_attn_layer_norm")
        norm(c + "mlp_norm", p + "final_layer_norm")
        for name in ("q", "k", "v"):
            biases |= spec.add_linear(c + name, p + f"self_attn.{name}_proj")
        spec.add_linear(c + "o", p + "self_attn.out_proj")
        spec.add_linear(c + "up", p + "fc1")
        spec.add_linear(c + "down", p + "fc2")
    spec.config_fields = dict(
        architecture="opt", vocab_size=vocab_size, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=int(hf.require("ffn_dim")),
        norm_type="layer", norm_eps=1e-5,  # nn.LayerNorm's default: OPT has no epsilon setting
        norm_placement="pre" if pre_norm else "post", final_norm=final_norm,
        activation=activation(hf.get("activation_function") or "relu", "opt"), mlp="plain",
        attention_bias=biases, attention_out_bias=biases, mlp_bias=biases,
        position_embedding="learned", max_position_embeddings=positions,
        embedding_size=None if width == hidden else width, tie_word_embeddings=tied,
    )
    return spec


# ---------------------------------------------------------------------------- BLOOM
@register_loader("bloom", defaults=BLOOM_DEFAULTS)
def bloom(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """BLOOM: ALiBi, a LayerNorm of the embeddings, q|k|v fused per head."""
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError("BLOOM checkpoints with apply_residual_connection_post_layernorm are not supported "
                         "(the residual stream would carry normed activations)")
    prefix = find_prefix(weights, ["transformer.", ""], "word_embeddings.weight")
    spec = Spec(weights, prefix + "word_embeddings.weight", lambda n: n == "lm_head.weight")
    hidden = int(hf.require("hidden_size", "n_embed"))
    heads = int(hf.require("n_head", "num_attention_heads"))
    num_layers = int(hf.require("n_layer", "num_hidden_layers"))
    hd = hidden // heads
    vocab_size = weights.shape(prefix + "word_embeddings.weight")[0]
    spec.add("embed.weight", prefix + "word_embeddings.weight")
    _layer_norm(spec, "embed_norm", prefix + "word_embeddings_layernorm")
    _layer_norm(spec, "final_norm", prefix + "ln_f")
    tied = _tied(hf, weights, spec)
    for i in range(num_layers):
        p, c = f"{prefix}h.{i}.", f"layers.{i}."
        _layer_norm(spec, c + "attn_norm", p + "input_layernorm")
        _layer_norm(spec, c + "mlp_norm", p + "post_attention_layernorm")
        qkv = p + "self_attention.query_key_value"
        spec.add_derived([c + "q.weight", c + "k.weight", c + "v.weight"], [qkv + ".weight"],
                         lambda w: split_rows_per_head(w, heads, (1, 1, 1), hd))
        spec.add_derived([c + "q.bias", c + "k.bias", c + "v.bias"], [qkv + ".bias"],
                         lambda b: split_rows_per_head(b, heads, (1, 1, 1), hd))
        spec.add_linear(c + "o", p + "self_attention.dense")
        spec.add_linear(c + "up", p + "mlp.dense_h_to_4h")
        spec.add_linear(c + "down", p + "mlp.dense_4h_to_h")
    spec.config_fields = dict(
        architecture="bloom", vocab_size=vocab_size, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hd, intermediate_size=weights.shape(f"{prefix}h.0.mlp.dense_h_to_4h.weight")[0],
        norm_type="layer", norm_eps=float(hf.get("layer_norm_epsilon")), embedding_norm=True,
        activation="gelu_tanh", mlp="plain",  # bloom_gelu_forward: the tanh approximation
        attention_bias=True, attention_out_bias=True, mlp_bias=True,
        # HF adds slope * key position after q.k / sqrt(hd): the same softmax as slope * (k - q)
        position_embedding="alibi", alibi_slopes=alibi_slopes(heads),
        max_position_embeddings=int(hf.get("seq_length") or 2048), tie_word_embeddings=tied,
    )
    return spec


# ---------------------------------------------------------------------------- MPT
@register_loader("mpt", defaults=MPT_DEFAULTS)
def mpt(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """MPT as transformers runs it: ALiBi with MPT's slopes (alibi_bias_max), LayerNorms without
    bias, no linear biases, q|k|v fused in three blocks (Wqkv)."""
    attn = dict(MPT_ATTN_DEFAULTS, **(hf.get("attn_config") or {}))
    for key, ok in (("clip_qkv", not attn["clip_qkv"]), ("qk_ln", not attn["qk_ln"]),
                    ("prefix_lm", not attn["prefix_lm"]), ("alibi", bool(attn["alibi"]))):
        if not ok:
            raise ValueError(f"MPT checkpoints with attn_config.{key}={attn[key]!r} are not supported")
    if not hf.get("no_bias"):
        raise ValueError("MPT checkpoints with biases (no_bias=False) are not supported "
                         "(transformers' MPT has none)")
    prefix = find_prefix(weights, ["transformer.", ""], "wte.weight")
    spec = Spec(weights, prefix + "wte.weight", lambda n: n == "lm_head.weight")
    hidden = int(hf.require("d_model", "hidden_size"))
    heads = int(hf.require("n_heads", "num_attention_heads"))
    num_layers = int(hf.require("n_layers", "num_hidden_layers"))
    vocab_size = weights.shape(prefix + "wte.weight")[0]
    spec.add("embed.weight", prefix + "wte.weight")
    spec.add("final_norm.weight", prefix + "norm_f.weight")
    tied = _tied(hf, weights, spec)
    for i in range(num_layers):
        p, c = f"{prefix}blocks.{i}.", f"layers.{i}."
        spec.add(c + "attn_norm.weight", p + "norm_1.weight")
        spec.add(c + "mlp_norm.weight", p + "norm_2.weight")
        spec.add_split([c + "q.weight", c + "k.weight", c + "v.weight"], p + "attn.Wqkv.weight", [hidden] * 3,
                       axis=0, transpose=True)
        spec.add_linear(c + "o", p + "attn.out_proj")
        spec.add_linear(c + "up", p + "ffn.up_proj")
        spec.add_linear(c + "down", p + "ffn.down_proj")
    # transformers ignores alibi_bias_max (it builds the slopes with 8) and logit_scale; jaxgen
    # follows the checkpoint's values as MosaicML's code does (every released MPT has 8 and none)
    logit_scale = hf.get("logit_scale")
    if logit_scale == "inv_sqrt_d_model":
        logit_scale = hidden ** -0.5
    spec.config_fields = dict(
        architecture="mpt", vocab_size=vocab_size, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=weights.shape(f"{prefix}blocks.0.ffn.up_proj.weight")[0],
        norm_type="layer", norm_eps=float(hf.get("layer_norm_epsilon")), norm_bias=False,
        activation="gelu", mlp="plain",
        attention_scale=None if attn["softmax_scale"] is None else float(attn["softmax_scale"]),
        position_embedding="alibi",
        alibi_slopes=alibi_slopes(heads, float(attn["alibi_bias_max"]), interleave_extra=False),
        max_position_embeddings=int(hf.get("max_seq_len")), tie_word_embeddings=tied,
        logit_scale=None if logit_scale is None else float(logit_scale),
    )
    return spec


# ---------------------------------------------------------------------------- Falcon
def _falcon_qkv(hf: HFConfig, heads: int, hd: int) -> tuple:
    """(kv heads, fn: fused [out, in] weight or [out] bias -> q, k, v in [in, out] / [out]) for
    the three layouts of Falcon's query_key_value."""
    if hf.get("new_decoder_architecture"):
        kv = int(hf.get("num_kv_heads") or hf.get("n_head_kv") or heads)
        group = heads // kv

        def split(w: np.ndarray) -> List[np.ndarray]:
            # per KV head: its `group` query heads, then its key, then its value
            return split_rows_per_head(w, kv, (group, 1, 1), hd)

        return kv, split
    if hf.get("multi_query"):  # all query heads, then one key head and one value head
        def split(w: np.ndarray) -> List[np.ndarray]:
            parts = np.split(w, [heads * hd, (heads + 1) * hd], axis=0)
            return [a.T if a.ndim == 2 else a for a in parts]

        return 1, split
    return heads, lambda w: split_rows_per_head(w, heads, (1, 1, 1), hd)  # q|k|v per head


@register_loader("falcon", defaults=FALCON_DEFAULTS)
@register_loader("RefinedWebModel", defaults=REFINED_WEB_MODEL_DEFAULTS)
@register_loader("RefinedWeb", defaults=REFINED_WEB_DEFAULTS)
def falcon(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """Falcon's three block variants: the new decoder architecture (GQA, grouped fused qkv, a
    parallel block with ln_attn/ln_mlp or one input_layernorm), the 7B-style multi-query parallel
    block with one shared norm, and the RW-style block (ALiBi; sequential when parallel_attn is
    False)."""
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError("Falcon checkpoints with apply_residual_connection_post_layernorm are not supported")
    prefix = find_prefix(weights, ["transformer.", ""], "word_embeddings.weight")
    spec = Spec(weights, prefix + "word_embeddings.weight",
                lambda n: n == "lm_head.weight" or n.endswith("rotary_emb.inv_freq"))
    hidden = int(hf.require("hidden_size", "n_embed"))
    heads = int(hf.require("num_attention_heads", "n_head"))
    num_layers = int(hf.require("num_hidden_layers", "n_layer"))
    hd = hidden // heads
    new_arch = bool(hf.get("new_decoder_architecture"))
    parallel = new_arch or bool(hf.get("parallel_attn"))
    if new_arch and not hf.get("parallel_attn"):
        raise ValueError("Falcon checkpoints with new_decoder_architecture and parallel_attn=False are not "
                         "supported (transformers cannot run them either)")
    two_norms = new_arch and int(hf.get("num_ln_in_parallel_attn") or 2) == 2
    kv_heads, split = _falcon_qkv(hf, heads, hd)
    use_alibi = bool(hf.get("alibi"))
    vocab_size = weights.shape(prefix + "word_embeddings.weight")[0]
    spec.add("embed.weight", prefix + "word_embeddings.weight")
    _layer_norm(spec, "final_norm", prefix + "ln_f")
    tied = _tied(hf, weights, spec)
    biases = False
    for i in range(num_layers):
        p, c = f"{prefix}h.{i}.", f"layers.{i}."
        if two_norms:
            _layer_norm(spec, c + "attn_norm", p + "ln_attn")
            _layer_norm(spec, c + "mlp_norm", p + "ln_mlp")
        else:
            _layer_norm(spec, c + "attn_norm", p + "input_layernorm")
            if not parallel:
                _layer_norm(spec, c + "mlp_norm", p + "post_attention_layernorm")
        qkv = p + "self_attention.query_key_value"
        spec.add_derived([c + "q.weight", c + "k.weight", c + "v.weight"], [qkv + ".weight"], split)
        if spec.has(qkv + ".bias"):
            biases = True
            spec.add_derived([c + "q.bias", c + "k.bias", c + "v.bias"], [qkv + ".bias"], split)
        spec.add_linear(c + "o", p + "self_attention.dense")
        spec.add_linear(c + "up", p + "mlp.dense_h_to_4h")
        spec.add_linear(c + "down", p + "mlp.dense_4h_to_h")
    max_positions = int(hf.get("max_position_embeddings"))
    if use_alibi:
        # HF adds the bias before scaling, (q.k + slope * k_pos) / sqrt(hd), with slopes in bfloat16
        # (sdpa; HF's eager path adds the bias a second time through its mask)
        slopes = np.asarray(alibi_slopes(heads), np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        positions = dict(position_embedding="alibi", alibi_slopes=tuple(float(s) * hd ** -0.5 for s in slopes))
    else:
        positions = dict(position_embedding="rope", **rope(hf, hd, max_positions))
    spec.config_fields = dict(
        architecture="falcon", vocab_size=vocab_size, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hd,
        intermediate_size=int(hf.get("ffn_hidden_size") or 4 * hidden),
        norm_type="layer", norm_eps=float(hf.get("layer_norm_epsilon") or 1e-5),
        block="parallel" if parallel else "sequential", shared_block_norm=parallel and not two_norms,
        activation=activation(hf.get("activation") or "gelu", "falcon"), mlp="plain",
        attention_bias=biases, attention_out_bias=biases, mlp_bias=biases,
        max_position_embeddings=max_positions, tie_word_embeddings=tied, **positions,
    )
    return spec

