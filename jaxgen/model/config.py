"""`ModelConfig`: every architecture field of the one decoder, and its `config.json` form.

Architectures differ only in the values of these fields (filled in by the converters); the
decoder in `jaxgen.model.decoder` reads nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

FORMAT_VERSION = 2
CONFIG_FILE = "config.json"

NORM_TYPES = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
POSITION_EMBEDDINGS = ("rope", "learned", "alibi", "none")
LAYER_TYPES = ("full", "sliding")
# How a layer combines its attention and MLP with the residual stream (see jaxgen.model.decoder):
BLOCKS = ("sequential", "parallel")  # parallel: x + attn(norm(x)) + mlp(norm'(x)) (GPT-NeoX, GPT-J, Falcon)
NORM_PLACEMENTS = ("pre", "sandwich", "output", "post")  # pre: x + f(n(x)); sandwich: x + n'(f(n(x)));
# output: x + n'(f(x)) (OLMo 2); post: n(x + f(x)) (OPT-350m, the original transformer)
MLPS = ("plain", "gated", "experts", "gated_and_experts")  # act(x W1) W2; act(x Wg) * (x Wu) Wd; top-k
# routed gated experts; a gated MLP and experts side by side, each output normed (Gemma 4)
ROUTERS = ("plain", "scaled")  # x . W; Gemma 4: rms(x) * scale / sqrt(D) . W, top-k weights * expert scale
QK_NORMS = ("none", "head", "full")  # RMSNorm of q and k over each head's dims, or over all heads at once
ROPE_SCALING_TYPES = ("linear", "llama3", "longrope", "proportional")
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Hashable (tuples, not lists) so that it can be a static argument of jitted functions.
    """

    architecture: str  # the source family, e.g. "gemma3", "llama"; informational only
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    # normalisation
    norm_type: str = "rms"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma stores w and multiplies by (offset + w), offset = 1
    norm_bias: bool = True  # LayerNorm has a bias (MPT's has none); RMSNorm never has one
    norm_placement: str = "pre"  # see NORM_PLACEMENTS
    qk_norm: str = "none"  # see QK_NORMS; True/False are read as "head"/"none"
    value_norm: bool = False  # values RMS-normed over each head's dims, without a weight (Gemma 4)
    final_norm: bool = True  # a norm after the last layer (OPT-350m has none)
    embedding_norm: bool = False  # a norm of the embeddings before the first layer (BLOOM)
    # block
    block: str = "sequential"  # see BLOCKS
    shared_block_norm: bool = False  # parallel blocks: one norm feeds attention and MLP (GPT-J, Phi-2)
    residual_scale: Optional[float] = None  # sublayer outputs are scaled before they are added (Granite)
    layer_scale: bool = False  # each layer's output is multiplied by its stored scalar (Gemma 4)
    # per-layer inputs (Gemma 4's PLE): a second embedding of per_layer_input_size per layer, mixed
    # with a projection of the embeddings, enters each layer after its MLP through a gated projection
    per_layer_input_size: int = 0
    # MLP
    activation: str = "silu"
    mlp: str = "gated"  # see MLPS
    intermediate_sizes: tuple = ()  # per-layer MLP widths when they differ (Gemma 4's double-wide layers)
    # mixture of experts (mlp == "experts"): a router picks experts_per_token of num_experts gated
    # MLPs of width expert_intermediate_size for each token; `dense_layers` use a gated MLP of
    # intermediate_size instead; a shared expert (Qwen2-MoE) of shared_expert_intermediate_size runs
    # on every token, scaled by sigmoid(x . shared_expert_gate)
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    normalize_expert_weights: bool = True  # the top-k routing weights are renormalised to sum to 1
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple = ()
    router: str = "plain"  # see ROUTERS
    # attention
    attention_scale: Optional[float] = None  # None: head_dim ** -0.5
    attn_logit_softcapping: Optional[float] = None
    attention_bias: bool = False  # bias on q, k, v
    attention_out_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple = ()  # per layer "full" or "sliding"; empty means all full
    sliding_window: Optional[int] = None
    # full-attention layers' head dim and key/value heads when they differ from the sliding ones' (Gemma 4)
    full_head_dim: Optional[int] = None
    full_kv_heads: Optional[int] = None
    # per layer, the earlier layer whose keys and values it attends to (its own index: its own
    # projections); empty: every layer its own (Gemma 4's shared-KV layers)
    kv_sources: tuple = ()
    # positions
    position_embedding: str = "rope"
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rope_local_theta: Optional[float] = None  # theta of sliding layers when it differs (Gemma 3)
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of the HF rope_scaling dict
    rotary_dim: Optional[int] = None  # None: head_dim (partial rotary otherwise)
    nope_layers: tuple = ()  # layers that apply no rotary embedding (SmolLM3)
    alibi_slopes: Optional[tuple] = None  # ALiBi: per query head, added as slope * (k_pos - q_pos)
    # embeddings and head
    embedding_scale: Optional[float] = None  # Gemma multiplies embeddings by sqrt(hidden)
    embedding_size: Optional[int] = None  # embeddings narrower than hidden_size, projected in and out (OPT-350m)
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False
    logit_scale: Optional[float] = None  # logits are multiplied by it (Granite: 1 / logits_scaling)
    final_logit_softcapping: Optional[float] = None
    # tokens
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    unk_token: Optional[str] = None
    pad_token: Optional[str] = None
    add_bos_token: bool = False  # what the original tokenizer does for the CLI; the API adds none
    # storage
    weight_dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    # layout, not architecture (never saved): the jax.sharding.Mesh (one "model" axis) that
    # tensor parallelism shards the weights over, None on one device (see jaxgen.runtime.replicas)
    mesh: Optional[Any] = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if isinstance(self.qk_norm, bool):
            object.__setattr__(self, "qk_norm", "head" if self.qk_norm else "none")
        for name in ("dense_layers", "nope_layers", "intermediate_sizes", "kv_sources"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        if self.alibi_slopes is not None:
            object.__setattr__(self, "alibi_slopes", tuple(float(x) for x in self.alibi_slopes))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent field."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        need(self.norm_type in NORM_TYPES, f"norm_type {self.norm_type!r} not in {NORM_TYPES}")
        need(self.activation in ACTIVATIONS, f"activation {self.activation!r} not in {ACTIVATIONS}")
        need(self.position_embedding in POSITION_EMBEDDINGS,
             f"position_embedding {self.position_embedding!r} not in {POSITION_EMBEDDINGS}")
        need(self.block in BLOCKS, f"block {self.block!r} not in {BLOCKS}")
        need(self.norm_placement in NORM_PLACEMENTS, f"norm_placement {self.norm_placement!r} not in {NORM_PLACEMENTS}")
        need(self.mlp in MLPS, f"mlp {self.mlp!r} not in {MLPS}")
        need(self.qk_norm in QK_NORMS, f"qk_norm {self.qk_norm!r} not in {QK_NORMS}")
        need(self.block == "sequential" or self.norm_placement == "pre",
             "parallel blocks take their norms before the sublayers (norm_placement 'pre')")
        need(not self.shared_block_norm or self.block == "parallel", "shared_block_norm needs a parallel block")
        need(self.router in ROUTERS, f"router {self.router!r} not in {ROUTERS}")
        if self.mlp in ("experts", "gated_and_experts"):
            need(self.num_experts > 0 and 0 < self.experts_per_token <= self.num_experts,
                 f"experts need 0 < experts_per_token ({self.experts_per_token}) <= num_experts ({self.num_experts})")
            need(self.expert_intermediate_size > 0, "experts need a positive expert_intermediate_size")
        need(not self.intermediate_sizes or (len(self.intermediate_sizes) == self.num_layers
                                             and min(self.intermediate_sizes) > 0),
             "intermediate_sizes needs one positive width per layer")
        need(not self.kv_sources or (len(self.kv_sources) == self.num_layers and all(
            0 <= s <= i and self.kv_sources[s] == s and self.layer_types[s] == self.layer_types[i]
            for i, s in enumerate(self.kv_sources))),
             "kv_sources needs, per layer, itself or an earlier layer of the same type that has its own keys")
        for name in ("full_head_dim", "full_kv_heads", "per_layer_input_size"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 0), f"{name} must be a non-negative int")
        need(self.full_kv_heads is None or (self.full_kv_heads > 0 and self.num_heads % self.full_kv_heads == 0),
             f"num_heads ({self.num_heads}) must be a multiple of full_kv_heads ({self.full_kv_heads})")
        need(all(0 <= i < self.num_layers for i in self.dense_layers + self.nope_layers),
             "dense_layers and nope_layers must be layer indices")
        if self.position_embedding == "alibi":
            need(self.alibi_slopes is not None and len(self.alibi_slopes) == self.num_heads,
                 f"ALiBi needs one slope per query head ({self.num_heads})")
        need(self.embedding_size is None or self.embedding_size > 0, "embedding_size must be positive")
        need(len(self.layer_types) == self.num_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        need(all(t in LAYER_TYPES for t in self.layer_types), f"layer_types must be in {LAYER_TYPES}")
        if "sliding" in self.layer_types:
            need(bool(self.sliding_window) and self.sliding_window > 0,
                 "sliding layers need a positive sliding_window")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type")
            need(kind in ROPE_SCALING_TYPES, f"rope_scaling type {kind!r} not in {ROPE_SCALING_TYPES}")
        rot = self.rotary_dim if self.rotary_dim is not None else self.head_dim
        need(0 < rot <= min(self.head_dim, self.full_head_dim or self.head_dim) and rot % 2 == 0,
             f"rotary_dim {rot} must be even and <= head_dim")
        need(self.weight_dtype in WEIGHT_DTYPES, f"weight_dtype {self.weight_dtype!r} not in {WEIGHT_DTYPES}")
        need(self.format_version == FORMAT_VERSION,
             f"unknown format_version {self.format_version} (this jaxgen reads version {FORMAT_VERSION})")

    # ------------------------------------------------------------------ derived values
    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    @property
    def rotary(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    def layer_head_dim(self, layer: int) -> int:
        """Head dim of one layer's attention (full layers may differ: `full_head_dim`)."""
        if self.full_head_dim and self.layer_types[layer] == "full":
            return self.full_head_dim
        return self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        """Key/value heads of one layer (full layers may differ: `full_kv_heads`)."""
        if self.full_kv_heads and self.layer_types[layer] == "full":
            return self.full_kv_heads
        return self.num_kv_heads

    def layer_intermediate_size(self, layer: int) -> int:
        return self.intermediate_sizes[layer] if self.intermediate_sizes else self.intermediate_size

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values `layer` attends to (itself unless it shares them)."""
        return self.kv_sources[layer] if self.kv_sources else layer

    @property
    def max_head_dim(self) -> int:
        return max(self.layer_head_dim(i) for i in range(self.num_layers))

    def rotary_of(self, local: bool) -> int:
        """Rotated dims of full (local=False) or sliding layers' heads."""
        if self.rotary_dim is not None:
            return self.rotary_dim
        return self.head_dim if local or not self.full_head_dim else self.full_head_dim

    @property
    def tensor_parallel_size(self) -> int:
        """Devices the weights are sharded over (1 without tensor parallelism)."""
        return 1 if self.mesh is None else int(self.mesh.devices.size)

    @property
    def kv_head_copies(self) -> int:
        """Copies of each key/value head in the weights and the KV cache: n / gcd(num_kv_heads, n)
        over n tensor-parallel devices, so that the stored heads, lcm(num_kv_heads, n), divide over
        the devices and each device holds the KV heads its query heads read (1 without tensor
        parallelism, or when num_kv_heads divides by n)."""
        n = self.tensor_parallel_size
        return n // math.gcd(self.num_kv_heads, n)

    @property
    def stored_kv_heads(self) -> int:
        """Key/value heads as the weights and the KV cache hold them (num_kv_heads * kv_head_copies)."""
        return self.num_kv_heads * self.kv_head_copies

    def layer_stored_kv_heads(self, layer: int) -> int:
        """Key/value heads of one layer as its weights and cache hold them (see `stored_kv_heads`)."""
        if self.layer_kv_heads(layer) == self.num_kv_heads:
            return self.stored_kv_heads
        n = self.tensor_parallel_size
        kv = self.layer_kv_heads(layer)
        return kv * (n // math.gcd(kv, n))

    def layer_mlp(self, layer: int) -> str:
        """The MLP kind of one layer: `mlp`, or "gated" for the dense layers of an experts model."""
        return "gated" if self.has_experts and layer in self.dense_layers else self.mlp

    @property
    def has_experts(self) -> bool:
        return self.mlp in ("experts", "gated_and_experts")

    def layer_uses_rope(self, layer: int) -> bool:
        return self.position_embedding == "rope" and layer not in self.nope_layers

    @property
    def embedding_width(self) -> int:
        """Width of the embedding table (hidden_size unless embeddings are projected)."""
        return self.embedding_size or self.hidden_size

    @property
    def has_sliding_layers(self) -> bool:
        return "sliding" in self.layer_types

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling) if self.rope_scaling else {}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        # the mesh is a device layout, not part of the model
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mesh"}
        for name in ("layer_types", "dense_layers", "nope_layers", "intermediate_sizes", "kv_sources"):
            out[name] = list(getattr(self, name))
        out["alibi_slopes"] = list(self.alibi_slopes) if self.alibi_slopes is not None else None
        out["rope_scaling"] = _thaw(self.rope_scaling) if self.rope_scaling else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"invalid model config: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version == 1:
            data = _from_version_1(data)
            version = FORMAT_VERSION
        if version != FORMAT_VERSION:
            raise ValueError(
                f"invalid model config: unknown format_version {version!r} "
                f"(this jaxgen reads version {FORMAT_VERSION})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"invalid model config: unknown fields {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:  # missing required fields
            raise ValueError(f"invalid model config: {exc}") from None

    def save(self, model_dir: str) -> None:
        with open(os.path.join(model_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, model_dir: str) -> "ModelConfig":
        return cls.from_dict(read_json_file(os.path.join(model_dir, CONFIG_FILE)))


def _from_version_1(data: dict) -> dict:
    """A version-1 config (flat booleans for the MLP and the Gemma sandwich norms) in version 2's
    grouped fields; the weights' names and shapes did not change."""
    data = dict(data)
    gated = data.pop("gated_mlp", True)
    post_attention, post_mlp = data.pop("post_attention_norm", False), data.pop("post_mlp_norm", False)
    if post_attention != post_mlp:
        raise ValueError("invalid model config: version 1 configs with only one of post_attention_norm and "
                         "post_mlp_norm are not supported")
    data.update(mlp="gated" if gated else "plain", norm_placement="sandwich" if post_attention else "pre",
                format_version=FORMAT_VERSION)
    return data


def read_json_file(path: str) -> Any:
    """Parsed JSON of a file; ValueError naming the directory and file when it is missing or broken."""
    if not os.path.isfile(path):
        raise ValueError(f"{os.path.dirname(path) or '.'!r} has no {os.path.basename(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _freeze(value: Any) -> Any:
    """dicts/lists -> sorted tuples, recursively, so the config stays hashable."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str)
                                        for i in value) and value:
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def default_embedding_scale(hidden_size: int) -> float:
    return math.sqrt(hidden_size)
