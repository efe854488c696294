"""The model directory: canonical parameter names, shapes, and load/save.

Files of a model directory:
  config.json         `ModelConfig` with its format version
  model.safetensors   flat canonical names (below), weights in [in, out] layout
  vocabulary.json     list of token strings, index = id
  tokenizer.model or tokenizer.json   the checkpoint's tokenizer (optional for the API)

Canonical names: `layers.{i}.{module}.{kind}` inside layers, `{module}.{kind}` outside; the
one table of every parameter (shape, logical axes, int8 scale axis, float32 or not) is
`layer_params` / `top_params` below: shapes, quantization, tensor-parallel layouts and parameter
counts are all derived from it. Weights are [in, out] ([E, in, out] for experts); int8 weights
carry `<module>.weight_scale` (float32, one per output channel: the weight's shape without its
input axis; for `embed`, one per vocabulary row). The dequantised weight is `weight *
weight_scale` broadcast over the input axis.

In memory, parameters form a nested pytree: `{"embed": {kind: array}, "layers": [per layer
{module: {kind: array}}], "final_norm": {...}, ...}`. Layers are separate arrays, not stacked:
XLA:CPU copies a stacked layer's weights when a scan slices them, which costs more than the
longer compile of an unrolled stack.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from jaxgen.model.config import ModelConfig, read_json_file

WEIGHTS_FILE = "model.safetensors"
VOCABULARY_FILE = "vocabulary.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")

Shape = Tuple[int, ...]

# Logical axes of parameters. Tensor parallelism splits the axes in replicas.SHARDED_AXES; the
# others are replicated. "table" is the hidden axis of the embedding and the untied head (split:
# each device's partial logits are summed), "hidden" the hidden axis inside layers (replicated).
HIDDEN, TABLE, VOCAB, Q_HEADS, KV_HEADS, MLP, EXPERTS, POSITIONS, HEAD_DIM = (
    "hidden", "table", "vocab", "q_heads", "kv_heads", "mlp", "experts", "positions", "head_dim")


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    """One parameter tensor, declared once; every table of shapes, quantization and sharding is
    derived from these.

    shape: from the config. axes: one logical axis name per dimension (None: not meaningful).
    reduce_axis: for int8 quantization, the dimension a per-channel scale reduces over (the
      input axis of a weight, the hidden axis of the embedding); None: never quantized.
    keep_float32: stored as float32 whatever the weight type (norms: tiny and precision-sensitive).
    """

    shape: Shape
    axes: Tuple[Optional[str], ...]
    reduce_axis: Optional[int] = None
    keep_float32: bool = False

    @property
    def scale_shape(self) -> Shape:
        """Shape of the int8 scale: one per channel, i.e. `shape` without `reduce_axis`."""
        return tuple(n for i, n in enumerate(self.shape) if i != self.reduce_axis)


def _norm(config: ModelConfig, dim: int, axis: str = HIDDEN) -> Dict[str, ParamDecl]:
    decls = {"weight": ParamDecl((dim,), (axis,), keep_float32=True)}
    if config.norm_type == "layer" and config.norm_bias:
        decls["bias"] = ParamDecl((dim,), (axis,), keep_float32=True)
    return decls


def _linear(n_in: int, n_out: int, axes: Tuple[Optional[str], Optional[str]], bias: bool,
            experts: int = 0) -> Dict[str, ParamDecl]:
    """A weight [in, out] (+ bias [out]); with `experts`, one per expert: [E, in, out], [E, out]."""
    lead = ((experts,), (EXPERTS,)) if experts else ((), ())
    decls = {"weight": ParamDecl(lead[0] + (n_in, n_out), lead[1] + axes, reduce_axis=len(lead[0]))}
    if bias:
        decls["bias"] = ParamDecl(lead[0] + (n_out,), lead[1] + (axes[1],))
    return decls


def layer_params(config: ModelConfig, layer: int) -> Dict[str, Dict[str, ParamDecl]]:
    """The parameters of one layer: {module: {kind: ParamDecl}}. Modules:

    attn_norm, mlp_norm (pre norms; absent for "output" placement, mlp_norm absent with a shared
    block norm), post_attn_norm, post_mlp_norm ("sandwich"/"output": after the sublayer), q, k, v, o,
    q_norm, k_norm; MLP: up, down (+ gate when gated); experts: router [D, E], expert_gate /
    expert_up [E, D, F], expert_down [E, F, D], and for a shared expert shared_gate / shared_up /
    shared_down and shared_expert_gate [D, 1]; with a scaled router router_scale [D] and
    router_expert_scale [E]; a gated MLP beside experts (Gemma 4) adds mlp_norm_2 (the experts'
    pre-norm), post_mlp_norm_1 / post_mlp_norm_2 (after each); per_layer_gate [D, P], per_layer_proj [P, D],
    per_layer_norm (per-layer inputs), layer_scale [1]. Shapes follow the layer's head dim, KV
    heads and MLP width; a layer reusing an earlier layer's keys and values has no k, v, k_norm.
    """
    d, hd, f = config.hidden_size, config.layer_head_dim(layer), config.layer_intermediate_size(layer)
    q_out, kv_out = config.num_heads * hd, config.layer_kv_heads(layer) * hd
    own_kv = config.kv_source(layer) == layer  # a layer reusing an earlier layer's keys/values has no k, v
    decls: Dict[str, Dict[str, ParamDecl]] = {}
    placement = config.norm_placement
    if placement in ("pre", "sandwich", "post"):
        decls["attn_norm"] = _norm(config, d)
        if not config.shared_block_norm:
            decls["mlp_norm"] = _norm(config, d)
    if placement in ("sandwich", "output"):
        decls["post_attn_norm"] = _norm(config, d)
        decls["post_mlp_norm"] = _norm(config, d)
    decls["q"] = _linear(d, q_out, (HIDDEN, Q_HEADS), config.attention_bias)
    if own_kv:
        decls["k"] = _linear(d, kv_out, (HIDDEN, KV_HEADS), config.attention_bias)
        decls["v"] = _linear(d, kv_out, (HIDDEN, KV_HEADS), config.attention_bias)
    decls["o"] = _linear(q_out, d, (Q_HEADS, HIDDEN), config.attention_out_bias)
    if config.qk_norm == "head":
        decls["q_norm"] = {"weight": ParamDecl((hd,), (HEAD_DIM,), keep_float32=True)}
        if own_kv:
            decls["k_norm"] = {"weight": ParamDecl((hd,), (HEAD_DIM,), keep_float32=True)}
    elif config.qk_norm == "full":
        decls["q_norm"] = {"weight": ParamDecl((q_out,), (Q_HEADS,), keep_float32=True)}
        if own_kv:
            decls["k_norm"] = {"weight": ParamDecl((kv_out,), (KV_HEADS,), keep_float32=True)}
    kind = config.layer_mlp(layer)
    if kind in ("gated", "gated_and_experts"):
        decls["gate"] = _linear(d, f, (HIDDEN, MLP), config.mlp_bias)
    if kind in ("gated", "plain", "gated_and_experts"):
        decls["up"] = _linear(d, f, (HIDDEN, MLP), config.mlp_bias)
        decls["down"] = _linear(f, d, (MLP, HIDDEN), config.mlp_bias)
    if kind == "gated_and_experts":  # Gemma 4: the experts' pre-norm, and a norm after each of the two
        decls["mlp_norm_2"] = _norm(config, d)
        decls["post_mlp_norm_1"] = _norm(config, d)
        decls["post_mlp_norm_2"] = _norm(config, d)
    if kind in ("experts", "gated_and_experts"):
        e, fe = config.num_experts, config.expert_intermediate_size
        decls["router"] = _linear(d, e, (HIDDEN, None), False)
        decls["router"]["weight"] = dataclasses.replace(decls["router"]["weight"], reduce_axis=None)
        if config.router == "scaled":
            decls["router_scale"] = {"weight": ParamDecl((d,), (HIDDEN,), keep_float32=True)}
            decls["router_expert_scale"] = {"weight": ParamDecl((e,), (None,), keep_float32=True)}
        decls["expert_gate"] = _linear(d, fe, (HIDDEN, MLP), config.mlp_bias, experts=e)
        decls["expert_up"] = _linear(d, fe, (HIDDEN, MLP), config.mlp_bias, experts=e)
        decls["expert_down"] = _linear(fe, d, (MLP, HIDDEN), config.mlp_bias, experts=e)
        if config.shared_expert_intermediate_size:
            fs = config.shared_expert_intermediate_size
            decls["shared_gate"] = _linear(d, fs, (HIDDEN, MLP), False)
            decls["shared_up"] = _linear(d, fs, (HIDDEN, MLP), False)
            decls["shared_down"] = _linear(fs, d, (MLP, HIDDEN), False)
            decls["shared_expert_gate"] = _linear(d, 1, (HIDDEN, None), False)
            decls["shared_expert_gate"]["weight"] = dataclasses.replace(
                decls["shared_expert_gate"]["weight"], reduce_axis=None)
    if config.per_layer_input_size:  # Gemma 4's per-layer input: gate [D, P], projection [P, D], norm
        p = config.per_layer_input_size
        decls["per_layer_gate"] = _linear(d, p, (HIDDEN, None), False)
        decls["per_layer_proj"] = _linear(p, d, (None, HIDDEN), False)
        decls["per_layer_norm"] = _norm(config, d)
    if config.layer_scale:
        decls["layer_scale"] = {"weight": ParamDecl((1,), (None,), keep_float32=True)}
    return decls


def top_params(config: ModelConfig) -> Dict[str, Dict[str, ParamDecl]]:
    """The parameters outside the layers: {module: {kind: ParamDecl}}: embed [V, E], pos_embed
    [P, D] (learned positions), embed_norm (BLOOM), per_layer_embed / per_layer_model_proj /
    per_layer_model_norm (Gemma 4's per-layer inputs), embed_in [E, D] / embed_out [D, E] (projected
    embeddings), final_norm, lm_head [D, V] (+ bias; the weight is absent when tied)."""
    d, v, e = config.hidden_size, config.vocab_size, config.embedding_width
    decls: Dict[str, Dict[str, ParamDecl]] = {"embed": {"weight": ParamDecl((v, e), (VOCAB, TABLE), reduce_axis=1)}}
    if config.position_embedding == "learned":
        decls["pos_embed"] = {"weight": ParamDecl((config.max_position_embeddings, d), (POSITIONS, HIDDEN))}
    if config.embedding_norm:
        decls["embed_norm"] = _norm(config, d)
    if config.embedding_size is not None:
        decls["embed_in"] = _linear(e, d, (None, HIDDEN), False)
        decls["embed_out"] = _linear(d, e, (HIDDEN, None), False)
    if config.per_layer_input_size:  # Gemma 4: embedding [V, L*P], projection [D, L*P], norm [P]
        width = config.num_layers * config.per_layer_input_size
        decls["per_layer_embed"] = {"weight": ParamDecl((v, width), (VOCAB, None), reduce_axis=1)}
        decls["per_layer_model_proj"] = _linear(d, width, (HIDDEN, None), False)
        decls["per_layer_model_norm"] = _norm(config, config.per_layer_input_size, None)
    if config.final_norm:
        decls["final_norm"] = _norm(config, d)
    if not config.tie_word_embeddings:
        decls["lm_head"] = {"weight": ParamDecl((e, v), (TABLE, VOCAB), reduce_axis=0)}
    if config.lm_head_bias:
        decls.setdefault("lm_head", {})["bias"] = ParamDecl((v,), (VOCAB,))
    return decls


def flat_params(config: ModelConfig) -> Dict[str, ParamDecl]:
    """Every stored tensor's canonical name -> ParamDecl, int8 scales excluded."""
    out: Dict[str, ParamDecl] = {}
    for module, kinds in top_params(config).items():
        for kind, decl in kinds.items():
            out[f"{module}.{kind}"] = decl
    for i in range(config.num_layers):
        for module, kinds in layer_params(config, i).items():
            for kind, decl in kinds.items():
                out[f"layers.{i}.{module}.{kind}"] = decl
    return out


def scale_name(name: str) -> str:
    """The int8 scale stored beside a quantized weight: `<module>.weight_scale`."""
    return name + "_scale"


def expected_flat_shapes(config: ModelConfig) -> Dict[str, Shape]:
    """Every canonical file name with its shape, int8 scales included when weight_dtype is int8."""
    int8 = config.weight_dtype == "int8"
    out: Dict[str, Shape] = {}
    for name, decl in flat_params(config).items():
        out[name] = decl.shape
        if int8 and decl.reduce_axis is not None:
            out[scale_name(name)] = decl.scale_shape
    return out


def parameter_count(config: ModelConfig) -> int:
    """Parameters of the model (int8 scales not counted)."""
    return sum(math.prod(decl.shape) for decl in flat_params(config).values())


def active_parameter_count(config: ModelConfig) -> int:
    """Parameters one token runs through: the experts a token is routed to, not all of them."""
    total = 0
    for name, decl in flat_params(config).items():
        n = math.prod(decl.shape)
        if decl.axes and decl.axes[0] == EXPERTS:
            n = n // config.num_experts * config.experts_per_token
        total += n
    return total


# ---------------------------------------------------------------------------- pytree <-> flat
def nest_params(flat: Dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Flat canonical names -> nested params pytree; "layers" is a list of per-layer dicts.

    Expert tensors (declared with a leading "experts" axis, [E, ...]) become lists of E per-expert
    arrays: a decode step then reads its experts' own buffers (XLA:CPU copies a slice of a stacked
    tensor before a product, which costs more than the product at decode sizes)."""
    params: dict = {"layers": [{} for _ in range(config.num_layers)]}
    decls = flat_params(config)
    for name, array in flat.items():
        parts = name.split(".")
        weight = ".".join(parts[:-1] + ["weight"]) if parts[-1] == "weight_scale" else name
        if decls[weight].axes[0] == EXPERTS:
            array = [array[e] for e in range(array.shape[0])]
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
