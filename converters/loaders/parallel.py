"""Parallel-residual and LayerNorm decoders: gpt_neox (Pythia, StableLM tuned alpha), stablelm
(StableLM 2 / 3B-4E1T), gptj, codegen, phi (Phi-1.5 / Phi-2), starcoder2 and gpt_bigcode
(StarCoder / SantaCoder).

Each loader maps HF tensor names onto jaxgen's canonical names (jaxgen.model.checkpoint) and the
HF config onto `ModelConfig` values, with the numerics of HF transformers' modeling code: fused
projections are split at conversion (GPT-NeoX per head [H, 3, hd], CodeGen per block of 4
[q, v, k], GPTBigCode multi-query [D | hd | hd] or per head), and the interleaved rotary of GPT-J
and CodeGen becomes the rotate-half layout by permuting q and k columns.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jaxgen.converters.hf_loader import (HFConfig, Spec, activation, common_sizes, find_prefix, layer_types,
                                         register_loader, rope, rotate_half_permutation, split_rows_per_head)
from jaxgen.converters.safetensors_reader import SafetensorsReader

# HF config class defaults (transformers 5.24) of the keys the loaders read.
GPT_NEOX_DEFAULTS = dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                         intermediate_size=24576, hidden_act="gelu", max_position_embeddings=2048,
                         layer_norm_eps=1e-05, tie_word_embeddings=False, use_parallel_residual=True,
                         attention_bias=True, rotary_pct=0.25, rotary_emb_base=10000.0)
STABLELM_DEFAULTS = dict(vocab_size=50304, intermediate_size=6912, hidden_size=2560, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                         max_position_embeddings=4096, layer_norm_eps=1e-05, tie_word_embeddings=False,
                         use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False,
                         partial_rotary_factor=0.25, rope_theta=10000.0)
GPTJ_DEFAULTS = dict(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                     n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-05,
                     tie_word_embeddings=False)
CODEGEN_DEFAULTS = dict(GPTJ_DEFAULTS, n_ctx=2048)
PHI_DEFAULTS = dict(vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=32, num_key_value_heads=None, hidden_act="gelu_new",
                    max_position_embeddings=2048, layer_norm_eps=1e-05, tie_word_embeddings=False,
                    qk_layernorm=False, partial_rotary_factor=0.5, rope_theta=10000.0)
STARCODER2_DEFAULTS = dict(vocab_size=49152, hidden_size=3072, intermediate_size=12288, num_hidden_layers=30,
                           num_attention_heads=24, num_key_value_heads=2, hidden_act="gelu_pytorch_tanh",
                           max_position_embeddings=4096, norm_epsilon=1e-05, sliding_window=None, use_bias=True,
                           tie_word_embeddings=True, rope_theta=10000.0)
GPT_BIGCODE_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                            activation_function="gelu_pytorch_tanh", layer_norm_epsilon=1e-05,
                            scale_attn_weights=True, multi_query=True, tie_word_embeddings=True)

CODEGEN_MP_NUM = 4  # CodeGen's qkv_proj is laid out for 4 model-parallel blocks, each [q | v | k]


def _ignore_buffers(*heads: str):
    """Names a checkpoint may hold that are not weights: causal-mask buffers of old checkpoints,
    rotary inv_freq, and the head when it is tied (save_pretrained drops it; older files keep it)."""
    def ignore(name: str) -> bool:
        return (name in heads or name.endswith((".attn.bias", ".attn.masked_bias", ".attention.bias",
                                                ".attention.masked_bias", "rotary_emb.inv_freq")))

    return ignore


def _head(spec: Spec, hf: HFConfig, names: tuple) -> bool:
    """Maps the untied output head (first of `names` present) and its bias; returns tied."""
    head = next((n for n in names if n + ".weight" in spec.weights), None)
    tied = bool(hf.get("tie_word_embeddings")) or head is None
    if not tied:
        spec.add("lm_head.weight", head + ".weight", transpose=True)
    bias = next((n + ".bias" for n in names if n + ".bias" in spec.weights), None)
    if bias is not None:
        spec.add("lm_head.bias", bias)
    return tied


def _layer_norm(spec: Spec, canonical: str, hf_prefix: str) -> None:
    spec.add_linear(canonical, hf_prefix, transpose=False)


def _rope_parameters(hf: HFConfig, partial_key: Optional[str], theta_key: Optional[str]) -> None:
    """Old-style configs keep the rotary settings at the top level (GPT-NeoX: rotary_pct,
    rotary_emb_base): moves them into `rope_parameters` as transformers does, so `rope()` reads them."""
    params = dict(hf.cfg.get("rope_parameters") or hf.cfg.get("rope_scaling") or {})
    if partial_key is not None:
        params.setdefault("partial_rotary_factor", hf.get(partial_key))
    if theta_key is not None:
        params.setdefault("rope_theta", hf.get(theta_key))
    hf.cfg = dict(hf.cfg, rope_parameters=params)


def _no_qk_layernorm(hf: HFConfig) -> None:
    if hf.get("qk_layernorm"):
        raise ValueError(f"{hf.model_type} checkpoints with qk_layernorm (LayerNorm of queries and keys per head, "
                         f"with its own weights per head in StableLM) are not supported")


def _interleaved_to_half(weight: np.ndarray, head_dim: int, rotary: int, heads: int) -> np.ndarray:
    """torch [out, in] q or k weight of an interleaved rotary (GPT-J) -> [in, out] in the rotate-half
    layout jaxgen applies."""
    return weight.T[:, rotate_half_permutation(head_dim, rotary, heads)]


# ---------------------------------------------------------------------------- GPT-NeoX
@register_loader("gpt_neox", defaults=GPT_NEOX_DEFAULTS)
def gpt_neox(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """GPT-NeoX (Pythia, StableLM tuned alpha): LayerNorm, partial rotary, q|k|v fused per head,
    parallel (use_parallel_residual) or sequential residual, each with its own two norms."""
    prefix = find_prefix(weights, ["gpt_neox.", ""], "embed_in.weight")
    heads_names = ("embed_out", "lm_head")
    spec = Spec(weights, prefix + "embed_in.weight", _ignore_buffers("embed_out.weight", "lm_head.weight"))
    sizes = common_sizes(hf)
    h, hd = sizes["num_heads"], sizes["head_dim"]
    max_positions = int(hf.get("max_position_embeddings"))
    _rope_parameters(hf, "rotary_pct", "rotary_emb_base")
    spec.add("embed.weight", prefix + "embed_in.weight")
    _layer_norm(spec, "final_norm", prefix + "final_layer_norm")
    tied = _head(spec, hf, heads_names)
    bias = {"qkv": False, "o": False, "mlp": False}

    def split_qkv(fused):
        return split_rows_per_head(fused, h, (1, 1, 1), hd)

    for i in range(sizes["num_layers"]):
        p, c = f"{prefix}layers.{i}.", f"layers.{i}."
        _layer_norm(spec, c + "attn_norm", p + "input_layernorm")
        _layer_norm(spec, c + "mlp_norm", p + "post_attention_layernorm")
        qkv = p + "attention.query_key_value"
        spec.add_derived([c + "q.weight", c + "k.weight", c + "v.weight"], [qkv + ".weight"], split_qkv)
        if spec.has(qkv + ".bias"):
            spec.add_derived([c + "q.bias", c + "k.bias", c + "v.bias"], [qkv + ".bias"], split_qkv)
            bias["qkv"] = True
        bias["o"] |= spec.add_linear(c + "o", p + "attention.dense")
        bias["mlp"] |= spec.add_linear(c + "up", p + "mlp.dense_h_to_4h")
        bias["mlp"] |= spec.add_linear(c + "down", p + "mlp.dense_4h_to_h")
    parallel = bool(hf.get("use_parallel_residual"))
    spec.config_fields = dict(
        architecture="gpt_neox", vocab_size=weights.shape(prefix + "embed_in.weight")[0], **sizes,
        norm_type="layer", norm_eps=float(hf.get("layer_norm_eps")), block="parallel" if parallel else "sequential",
        activation=activation(hf.get("hidden_act"), "gpt_neox"), mlp="plain",
        attention_bias=bias["qkv"], attention_out_bias=bias["o"], mlp_bias=bias["mlp"],
        position_embedding="rope", max_position_embeddings=max_positions, **rope(hf, hd, max_positions),
        tie_word_embeddings=tied)
    return spec


# ---------------------------------------------------------------------------- StableLM
@register_loader("stablelm", defaults=STABLELM_DEFAULTS)
def stablelm(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """StableLM 2 / 3B-4E1T: LayerNorm, partial rotary, gated MLP, optional q/k/v biases; parallel
    residual (use_parallel_residual) shares the input norm."""
    _no_qk_layernorm(hf)
    prefix = find_prefix(weights, ["model.", ""], "embed_tokens.weight")
    spec = Spec(weights, prefix + "embed_tokens.weight", _ignore_buffers("lm_head.weight"))
    sizes = common_sizes(hf)
    sizes["head_dim"] = sizes["hidden_size"] // sizes["num_heads"]  # StableLM ignores a head_dim key
    max_positions = int(hf.get("max_position_embeddings"))
    parallel = bool(hf.get("use_parallel_residual"))
    spec.add("embed.weight", prefix + "embed_tokens.weight")
    _layer_norm(spec, "final_norm", prefix + "norm")
    tied = _head(spec, hf, ("lm_head",))
    qkv_bias = False
    for i in range(sizes["num_layers"]):
        p, c = f"{prefix}layers.{i}.", f"layers.{i}."
        _layer_norm(spec, c + "attn_norm", p + "input_layernorm")
        if not parallel:
            _layer_norm(spec, c + "mlp_norm", p + "post_attention_layernorm")
        for name in ("q", "k", "v"):
            qkv_bias |= spec.add_linear(c + name, p + f"self_attn.{name}_proj")
        spec.add_linear(c + "o", p + "self_attn.o_proj")
        for name in ("gate", "up", "down"):
            spec.add_linear(c + name, p + f"mlp.{name}_proj")
    spec.config_fields = dict(
        architecture="stablelm", vocab_size=weights.shape(prefix + "embed_tokens.weight")[0], **sizes,
        norm_type="layer", norm_eps=float(hf.get("layer_norm_eps")),
        block="parallel" if parallel else "sequential", shared_block_norm=parallel,
        activation=activation(hf.get("hidden_act"), "stablelm"), mlp="gated", attention_bias=qkv_bias,
        position_embedding="rope", max_position_embeddings=max_positions,
        **rope(hf, sizes["head_dim"], max_positions), tie_word_embeddings=tied)
    return spec


# ---------------------------------------------------------------------------- GPT-J and CodeGen
def _gptj_like(hf: HFConfig, weights: SafetensorsReader, fused_qkv: bool) -> Spec:
    """GPT-J and CodeGen: one LayerNorm feeding attention and MLP in parallel, interleaved partial
    rotary (rotary_dim), no attention biases, an output head with a bias."""
    mt = hf.model_type
    prefix = find_prefix(weights, ["transformer.", ""], "wte.weight")
    spec = Spec(weights, prefix + "wte.weight", _ignore_buffers("lm_head.weight"))
    hidden, heads = int(hf.require("n_embd", "hidden_size")), int(hf.require("n_head", "num_attention_heads"))
    num_layers = int(hf.require("n_layer", "num_hidden_layers"))
    hd = hidden // heads
    rotary = int(hf.get("rotary_dim") or hd)
    max_positions = int(hf.require("n_positions", "max_position_embeddings"))
    spec.add("embed.weight", prefix + "wte.weight")
    _layer_norm(spec, "final_norm", prefix + "ln_f")
    tied = _head(spec, hf, ("lm_head",))

    def half(w):
        return _interleaved_to_half(w, hd, rotary, heads)

    def split_codegen(fused):
        local = hidden // CODEGEN_MP_NUM
        q, v, k = split_rows_per_head(fused, CODEGEN_MP_NUM, (1, 1, 1), local)  # [in, out] each
        perm = rotate_half_permutation(hd, rotary, heads)
        return q[:, perm], k[:, perm], v

    for i in range(num_layers):
        p, c = f"{prefix}h.{i}.", f"layers.{i}."
        _layer_norm(spec, c + "attn_norm", p + "ln_1")
        if fused_qkv:
            spec.add_derived([c + "q.weight", c + "k.weight", c + "v.weight"], [p + "attn.qkv_proj.weight"],
                             split_codegen)
        else:
            spec.add_derived([c + "q.weight"], [p + "attn.q_proj.weight"], lambda w: [half(w)])
            spec.add_derived([c + "k.weight"], [p + "attn.k_proj.weight"], lambda w: [half(w)])
            spec.add(c + "v.weight", p + "attn.v_proj.weight", transpose=True)
        spec.add(c + "o.weight", p + "attn.out_proj.weight", transpose=True)
        spec.add_linear(c + "up", p + "mlp.fc_in")
        spec.add_linear(c + "down", p + "mlp.fc_out")
    spec.config_fields = dict(
        architecture=mt, vocab_size=weights.shape(prefix + "wte.weight")[0], hidden_size=hidden,
        num_layers=num_layers, num_heads=heads, num_kv_heads=heads, head_dim=hd,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        norm_type="layer", norm_eps=float(hf.get("layer_norm_epsilon")), block="parallel", shared_block_norm=True,
        activation=activation(hf.get("activation_function"), mt), mlp="plain", mlp_bias=True,
        position_embedding="rope", max_position_embeddings=max_positions, rope_theta=10000.0,
        rotary_dim=None if rotary == hd else rotary, tie_word_embeddings=tied,
        lm_head_bias="lm_head.bias" in spec.tensors)
    return spec


@register_loader("gptj", defaults=GPTJ_DEFAULTS)
def gptj(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    return _gptj_like(hf, weights, fused_qkv=False)


@register_loader("codegen", defaults=CODEGEN_DEFAULTS)
def codegen(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    hidden = int(hf.require("n_embd", "hidden_size"))
    if hidden % CODEGEN_MP_NUM:
        raise ValueError(f"codegen hidden size {hidden} does not divide into its {CODEGEN_MP_NUM} qkv blocks")
    return _gptj_like(hf, weights, fused_qkv=True)


# ---------------------------------------------------------------------------- Phi
@register_loader("phi", defaults=PHI_DEFAULTS)
def phi(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """Phi-1 / Phi-1.5 / Phi-2: one LayerNorm feeding attention and MLP in parallel, partial rotary,
    biases everywhere, an output head with a bias."""
    _no_qk_layernorm(hf)
    prefix = find_prefix(weights, ["model.", ""], "embed_tokens.weight")
    spec = Spec(weights, prefix + "embed_tokens.weight", _ignore_buffers("lm_head.weight"))
    sizes = common_sizes(hf)
    max_positions = int(hf.get("max_position_embeddings"))
    spec.add("embed.weight", prefix + "embed_tokens.weight")
    _layer_norm(spec, "final_norm", prefix + "final_layernorm")
    tied = _head(spec, hf, ("lm_head",))
    for i in range(sizes["num_layers"]):
        p, c = f"{prefix}layers.{i}.", f"layers.{i}."
        _layer_norm(spec, c + "attn_norm", p + "input_layernorm")
        for name in ("q", "k", "v"):
            spec.add_linear(c + name, p + f"self_attn.{name}_proj")
        spec.add_linear(c + "o", p + "self_attn.dense")
        spec.add_linear(c + "up", p + "mlp.fc1")
        spec.add_linear(c + "down", p + "mlp.fc2")
    spec.config_fields = dict(
        architecture="phi", vocab_size=weights.shape(prefix + "embed_tokens.weight")[0], **sizes,
        norm_type="layer", norm_eps=float(hf.get("layer_norm_eps")), block="parallel", shared_block_norm=True,
        activation=activation(hf.get("hidden_act"), "phi"), mlp="plain",
        attention_bias=True, attention_out_bias=True, mlp_bias=True,
        position_embedding="rope", max_position_embeddings=max_positions,
        **rope(hf, sizes["head_dim"], max_positions), tie_word_embeddings=tied,
        lm_head_bias="lm_head.bias" in spec.tensors)
    return spec


# ---------------------------------------------------------------------------- StarCoder2
@register_loader("starcoder2", defaults=STARCODER2_DEFAULTS)
def starcoder2(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """StarCoder2: LayerNorm with bias, GQA, rotary, biases (use_bias), plain MLP, optional sliding
    window on every layer."""
    prefix = find_prefix(weights, ["model.", ""], "embed_tokens.weight")
    spec = Spec(weights, prefix + "embed_tokens.weight", _ignore_buffers("lm_head.weight"))
    sizes = common_sizes(hf)
    max_positions = int(hf.get("max_position_embeddings"))
    kinds, window = layer_types(hf, sizes["num_layers"], hf.get("sliding_window"))
    spec.add("embed.weight", prefix + "embed_tokens.weight")
    _layer_norm(spec, "final_norm", prefix + "norm")
    tied = _head(spec, hf, ("lm_head",))
    bias = {"qkv": False, "o": False, "mlp": False}
    for i in range(sizes["num_layers"]):
        p, c = f"{prefix}layers.{i}.", f"layers.{i}."
        _layer_norm(spec, c + "attn_norm", p + "input_layernorm")
        _layer_norm(spec, c + "mlp_norm", p + "post_attention_layernorm")
        for name in ("q", "k", "v"):
            bias["qkv"] |= spec.add_linear(c + name, p + f"self_attn.{name}_proj")
        bias["o"] |= spec.add_linear(c + "o", p + "self_attn.o_proj")
        bias["mlp"] |= spec.add_linear(c + "up", p + "mlp.c_fc")
        bias["mlp"] |= spec.add_linear(c + "down", p + "mlp.c_proj")
    spec.config_fields = dict(
        architecture="starcoder2", vocab_size=weights.shape(prefix + "embed_tokens.weight")[0], **sizes,
        norm_type="layer", norm_eps=float(hf.get("norm_epsilon")),
        activation=activation(hf.get("hidden_act"), "starcoder2"), mlp="plain",
        attention_bias=bias["qkv"], attention_out_bias=bias["o"], mlp_bias=bias["mlp"],
        layer_types=kinds, sliding_window=int(window) if window else None,
        position_embedding="rope", max_position_embeddings=max_positions,
        **rope(hf, sizes["head_dim"], max_positions), tie_word_embeddings=tied)
    return spec


# ---------------------------------------------------------------------------- GPTBigCode
@register_loader("gpt_bigcode", defaults=GPT_BIGCODE_DEFAULTS)
def gpt_bigcode(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """GPTBigCode (StarCoder, SantaCoder): GPT-2 with nn.Linear weights and multi-query attention
    (c_attn = q | k | v with one key/value head), or with multi_query=False q|k|v fused per head."""
    prefix = find_prefix(weights, ["transformer.", ""], "wte.weight")
    spec = Spec(weights, prefix + "wte.weight", _ignore_buffers("lm_head.weight"))
    hidden, heads = int(hf.require("n_embd", "hidden_size")), int(hf.require("n_head", "num_attention_heads"))
    num_layers = int(hf.require("n_layer", "num_hidden_layers"))
    hd = hidden // heads
    multi_query = bool(hf.get("multi_query"))
    kv_heads = 1 if multi_query else heads
    spec.add("embed.weight", prefix + "wte.weight")
    spec.add("pos_embed.weight", prefix + "wpe.weight")
    _layer_norm(spec, "final_norm", prefix + "ln_f")
    tied = _head(spec, hf, ("lm_head",))

    def per_head(fused):
        return split_rows_per_head(fused, heads, (1, 1, 1), hd)

    for i in range(num_layers):
        p, c = f"{prefix}h.{i}.", f"layers.{i}."
        _layer_norm(spec, c + "attn_norm", p + "ln_1")
        _layer_norm(spec, c + "mlp_norm", p + "ln_2")
        names = [c + "q", c + "k", c + "v"]
        if multi_query:
            sizes = [hidden, hd, hd]
            spec.add_split([n + ".weight" for n in names], p + "attn.c_attn.weight", sizes, axis=0, transpose=True)
            spec.add_split([n + ".bias" for n in names], p + "attn.c_attn.bias", sizes, axis=0, transpose=False)
        else:
            spec.add_derived([n + ".weight" for n in names], [p + "attn.c_attn.weight"], per_head)
            spec.add_derived([n + ".bias" for n in names], [p + "attn.c_attn.bias"], per_head)
        spec.add_linear(c + "o", p + "attn.c_proj")
        spec.add_linear(c + "up", p + "mlp.c_fc")
        spec.add_linear(c + "down", p + "mlp.c_proj")
    spec.config_fields = dict(
        architecture="gpt_bigcode", vocab_size=weights.shape(prefix + "wte.weight")[0], hidden_size=hidden,
        num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        norm_type="layer", norm_eps=float(hf.get("layer_norm_epsilon")),
        activation=activation(hf.get("activation_function"), "gpt_bigcode"), mlp="plain",
        attention_scale=None if hf.get("scale_attn_weights") else 1.0,
        attention_bias=True, attention_out_bias=True, mlp_bias=True,
        position_embedding="learned", max_position_embeddings=weights.shape(prefix + "wpe.weight")[0],
        tie_word_embeddings=tied)
    return spec
