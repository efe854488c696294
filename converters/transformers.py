"""Hugging Face transformers checkpoints -> jaxgen model directories, without torch.

Reads a checkpoint directory as `save_pretrained` writes it: `config.json`, one or several
`*.safetensors` files (with or without `model.safetensors.index.json`) and the tokenizer
(`tokenizer.json` and/or `tokenizer.model`, `tokenizer_config.json`, ...). Tensors are read straight
from the safetensors files (memory-mapped), so float16/bfloat16 checkpoints keep their type.

Supported `model_type`s: gpt2, llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, gemma3
(the text decoder of the multimodal checkpoint) and phi3. Each maps onto the one decoder through
`ModelConfig` values and the canonical parameter names of `jaxgen.model.checkpoint`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Callable, Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

from jaxgen.converters.base import ConvertedModel, Converter
from jaxgen.model.config import ModelConfig, default_embedding_scale, read_json_file

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "llama", "mistral", "phi3",
                         "qwen2", "qwen3")

# Tokenizer-side files copied as they are (bytes) and JSON files copied as objects.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
EXTRA_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# Values of the HF config classes used when `config.json` omits a key (save_pretrained writes only
# the values that differ from the class defaults).
_DEFAULTS: Dict[str, dict] = {
    "gpt2": dict(tie_word_embeddings=True, n_positions=1024, layer_norm_epsilon=1e-5,
                 activation_function="gelu_new", scale_attn_weights=True, n_inner=None),
    "llama": dict(tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  hidden_act="silu", rope_theta=10000.0),
    "mistral": dict(tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-6,
                    hidden_act="silu", rope_theta=10000.0, sliding_window=4096),
    "qwen2": dict(tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  hidden_act="silu", rope_theta=10000.0, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28),
    "qwen3": dict(tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  hidden_act="silu", rope_theta=10000.0, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28),
    "gemma": dict(tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-6,
                  hidden_act="gelu_pytorch_tanh", rope_theta=10000.0, head_dim=256),
    "gemma2": dict(tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-6,
                   hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0, head_dim=256,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-6,
                        hidden_activation="gelu_pytorch_tanh", rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, sliding_window_pattern=6, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
    "phi3": dict(tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 hidden_act="silu", rope_theta=10000.0, sliding_window=None),
}

_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
}

_FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_DTYPE_ALIASES = {"float32": "float32", "float": "float32", "fp32": "float32",
                  "float16": "float16", "half": "float16", "fp16": "float16",
                  "bfloat16": "bfloat16", "bf16": "bfloat16"}

Progress = Callable[[int, int], None]  # (tensors done, tensors in total)


class TransformersConverter(Converter):
    """Converts a Hugging Face transformers checkpoint directory (mirrors CTranslate2's converter).

    Args:
      model_name_or_path: a local checkpoint directory (a model name is looked up in the local
        Hugging Face cache only; nothing is downloaded).
      copy_files: extra files of the checkpoint directory to copy into the output directory.
      progress: optional callable `progress(done, total)` called after each converted tensor.
    """

    def __init__(self, model_name_or_path: str, copy_files: Optional[List[str]] = None,
                 progress: Optional[Progress] = None):
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"model_name_or_path must be a path string, got {type(model_name_or_path).__name__}")
        self._model_name_or_path = os.fspath(model_name_or_path)
        self._copy_files = list(copy_files or [])
        self._progress = progress

    # ------------------------------------------------------------------ entry point
    def load(self) -> ConvertedModel:
        directory = _resolve_directory(self._model_name_or_path)
        raw = _read_json(os.path.join(directory, "config.json"))
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"No conversion is registered for the model configuration {model_type or raw.get('architectures')} "
                f"(supported configurations are: {', '.join(SUPPORTED_MODEL_TYPES)})")
        hf = _HFConfig(raw)
        weights = _SafetensorsReader(directory)
        try:
            spec = _ARCHITECTURES[model_type](hf, weights)
            tokenizer_config = _read_json_if_exists(os.path.join(directory, "tokenizer_config.json"))
            special_map = _read_json_if_exists(os.path.join(directory, "special_tokens_map.json"))
            generation_config = _read_json_if_exists(os.path.join(directory, "generation_config.json"))
            vocab_size = spec.config_fields["vocab_size"]
            vocabulary, tokenizer_json = _read_vocabulary(directory, vocab_size, tokenizer_config)
            tokens = _special_tokens(hf, tokenizer_config, special_map, generation_config, vocabulary,
                                     tokenizer_json)
            weight_dtype = _weight_dtype(hf, weights, spec.embed_name)
            config = ModelConfig(**spec.config_fields, **tokens, weight_dtype=weight_dtype)
            flat = self._collect(spec, config, _FLOAT_DTYPES[weight_dtype])
        finally:
            weights.close()

        tokenizer_files = []
        for name in TOKENIZER_FILES + tuple(self._copy_files):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    tokenizer_files.append((name, f.read()))
            elif name in self._copy_files:
                raise ValueError(f"file {name!r} given in copy_files is not in {directory}")
        extra_json = {}
        for name, obj in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_map),
                          ("generation_config.json", generation_config)):
            if obj is not None and name not in self._copy_files:
                extra_json[name] = obj
        return ConvertedModel(config, flat, vocabulary, tokenizer_files, extra_json)

    def _collect(self, spec: "_Spec", config: ModelConfig, float_dtype: np.dtype) -> Dict[str, np.ndarray]:
        flat: Dict[str, np.ndarray] = {}
        total = len(spec.tensors)
        for done, (name, getter) in enumerate(spec.tensors.items(), start=1):
            array = np.asarray(getter())
            module = name.split(".")[-2]
            target = np.float32 if module.endswith("norm") else float_dtype
            flat[name] = np.ascontiguousarray(array.astype(target, copy=False))
            if self._progress is not None:
                self._progress(done, total)
        spec.check_all_used()
        return flat


# ---------------------------------------------------------------------------- files
def _resolve_directory(name: str) -> str:
    if os.path.isdir(name):
        return name
    try:  # a hub name already in the local cache; never downloads
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    raise ValueError(f"{name!r} is not a checkpoint directory (jaxgen converts local Hugging Face "
                     f"checkpoint directories; it does not download models)")


def _read_json(path: str) -> dict:
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _read_json_if_exists(path: str) -> Optional[dict]:
    return _read_json(path) if os.path.isfile(path) else None


_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


class _SafetensorsReader:
    """Reads tensors of one or several safetensors files as numpy arrays (bfloat16 included).

    Parses the safetensors header itself (8-byte little-endian length, JSON header, raw data) and
    memory-maps the data, so that no framework is needed and bf16 stays bf16 (ml_dtypes).
    """

    def __init__(self, directory: str):
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map", {})
            files = sorted({os.path.join(directory, f) for f in weight_map.values()})
        else:
            files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            bins = glob.glob(os.path.join(directory, "*.bin")) + glob.glob(os.path.join(directory, "*.pt"))
            hint = " (PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)" if bins else ""
            raise ValueError(f"{directory} has no *.safetensors weights{hint}")
        self._entries: Dict[str, Tuple[np.memmap, dict, int]] = {}
        self._maps: List[np.memmap] = []
        for path in files:
            if not os.path.isfile(path):
                raise ValueError(f"safetensors file {path} (named in the index) does not exist")
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError(f"{path} is not a safetensors file")
                (length,) = struct.unpack("<Q", head)
                try:
                    header = json.loads(f.read(length))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise ValueError(f"{path} is not a safetensors file (bad header)") from None
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            self._maps.append(mm)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                self._entries[name] = (mm, info, 8 + length)

    def names(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> np.dtype:
        return self._dtype_of(self._entries[name][1]["dtype"], name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    @staticmethod
    def _dtype_of(code: str, name: str) -> np.dtype:
        if code not in _ST_DTYPES:
            raise ValueError(f"tensor {name} has unsupported safetensors dtype {code}")
        return _ST_DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        mm, info, base = self._entries[name]
        dtype = self._dtype_of(info["dtype"], name)
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name} has {end - begin} bytes for shape {shape} and dtype {dtype}")
        return mm[base + begin: base + end].view(dtype).reshape(shape)

    def close(self) -> None:
        self._maps.clear()
        self._entries.clear()


# ---------------------------------------------------------------------------- HF config access
class _HFConfig:
    """The (text) config of a checkpoint with the HF class defaults for omitted keys."""

    def __init__(self, raw: dict):
        self.raw = raw
        self.model_type = raw["model_type"]
        if self.model_type == "gemma3":  # multimodal: the decoder is the text config
            text = dict(raw.get("text_config") or {})
            text.setdefault("model_type", "gemma3_text")
            for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id", "dtype",
                        "torch_dtype"):
                if key in raw and key not in text:
                    text[key] = raw[key]
            self.cfg = text
            self.defaults = dict(_DEFAULTS["gemma3_text"])
            self.defaults["vocab_size"] = 262208
        else:
            self.cfg = raw
            self.defaults = _DEFAULTS[self.model_type]

    def get(self, key: str, default=None):
        if key in self.cfg:
            return self.cfg[key]
        return self.defaults.get(key, default)

    def require(self, *keys: str):
        for key in keys:
            value = self.get(key)
            if value is not None:
                return value
        raise ValueError(f"config.json of this {self.model_type} checkpoint has no {keys[0]!r}")

    def ids(self, key: str) -> List[int]:
        value = self.get(key)
        if value is None:
            return []
        return [int(v) for v in (value if isinstance(value, list) else [value])]


def _weight_dtype(hf: _HFConfig, weights: _SafetensorsReader, embed_name: str) -> str:
    """The checkpoint's float type: `dtype`/`torch_dtype` of config.json, else the embedding's."""
    for key in ("dtype", "torch_dtype"):
        value = hf.get(key)
        if isinstance(value, str) and value.replace("torch.", "") in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[value.replace("torch.", "")]
    stored = weights.dtype(embed_name)
    for name, dtype in _FLOAT_DTYPES.items():
        if dtype == stored:
            return name
    return "float32"


def _activation(name: str, model_type: str) -> str:
    if model_type == "gemma" and name == "gelu":
        return "gelu_tanh"  # HF rewrites Gemma's legacy "gelu" to the tanh approximation
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} in this {model_type} checkpoint")
    return _ACTIVATIONS[name]


def _rope(hf: _HFConfig, head_dim: int, max_positions: int) -> dict:
    """rope_theta, rope_scaling, rope_local_theta and rotary_dim from new or old config styles."""
    params = hf.cfg.get("rope_parameters")
    local: Optional[dict] = None
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    elif isinstance(params, dict) and params:
        full = dict(params)
    else:
        full = dict(hf.cfg.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.model_type in ("gemma3", "gemma3_text"):
        local = local if local is not None else {}
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))

    def kind_of(d: dict) -> str:
        kind = d.get("rope_type", d.get("type")) or "default"
        return "longrope" if kind in ("su", "yarn") and hf.model_type == "phi3" else kind

    kind = kind_of(full)
    partial = full.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0
    scaling = None
    if kind != "default":
        if kind not in ("linear", "llama3", "longrope"):
            raise ValueError(f"unsupported rope type {kind!r} in this {hf.model_type} checkpoint "
                             f"(supported: default, linear, llama3, longrope)")
        scaling = {k: v for k, v in full.items()
                   if k not in ("rope_theta", "partial_rotary_factor", "type", "rope_type") and v is not None}
        scaling["rope_type"] = kind
        if kind == "longrope":
            original = scaling.get("original_max_position_embeddings",
                                   hf.get("original_max_position_embeddings", max_positions))
            scaling["original_max_position_embeddings"] = original
            factor = scaling.get("factor") or max_positions / original
            if scaling.get("attention_factor") is None:  # as transformers computes it
                scaling["attention_factor"] = (
                    1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    local_theta = None
    if local is not None:
        if kind_of(local) != "default":
            raise ValueError(f"unsupported rope type {kind_of(local)!r} for sliding layers of this checkpoint")
        local_theta = float(local["rope_theta"])
    rotary = int(head_dim * float(partial))
    return dict(rope_theta=float(full["rope_theta"]), rope_scaling=scaling, rope_local_theta=local_theta,
                rotary_dim=None if rotary == head_dim else rotary)


def _layer_types(hf: _HFConfig, num_layers: int, window: Optional[int]) -> Tuple[tuple, Optional[int]]:
    types = hf.cfg.get("layer_types")
    if window is None:
        return ("full",) * num_layers, None
    if types is None:
        return ("sliding",) * num_layers, window
    mapping = {"full_attention": "full", "sliding_attention": "sliding"}
    unknown = sorted({t for t in types if t not in mapping})
    if unknown:
        raise ValueError(f"unsupported layer types {unknown} in this {hf.model_type} checkpoint")
    if len(types) != num_layers:
        raise ValueError(f"config.json has {len(types)} layer_types for {num_layers} layers")
    out = tuple(mapping[t] for t in types)
    return out, (window if "sliding" in out else None)


# ---------------------------------------------------------------------------- tensor mapping
class _Spec:
    """The ModelConfig fields of an architecture and a getter for each canonical tensor."""

    def __init__(self, weights: _SafetensorsReader, embed_name: str, ignore: Callable[[str], bool]):
        self.weights = weights
        self.embed_name = embed_name
        self.config_fields: dict = {}
        self.tensors: Dict[str, Callable[[], np.ndarray]] = {}
        self._used: set = set()
        self._ignore = ignore

    def has(self, name: str) -> bool:
        return name in self.weights

    def add(self, canonical: str, hf_name: str, transpose: bool = False) -> None:
        if not self.has(hf_name):
            raise ValueError(f"checkpoint has no tensor {hf_name!r} (needed for {canonical})")
        self._used.add(hf_name)

        def getter(w=self.weights, n=hf_name, t=transpose):
            a = w.get(n)
            return a.T if t else a

        self.tensors[canonical] = getter

    def add_split(self, canonicals: List[str], hf_name: str, sizes: List[int], axis: int,
                  transpose: bool) -> None:
        """A fused tensor split along `axis` into parts of `sizes` (e.g. qkv_proj, gate_up_proj)."""
        if not self.has(hf_name):
            raise ValueError(f"checkpoint has no tensor {hf_name!r} (needed for {', '.join(canonicals)})")
        total = self.weights.shape(hf_name)[axis]
        if total != sum(sizes):
            raise ValueError(f"tensor {hf_name} has {total} rows on axis {axis}, expected {sum(sizes)}")
        self._used.add(hf_name)
        offsets = np.cumsum([0] + sizes)
        for canonical, start, stop in zip(canonicals, offsets[:-1], offsets[1:]):
            def getter(w=self.weights, n=hf_name, a=axis, s=int(start), e=int(stop), t=transpose):
                part = np.take(w.get(n), np.arange(s, e), axis=a)
                return part.T if t else part

            self.tensors[canonical] = getter

    def add_linear(self, canonical: str, hf_prefix: str, transpose: bool = True) -> bool:
        """`{hf_prefix}.weight` (and `.bias` when present); returns whether a bias exists."""
        self.add(f"{canonical}.weight", f"{hf_prefix}.weight", transpose)
        if self.has(f"{hf_prefix}.bias"):
            self.add(f"{canonical}.bias", f"{hf_prefix}.bias")
            return True
        return False

    def check_all_used(self) -> None:
        unused = sorted(n for n in self.weights.names() if n not in self._used and not self._ignore(n))
        if unused:
            raise ValueError(f"checkpoint has tensors this converter does not map: {unused[:8]}"
                             f"{' ...' if len(unused) > 8 else ''}")


def _find_prefix(weights: _SafetensorsReader, candidates: List[str], suffix: str) -> str:
    for prefix in candidates:
        if prefix + suffix in weights:
            return prefix
    raise ValueError(f"checkpoint has no embedding tensor (looked for {[p + suffix for p in candidates]})")


def _common_sizes(hf: _HFConfig) -> dict:
    hidden = int(hf.require("hidden_size"))
    heads = int(hf.require("num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    return dict(hidden_size=hidden, num_layers=int(hf.require("num_hidden_layers")), num_heads=heads,
                num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=int(hf.require("intermediate_size")))


def _llama_like(hf: _HFConfig, weights: _SafetensorsReader) -> _Spec:
    """llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3(_text), phi3."""
    mt = hf.model_type
    gemma = mt in ("gemma", "gemma2", "gemma3", "gemma3_text")
    gemma3 = mt in ("gemma3", "gemma3_text")
    sandwich = mt in ("gemma2", "gemma3", "gemma3_text")
    if gemma3 and hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional Gemma 3 encoders (use_bidirectional_attention) are not decoders")

    candidates = ["model.", ""]
    if mt == "gemma3":
        candidates = ["model.language_model.", "language_model.model.", "model."]
    prefix = _find_prefix(weights, candidates, "embed_tokens.weight")
    head_candidates = ["lm_head.weight", "language_model.lm_head.weight"]

    def ignore(name: str) -> bool:
        return (name.endswith("rotary_emb.inv_freq") or name in head_candidates
                or (mt == "gemma3" and not name.startswith(prefix)))

    spec = _Spec(weights, prefix + "embed_tokens.weight", ignore)
    sizes = _common_sizes(hf)
    num_layers, hd = sizes["num_layers"], sizes["head_dim"]
    vocab_size = weights.shape(prefix + "embed_tokens.weight")[0]
    max_positions = int(hf.get("max_position_embeddings") or 8192)

    # sliding windows
    if mt in ("qwen2", "qwen3"):
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
    elif mt in ("mistral", "phi3"):
        window = hf.get("sliding_window")
    else:
        window = None
    layer_types, window = _layer_types(hf, num_layers, window)

    activation_key = "hidden_activation" if mt in ("gemma2", "gemma3", "gemma3_text") else "hidden_act"
    activation = _activation(hf.get(activation_key) or hf.get("hidden_act") or "silu", mt)

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
    for i in range(num_layers):
        p, c = f"{prefix}layers.{i}.", f"layers.{i}."
        spec.add(c + "attn_norm.weight", p + "input_layernorm.weight")
        if mt == "phi3":
            spec.add_split([c + "q.weight", c + "k.weight", c + "v.weight"], p + "self_attn.qkv_proj.weight",
                           [q_out, kv_out, kv_out], axis=0, transpose=True)
            spec.add_split([c + "gate.weight", c + "up.weight"], p + "mlp.gate_up_proj.weight",
                           [sizes["intermediate_size"]] * 2, axis=0, transpose=True)
        else:
            for name in ("q", "k", "v"):
                biases["qkv"] |= spec.add_linear(c + name, p + f"self_attn.{name}_proj")
            for name in ("gate", "up"):
                biases["mlp"] |= spec.add_linear(c + name, p + f"mlp.{name}_proj")
        biases["o"] |= spec.add_linear(c + "o", p + "self_attn.o_proj")
        biases["mlp"] |= spec.add_linear(c + "down", p + "mlp.down_proj")
        if mt in ("qwen3", "gemma3", "gemma3_text"):
            spec.add(c + "q_norm.weight", p + "self_attn.q_norm.weight")
            spec.add(c + "k_norm.weight", p + "self_attn.k_norm.weight")
        if sandwich:
            spec.add(c + "post_attn_norm.weight", p + "post_attention_layernorm.weight")
            spec.add(c + "mlp_norm.weight", p + "pre_feedforward_layernorm.weight")
            spec.add(c + "post_mlp_norm.weight", p + "post_feedforward_layernorm.weight")
        else:
            spec.add(c + "mlp_norm.weight", p + "post_attention_layernorm.weight")

    spec.config_fields = dict(
        architecture=mt, vocab_size=vocab_size, **sizes,
        norm_type="rms", norm_eps=float(hf.get("rms_norm_eps") or 1e-6), norm_offset=1.0 if gemma else 0.0,
        post_attention_norm=sandwich, post_mlp_norm=sandwich, qk_norm=mt in ("qwen3", "gemma3", "gemma3_text"),
        activation=activation, gated_mlp=True, attention_scale=attention_scale,
        attn_logit_softcapping=_float_or_none(hf.get("attn_logit_softcapping")) if mt == "gemma2" else None,
        attention_bias=biases["qkv"], attention_out_bias=biases["o"], mlp_bias=biases["mlp"],
        layer_types=layer_types, sliding_window=int(window) if window else None,
        position_embedding="rope", max_position_embeddings=max_positions,
        **_rope(hf, hd, max_positions),
        embedding_scale=default_embedding_scale(sizes["hidden_size"]) if gemma else None,
        tie_word_embeddings=tied,
        final_logit_softcapping=_float_or_none(hf.get("final_logit_softcapping")) if sandwich else None,
    )
    return spec


def _gpt2(hf: _HFConfig, weights: _SafetensorsReader) -> _Spec:
    prefix = _find_prefix(weights, ["transformer.", ""], "wte.weight")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx are not supported")

    def ignore(name: str) -> bool:
        return name == "lm_head.weight" or name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")

    spec = _Spec(weights, prefix + "wte.weight", ignore)
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
        activation=_activation(hf.get("activation_function") or "gelu_new", "gpt2"), gated_mlp=False,
        attention_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        attention_bias=True, attention_out_bias=True, mlp_bias=True,
        position_embedding="learned", max_position_embeddings=positions, tie_word_embeddings=tied,
    )
    return spec


def _float_or_none(value) -> Optional[float]:
    return None if value is None else float(value)


_ARCHITECTURES = {mt: _llama_like for mt in SUPPORTED_MODEL_TYPES if mt != "gpt2"}
_ARCHITECTURES["gpt2"] = _gpt2


# ---------------------------------------------------------------------------- vocabulary and tokens
def _filler_tokens(vocabulary: List[Optional[str]]) -> List[str]:
    """Fills holes (None) with CTranslate2-style `<extra_id_N>` tokens that do not clash."""
    taken = {t for t in vocabulary if t is not None}
    out, n = [], 0
    for token in vocabulary:
        if token is None:
            while f"<extra_id_{n}>" in taken:
                n += 1
            token = f"<extra_id_{n}>"
            n += 1
        out.append(token)
    return out


def _read_vocabulary(directory: str, vocab_size: int, tokenizer_config: Optional[dict] = None
                     ) -> Tuple[List[str], Optional[dict]]:
    """Token strings ordered by id, padded with fillers or truncated to `vocab_size`.

    From tokenizer.json (model vocabulary + added tokens) or else tokenizer.model (sentencepiece
    pieces + the `added_tokens_decoder` of tokenizer_config.json). Returns the vocabulary and the
    parsed tokenizer.json (None when the vocabulary came from tokenizer.model).
    """
    tokens: Dict[int, str] = {}
    tokenizer_json = None
    json_path = os.path.join(directory, "tokenizer.json")
    sp_path = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(json_path):
        tokenizer_json = _read_json(json_path)
        model = tokenizer_json.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece
            for token, i in vocab.items():
                tokens[int(i)] = token
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            for i, entry in enumerate(vocab):
                tokens[i] = entry[0] if isinstance(entry, (list, tuple)) else entry
        else:
            raise ValueError(f"{json_path}: unsupported tokenizer model {model.get('type')!r}")
        for added in tokenizer_json.get("added_tokens") or []:
            tokens[int(added["id"])] = added["content"]
    elif os.path.isfile(sp_path):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.Load(sp_path)
        tokens = {i: sp.IdToPiece(i) for i in range(sp.GetPieceSize())}
        added = (tokenizer_config or {}).get("added_tokens_decoder")
        if isinstance(added, dict):
            for i, entry in added.items():
                content = _token_string(entry)
                if content is not None and str(i).isdigit():
                    tokens[int(i)] = content
    else:
        raise ValueError(f"{directory} has no tokenizer.json or tokenizer.model to read the vocabulary from")
    vocabulary: List[Optional[str]] = [None] * vocab_size
    for i, token in tokens.items():
        if 0 <= i < vocab_size:
            vocabulary[i] = token
    return _filler_tokens(vocabulary), tokenizer_json


def _token_string(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(hf: _HFConfig, tokenizer_config: Optional[dict], special_map: Optional[dict],
                    generation_config: Optional[dict], vocabulary: List[str],
                    tokenizer_json: Optional[dict]) -> dict:
    """bos/eos/unk/pad token strings and add_bos_token for ModelConfig."""
    known = set(vocabulary)

    def by_id(ids: List[int]) -> Optional[str]:
        for i in ids:
            if 0 <= i < len(vocabulary):
                return vocabulary[i]
        return None

    def by_name(key: str) -> Optional[str]:
        for source in (tokenizer_config, special_map):
            if source and _token_string(source.get(key)) is not None:
                return _token_string(source.get(key))
        return None

    def gen_ids(key: str) -> List[int]:
        value = (generation_config or {}).get(key)
        values = value if isinstance(value, list) else [value]
        return [int(v) for v in values if isinstance(v, int)]

    out = {}
    for key in ("bos", "eos", "unk", "pad"):
        ids = hf.ids(f"{key}_token_id") or gen_ids(f"{key}_token_id")
        if key == "eos":  # the model's end token: config ids first
            token = by_id(ids) or by_name("eos_token")
        else:
            token = by_name(f"{key}_token") or by_id(ids)
        out[f"{key}_token"] = token if token in known else None

    add_bos = tokenizer_config.get("add_bos_token") if tokenizer_config else None
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds(tokenizer_json, out["bos_token"])
    out["add_bos_token"] = bool(add_bos)
    return out


def _post_processor_adds(tokenizer_json: Optional[dict], bos: Optional[str]) -> bool:
    """Whether tokenizer.json's TemplateProcessing starts single sequences with the bos token."""
    if not tokenizer_json or bos is None:
        return False
    processor = tokenizer_json.get("post_processor") or {}
    candidates = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for proc in candidates:
        if isinstance(proc, dict) and proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            if single and isinstance(single[0], dict) and single[0].get("SpecialToken", {}).get("id") == bos:
                return True
    return False
