"""Llama-style families that differ in their MLP or in a few config values: the mixtures of experts
(mixtral, qwen2_moe with its shared expert, qwen3_moe) and olmo2, granite, smollm3.

Each is `llama_like` with an MLP mapper and/or `ModelConfig` overrides. Experts are read in the
per-expert layout `save_pretrained` writes (`experts.{e}.w1/w2/w3` or
`experts.{e}.gate_proj/up_proj/down_proj`) or the fused one of transformers 5 modules
(`experts.gate_up_proj` [E, 2F, D], `experts.down_proj` [E, D, F]), stacked into the canonical
expert_gate / expert_up [E, D, F] and expert_down [E, F, D].
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from jaxgen.converters.hf_loader import HFConfig, Spec, register_loader, stack_experts
from jaxgen.converters.loaders.llama import llama_like, map_gated_mlp
from jaxgen.converters.safetensors_reader import SafetensorsReader

MIXTRAL_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        hidden_act="silu", rope_theta=1e6, sliding_window=None, num_experts_per_tok=2,
                        num_local_experts=8)
QWEN2_MOE_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-6,
                          hidden_act="silu", rope_theta=10000.0, use_sliding_window=False, sliding_window=4096,
                          max_window_layers=28, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                          num_experts_per_tok=4, num_experts=60, moe_intermediate_size=1408,
                          shared_expert_intermediate_size=5632)
QWEN3_MOE_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-6,
                          hidden_act="silu", rope_theta=10000.0, use_sliding_window=False, sliding_window=None,
                          max_window_layers=28, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                          num_experts_per_tok=8, num_experts=128, moe_intermediate_size=768)
OLMO2_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      hidden_act="silu", rope_theta=10000.0)
GRANITE_DEFAULTS = dict(tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-6,
                        hidden_act="silu", rope_theta=10000.0, embedding_multiplier=1.0, residual_multiplier=1.0,
                        attention_multiplier=1.0, logits_scaling=1.0)
SMOLLM3_DEFAULTS = dict(tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
                        hidden_act="silu", rope_theta=2e6, use_sliding_window=False, sliding_window=None,
                        no_rope_layer_interval=4)


def map_experts(spec: Spec, hf_prefix: str, canonical: str, experts: int, names: Tuple[str, str, str]) -> None:
    """Stacks `experts` experts under `hf_prefix` + "experts." into expert_gate / expert_up /
    expert_down; `names` are the per-expert (gate, up, down) tensor names (w1, w3, w2 for Mixtral)."""
    base = hf_prefix + "experts."
    fused = base + "gate_up_proj"
    out = [canonical + f"expert_{kind}.weight" for kind in ("gate", "up", "down")]
    if spec.has(fused):
        def split(gate_up: np.ndarray, down: np.ndarray):
            width = gate_up.shape[1] // 2
            return (np.swapaxes(gate_up[:, :width], 1, 2), np.swapaxes(gate_up[:, width:], 1, 2),
                    np.swapaxes(down, 1, 2))

        spec.add_derived(out, [fused, base + "down_proj"], split)
        return
    for target, name in zip(out, names):
        spec.add_derived([target], [f"{base}{e}.{name}.weight" for e in range(experts)], stack_experts)


def _router(spec: Spec, canonical: str, hf_name: str) -> None:
    spec.add(canonical + "router.weight", hf_name, transpose=True)


def _moe_sizes(hf: HFConfig) -> Tuple[int, int]:
    experts = int(hf.get("num_local_experts") or hf.require("num_experts"))
    return experts, int(hf.require("num_experts_per_tok"))


@register_loader("mixtral", defaults=MIXTRAL_DEFAULTS)
def mixtral(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    experts, top_k = _moe_sizes(hf)

    def mlp(spec: Spec, hf_prefix: str, canonical: str, layer: int) -> bool:
        moe = hf_prefix.replace("mlp.", "block_sparse_moe.")
        if not spec.has(moe + "gate.weight"):  # transformers 5 names the module mlp
            moe = hf_prefix
        _router(spec, canonical, moe + "gate.weight")
        map_experts(spec, moe, canonical, experts, ("w1", "w3", "w2"))
        return False

    return llama_like(hf, weights, mlp, mlp="experts", num_experts=experts, experts_per_token=top_k,
                      expert_intermediate_size=int(hf.require("intermediate_size")), normalize_expert_weights=True)


def _qwen_moe(hf: HFConfig, weights: SafetensorsReader, shared: bool) -> Spec:
    experts, top_k = _moe_sizes(hf)
    num_layers = int(hf.require("num_hidden_layers"))
    step = int(hf.get("decoder_sparse_step") or 1)
    only_mlp = set(hf.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(num_layers) if i in only_mlp or (i + 1) % step != 0)

    def mlp(spec: Spec, hf_prefix: str, canonical: str, layer: int) -> bool:
        if layer in dense:
            return map_gated_mlp(spec, hf_prefix, canonical, layer)
        _router(spec, canonical, hf_prefix + "gate.weight")
        map_experts(spec, hf_prefix, canonical, experts, ("gate_proj", "up_proj", "down_proj"))
        if shared:
            for kind in ("gate", "up", "down"):
                spec.add(canonical + f"shared_{kind}.weight", hf_prefix + f"shared_expert.{kind}_proj.weight",
                         transpose=True)
            spec.add(canonical + "shared_expert_gate.weight", hf_prefix + "shared_expert_gate.weight", transpose=True)
        return False

    fields = dict(mlp="experts", num_experts=experts, experts_per_token=top_k, dense_layers=dense,
                  expert_intermediate_size=int(hf.require("moe_intermediate_size")),
                  normalize_expert_weights=bool(hf.get("norm_topk_prob")))
    if shared:
        fields["shared_expert_intermediate_size"] = int(hf.require("shared_expert_intermediate_size"))
    return llama_like(hf, weights, mlp, **fields)


@register_loader("qwen2_moe", defaults=QWEN2_MOE_DEFAULTS)
def qwen2_moe(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    return _qwen_moe(hf, weights, shared=True)


@register_loader("qwen3_moe", defaults=QWEN3_MOE_DEFAULTS)
def qwen3_moe(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    return _qwen_moe(hf, weights, shared=False)


@register_loader("olmo2", defaults=OLMO2_DEFAULTS)
def olmo2(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """Norms after each sublayer (norm_placement "output") and q/k norms over all heads at once:
    both are read from llama_like's tables by model type."""
    return llama_like(hf, weights)


@register_loader("granite", defaults=GRANITE_DEFAULTS)
def granite(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    return llama_like(hf, weights, embedding_scale=float(hf.get("embedding_multiplier")),
                      residual_scale=float(hf.get("residual_multiplier")),
                      attention_scale=float(hf.get("attention_multiplier")),
                      logit_scale=1.0 / float(hf.get("logits_scaling")))


@register_loader("smollm3", defaults=SMOLLM3_DEFAULTS)
def smollm3(hf: HFConfig, weights: SafetensorsReader) -> Spec:
    """Every `no_rope_layer_interval`-th layer applies no rotary embedding (no_rope_layers[i] == 0)."""
    num_layers = int(hf.require("num_hidden_layers"))
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = int(hf.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    return llama_like(hf, weights, nope_layers=tuple(i for i, use in enumerate(flags) if not use))
