"""The model directory: canonical parameter names, shapes, and load/save.

Files of a model directory:
  config.json         `ModelConfig` with its format version
  model.safetensors   flat canonical names (below), weights in [in, out] layout
  vocabulary.json     list of token strings, index = id
  tokenizer.model or tokenizer.json   the checkpoint's tokenizer (optional for the API)

Canonical names (`L` layers; per layer `layers.{i}.{module}.{kind}`):
  embed.weight [V, D]            pos_embed.weight [P, D] (learned positions only)
  layers.{i}.attn_norm   .weight/.bias [D]
  layers.{i}.q .weight [D, Hq*hd]   .bias [Hq*hd]
  layers.{i}.k / v .weight [D, Hkv*hd]  .bias
  layers.{i}.o .weight [Hq*hd, D]   .bias [D]
  layers.{i}.q_norm / k_norm .weight [hd]
  layers.{i}.post_attn_norm, mlp_norm, post_mlp_norm .weight/.bias [D]
  layers.{i}.gate / up .weight [D, F] .bias [F];  layers.{i}.down .weight [F, D] .bias [D]
  final_norm.weight/.bias [D]    lm_head.weight [D, V] .bias [V] (absent when tied)
int8 weights carry `<module>.weight_scale` (float32, one per output channel; for `embed`, one
per vocabulary row). The dequantised weight is `weight * weight_scale` (broadcast on the
output axis).

In memory, parameters form a nested pytree: `{"embed": {kind: array}, "layers": [per layer
{module: {kind: array}}], "final_norm": {...}, ...}`. Layers are separate arrays, not stacked:
XLA:CPU copies a stacked layer's weights when a scan slices them, which costs more than the
longer compile of an unrolled stack.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from jaxgen.model.config import ModelConfig, read_json_file

WEIGHTS_FILE = "model.safetensors"
VOCABULARY_FILE = "vocabulary.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")

LINEAR_MODULES = ("q", "k", "v", "o", "gate", "up", "down")
Shape = Tuple[int, ...]


def layer_module_shapes(config: ModelConfig) -> Dict[str, Dict[str, Shape]]:
    """Shapes of one layer's parameters: {module: {kind: shape}} (no int8 scales)."""
    d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
    layernorm = config.norm_type == "layer"

    def norm(dim: int) -> Dict[str, Shape]:
        return {"weight": (dim,), "bias": (dim,)} if layernorm else {"weight": (dim,)}

    def linear(n_in: int, n_out: int, bias: bool) -> Dict[str, Shape]:
        return {"weight": (n_in, n_out), "bias": (n_out,)} if bias else {"weight": (n_in, n_out)}

    shapes = {
        "attn_norm": norm(d),
        "q": linear(d, q_out, config.attention_bias),
        "k": linear(d, kv_out, config.attention_bias),
        "v": linear(d, kv_out, config.attention_bias),
        "o": linear(q_out, d, config.attention_out_bias),
        "mlp_norm": norm(d),
        "up": linear(d, f, config.mlp_bias),
        "down": linear(f, d, config.mlp_bias),
    }
    if config.gated_mlp:
        shapes["gate"] = linear(d, f, config.mlp_bias)
    if config.qk_norm:
        shapes["q_norm"] = {"weight": (hd,)}
        shapes["k_norm"] = {"weight": (hd,)}
    if config.post_attention_norm:
        shapes["post_attn_norm"] = norm(d)
    if config.post_mlp_norm:
        shapes["post_mlp_norm"] = norm(d)
    return shapes


def top_level_shapes(config: ModelConfig) -> Dict[str, Dict[str, Shape]]:
    """Shapes of the non-layer parameters: {module: {kind: shape}}."""
    d, v = config.hidden_size, config.vocab_size
    shapes: Dict[str, Dict[str, Shape]] = {"embed": {"weight": (v, d)}}
    shapes["final_norm"] = {"weight": (d,), "bias": (d,)} if config.norm_type == "layer" else {"weight": (d,)}
    if config.position_embedding == "learned":
        shapes["pos_embed"] = {"weight": (config.max_position_embeddings, d)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = {"weight": (d, v)}
    if config.lm_head_bias:
        shapes.setdefault("lm_head", {})["bias"] = (v,)
    return shapes


def is_quantizable(module: str, kind: str) -> bool:
    """Weights that int8 quantization applies to (linear layers, embeddings and the head)."""
    return kind == "weight" and (module in LINEAR_MODULES or module in ("embed", "lm_head"))


def scale_shape(module: str, shape: Shape) -> Shape:
    """One scale per output channel: the last axis, or the vocabulary rows of `embed`."""
    return (shape[0],) if module == "embed" else (shape[-1],)


def expected_flat_shapes(config: ModelConfig) -> Dict[str, Shape]:
    """Every canonical file name with its shape, int8 scales included when weight_dtype is int8."""
    int8 = config.weight_dtype == "int8"
    out: Dict[str, Shape] = {}
    for module, kinds in top_level_shapes(config).items():
        for kind, shape in kinds.items():
            out[f"{module}.{kind}"] = shape
            if int8 and is_quantizable(module, kind):
                out[f"{module}.weight_scale"] = scale_shape(module, shape)
    for i in range(config.num_layers):
        for module, kinds in layer_module_shapes(config).items():
            for kind, shape in kinds.items():
                out[f"layers.{i}.{module}.{kind}"] = shape
                if int8 and is_quantizable(module, kind):
                    out[f"layers.{i}.{module}.weight_scale"] = scale_shape(module, shape)
    return out


# ---------------------------------------------------------------------------- pytree <-> flat
def nest_params(flat: Dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Flat canonical names -> nested params pytree; "layers" is a list of per-layer dicts."""
    params: dict = {"layers": [{} for _ in range(config.num_layers)]}
    for name, array in flat.items():
        parts = name.split(".")
        if parts[0] == "layers":
            index, module, kind = int(parts[1]), parts[2], parts[3]
            params["layers"][index].setdefault(module, {})[kind] = array
        else:
            module, kind = parts
            params.setdefault(module, {})[kind] = array
    return params


# ---------------------------------------------------------------------------- files
def save_model_dir(
    output_dir: str,
    config: ModelConfig,
    flat: Dict[str, np.ndarray],
    vocabulary: List[str],
    tokenizer_files: Iterable[Tuple[str, bytes]] = (),
    extra_json: Optional[Dict[str, dict]] = None,
) -> None:
    """Writes a complete model directory. `flat` must match `expected_flat_shapes(config)`."""
    from safetensors.numpy import save_file

    check_flat_shapes(flat, config)
    if len(vocabulary) != config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocabulary)} tokens, config.vocab_size is {config.vocab_size}")
    os.makedirs(output_dir, exist_ok=True)
    config.save(output_dir)
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, os.path.join(output_dir, WEIGHTS_FILE),
              metadata={"format": "jaxgen", "format_version": str(config.format_version)})
    with open(os.path.join(output_dir, VOCABULARY_FILE), "w", encoding="utf-8") as f:
        json.dump(vocabulary, f, ensure_ascii=False)
    for name, data in tokenizer_files:
        with open(os.path.join(output_dir, name), "wb") as f:
            f.write(data)
    for name, obj in (extra_json or {}).items():
        with open(os.path.join(output_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)


def check_flat_shapes(flat: Dict[str, np.ndarray], config: ModelConfig) -> None:
    """Raises ValueError naming a missing, unexpected or wrongly shaped tensor."""
    expected = expected_flat_shapes(config)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise ValueError(f"model weights are missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        raise ValueError(f"model weights have unexpected tensors: {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(flat[name].shape) != tuple(shape):
            raise ValueError(f"tensor {name} has shape {tuple(flat[name].shape)}, expected {tuple(shape)}")


def check_model_dir(model_dir) -> str:
    """The path of an existing directory; TypeError/ValueError otherwise."""
    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"model_path must be a path string, got {type(model_dir).__name__}")
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist")
    return model_dir


def load_model_dir(model_dir: str) -> Tuple[ModelConfig, Dict[str, np.ndarray], List[str]]:
    """Reads and validates a model directory: (config, flat numpy weights, vocabulary)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    model_dir = check_model_dir(model_dir)
    config = ModelConfig.load(model_dir)
    weights_path = os.path.join(model_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise ValueError(f"model directory {model_dir!r} has no {WEIGHTS_FILE}")
    try:
        flat = map_safetensors(weights_path)
    except Exception:  # noqa: BLE001 - a file this reader does not handle: safetensors' own reader decides
        try:
            flat = load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{weights_path} cannot be read: {exc}") from None
    check_flat_shapes(flat, config)
    vocabulary = load_vocabulary(model_dir)
    if len(vocabulary) != config.vocab_size:
        raise ValueError(f"{VOCABULARY_FILE} has {len(vocabulary)} tokens, config.vocab_size is {config.vocab_size}")
    return config, flat, vocabulary


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def map_safetensors(path: str) -> Dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only views of one memory map: no copy is made
    until they are converted or put on a device (safetensors' `load_file` reads a copy first).
    Raises on anything unexpected (the caller falls back to `load_file`)."""
    import ml_dtypes

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        kind = _SAFETENSORS_DTYPES[info["dtype"]]
        dtype = np.dtype(ml_dtypes.bfloat16) if kind == "bfloat16" else np.dtype(kind)
        shape = tuple(info["shape"])
        if base + end > mapped.size or end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"tensor {name} does not fit its offsets")
        out[name] = mapped[base + start:base + end].view(dtype).reshape(shape)
    return out


def load_vocabulary(model_dir: str) -> List[str]:
    path = os.path.join(model_dir, VOCABULARY_FILE)
    vocabulary = read_json_file(path)
    if not isinstance(vocabulary, list) or not set(map(type, vocabulary)) <= {str}:
        raise ValueError(f"{path} must be a JSON list of token strings")
    return vocabulary
