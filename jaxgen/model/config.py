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

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"

NORM_TYPES = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
POSITION_EMBEDDINGS = ("rope", "learned")
LAYER_TYPES = ("full", "sliding")
ROPE_SCALING_TYPES = ("linear", "llama3", "longrope")
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
    post_attention_norm: bool = False  # Gemma 2/3 "sandwich" norms after attention ...
    post_mlp_norm: bool = False  # ... and after the MLP
    qk_norm: bool = False  # RMSNorm over head_dim of queries and keys (Qwen3, Gemma 3)
    # MLP
    activation: str = "silu"
    gated_mlp: bool = True
    # attention
    attention_scale: Optional[float] = None  # None: head_dim ** -0.5
    attn_logit_softcapping: Optional[float] = None
    attention_bias: bool = False  # bias on q, k, v
    attention_out_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple = ()  # per layer "full" or "sliding"; empty means all full
    sliding_window: Optional[int] = None
    # positions
    position_embedding: str = "rope"
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rope_local_theta: Optional[float] = None  # theta of sliding layers when it differs (Gemma 3)
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of the HF rope_scaling dict
    rotary_dim: Optional[int] = None  # None: head_dim (partial rotary otherwise)
    # embeddings and head
    embedding_scale: Optional[float] = None  # Gemma multiplies embeddings by sqrt(hidden)
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False
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
        need(0 < rot <= self.head_dim and rot % 2 == 0, f"rotary_dim {rot} must be even and <= head_dim")
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
        out["layer_types"] = list(self.layer_types)
        out["rope_scaling"] = _thaw(self.rope_scaling) if self.rope_scaling else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"invalid model config: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
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
